"""Textbook implementations used as baselines: what one writes from the paper.

PCGrad (Yu et al. 2020, Algorithm 1) the straightforward way: K backward passes with
``retain_graph`` collect each task's flattened gradient on the shared parameters, then a
plain vector loop projects every task gradient onto the normal plane of each conflicting
*original* task gradient (other tasks in a fresh random order per task) and sums.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def per_task_gradients(
    losses: Sequence[Tensor], shared: Sequence[Tensor], heads: Sequence[Sequence[Tensor]]
) -> Tuple[Tensor, List[List[Tensor]]]:
    """K backward passes: ``(G (K, P) flattened shared gradients, per-task head gradients)``."""
    rows: List[Tensor] = []
    head_grads: List[List[Tensor]] = []
    k = len(losses)
    for i, loss in enumerate(losses):
        own = list(heads[i])
        grads = torch.autograd.grad(loss, [*shared, *own], retain_graph=i < k - 1, allow_unused=True)
        shared_g = [g if g is not None else torch.zeros_like(p) for p, g in zip(shared, grads[: len(shared)])]
        rows.append(torch.cat([g.reshape(-1) for g in shared_g]))
        head_grads.append(
            [g if g is not None else torch.zeros_like(p) for p, g in zip(own, grads[len(shared) :])]
        )
    return torch.stack(rows), head_grads


def pcgrad_vectors(
    grads: Tensor,
    generator: Optional[torch.Generator] = None,
    orders: Optional[Sequence[Sequence[int]]] = None,
    reduction: str = "sum",
) -> Tensor:
    """PCGrad on explicit vectors ``grads (K, P)``; returns the combined ``(P,)`` update.

    For each task ``i``: ``g_i' = g_i``; for ``j != i`` in a random order (or
    ``orders[i]``), if ``<g_i', g_j> < 0`` then ``g_i' -= <g_i', g_j> / ||g_j||^2 g_j``.
    A zero ``g_j`` is skipped.
    """
    k = grads.shape[0]
    sq = (grads * grads).sum(dim=1)
    projected = []
    for i in range(k):
        g = grads[i].clone()
        if orders is not None:
            order = list(orders[i])
        else:
            others = torch.tensor([j for j in range(k) if j != i], dtype=torch.long)
            order = others[torch.randperm(k - 1, generator=generator)].tolist() if k > 1 else []
        for j in order:
            dot = torch.dot(g, grads[j])
            if dot < 0 and sq[j] > 0:
                g -= (dot / sq[j]) * grads[j]
        projected.append(g)
    total = torch.stack(projected).sum(dim=0)
    return total / k if reduction == "mean" else total


def unflatten_into(vector: Tensor, params: Sequence[Tensor]) -> List[Tensor]:
    out = []
    start = 0
    for p in params:
        n = p.numel()
        out.append(vector[start : start + n].view_as(p))
        start += n
    return out


def textbook_pcgrad_step(
    model,  # benchmarks.workloads.MultiHeadModel
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> Callable[[Tuple[Tensor, Tensor]], None]:
    """A ``step(batch)`` closure: forward, K backwards, vector PCGrad, ``optimizer.step()``."""
    shared = model.shared_parameters()
    heads = model.head_parameters()

    def step(batch: Tuple[Tensor, Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = model.losses(batch)
        rows, head_grads = per_task_gradients(losses, shared, heads)
        update = pcgrad_vectors(rows, generator)
        for p, g in zip(shared, unflatten_into(update, shared)):
            p.grad = g
        for params, grads in zip(heads, head_grads):
            for p, g in zip(params, grads):
                p.grad = g
        optimizer.step()

    return step
