"""torch.distributed support: average per-task gradients across ranks.

When a process group is initialised with more than one rank, the per-task gradients
of every rank (shared Jacobian rows, task-parameter gradients, loss values) are
averaged *before* preconditioning and aggregation, with one bucketed ``all_reduce``
per dtype and device (one in the usual case). Every rank then computes the same Gram,
the same coefficients and the same update, equal to single-process training on the
global batch.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def world_size(group: Optional[Any] = None) -> int:
    """Number of ranks, 1 when torch.distributed is unavailable or not initialised."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return int(dist.get_world_size(group))


def all_average(tensors: Sequence[Tensor], group: Optional[Any] = None) -> List[Tensor]:
    """Average ``tensors`` across ranks: one flat ``all_reduce`` per (device, dtype) bucket."""
    return _all_reduce(tensors, group, average=True)


def all_sum(tensors: Sequence[Tensor], group: Optional[Any] = None) -> List[Tensor]:
    """Sum ``tensors`` across ranks: one flat ``all_reduce`` per (device, dtype) bucket."""
    return _all_reduce(tensors, group, average=False)


def _all_reduce(tensors: Sequence[Tensor], group: Optional[Any], average: bool) -> List[Tensor]:
    size = world_size(group)
    if size == 1 or not tensors:
        return list(tensors)
    buckets: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for n, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(n)
    out: List[Tensor] = list(tensors)
    for members in buckets.values():
        flat = torch.cat([tensors[n].reshape(-1) for n in members])
        torch.distributed.all_reduce(flat, group=group)
        if average:
            flat.div_(size)
        offset = 0
        for n in members:
            numel = tensors[n].numel()
            out[n] = flat[offset : offset + numel].view_as(tensors[n])
            offset += numel
    return out


def reduce_presence(values: Tensor, weights: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-task loss values averaged over the ranks that had each task.

    Args:
        values: ``(K,)`` float64 loss values of this rank (0 for a task it lacks).
        weights: ``(K,)`` float64 weight of this rank for each task (1 or its sample
            count if it has the task, 0 if not).

    Returns:
        ``(values, totals)``: the weighted mean over ranks (0 where no rank had the task)
        and the total weight of every task over the ranks (one ``all_reduce``).
    """
    head = torch.cat([values * weights, weights])
    (head,) = all_sum([head])
    k = values.shape[0]
    totals = head[k:]
    mean = torch.where(totals > 0, head[:k] / torch.where(totals > 0, totals, 1.0), 0.0)
    return mean, totals
