"""The plain path: one backward of the weighted sum of the present tasks' losses.

Used for the plain configuration (plain sum, equal weights, ...) and for every step the
schedule leaves out (:mod:`.schedule`). Under ``torch.distributed`` each task's loss
value and gradient are the average over the ranks that had it: the loss values travel
first (one small collective, so every rank computes the same weights), each rank scales
its task ``i`` loss by ``s_ir / S_i`` (its share of the task's samples), and one more
collective sums the gradients.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .distributed import all_sum, reduce_presence
from .losses import Parsed, Samples, task_samples


def ranked_values(
    parsed: Parsed, values: Tensor, samples: Samples
) -> Tuple[Tuple[int, ...], Tensor, List[float]]:
    """Loss values averaged over the ranks that had each task (one collective).

    Returns:
        ``(present, values, shares)``: the tasks some rank had, their averaged values,
        and for each of this rank's tasks its share ``s_ir / S_i`` of the task's total.
    """
    k = len(parsed.names)
    mine = torch.zeros(k, dtype=torch.float64)
    counts = task_samples(samples, parsed) or [1.0] * len(parsed.present)
    mine[list(parsed.present)] = torch.tensor(counts, dtype=torch.float64)
    spread = torch.zeros(k, dtype=torch.float64)
    spread[list(parsed.present)] = values
    mean, totals = reduce_presence(spread, mine)
    present = tuple(i for i in range(k) if totals[i] > 0)
    return present, mean[list(present)], [float(mine[i] / totals[i]) for i in parsed.present]


def loss_factors(
    mine: Sequence[int], present: Sequence[int], weights: Optional[Tensor], shares: Optional[List[float]]
) -> Optional[List[float]]:
    """Each of this rank's losses' factor in the backward: its weight times its rank share."""
    if weights is None and shares is None:
        return None
    by_task = dict(zip(present, weights.tolist())) if weights is not None else {}
    out = []
    for n, i in enumerate(mine):
        f = by_task.get(i, 1.0)
        out.append(f if shares is None else f * shares[n])
    return out


def summed(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Rank-weighted gradients summed across ranks (one collective); a parameter no rank
    reached keeps no gradient."""
    flags = torch.tensor([0.0 if g is None else 1.0 for g in grads], dtype=torch.float64)
    filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    like = filled[0] if filled else flags
    reduced = all_sum([flags.to(like.device, like.dtype), *filled])
    reached = (reduced[0] > 0).tolist()
    return [g if r else None for g, r in zip(reduced[1:], reached)]


def gradients(
    losses: Sequence[Tensor], factors: Optional[Sequence[float]], params: Sequence[Tensor], scale: float
) -> Tuple[Optional[Tensor], ...]:
    """Gradients of ``sum_i f_i L_i`` (one backward), unscaled from the loss scale.

    A factor of exactly 1 is not multiplied, so with no factors and no loss scale this is
    bitwise ``torch.autograd.grad(sum(losses), params)``.
    """
    terms = list(losses) if factors is None else [x if f == 1.0 else x * f for x, f in zip(losses, factors)]
    total = sum(terms)
    if scale != 1.0:
        total = total * scale
    grads = torch.autograd.grad(total, params, allow_unused=True)  # type: ignore[arg-type]
    if scale != 1.0:
        grads = tuple(None if g is None else g * (1.0 / scale) for g in grads)
    return grads
