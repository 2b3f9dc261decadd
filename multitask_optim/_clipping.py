"""Gradient clipping of the final update (``max_grad_norm=``).

With ``step(losses)`` the gradients the inner optimizer uses are written by the
multi-task optimizer inside ``step``, after aggregation and just before the inner
step, so a user's ``torch.nn.utils.clip_grad_norm_`` call can only run before them (on
nothing) or after the inner step (too late). ``max_grad_norm`` clips at the right place,
with the rule of ``clip_grad_norm_``::

    total = || (g_1, ..., g_n) ||_2               over every model parameter's .grad
    g    <- g * min(1, max_norm / (total + 1e-6))

``total`` is computed in float64 (a float32 gradient of 1e20 would overflow torch's
float32 norm to inf and zero every gradient). Under DDP-style replication every rank
holds the same averaged gradients, so its norm is the whole model's; under FSDP2
(``fully_shard``) the gradients are ``DTensor`` shards and the norm of each is reduced
over its mesh by DTensor, so ``total`` is again the whole model's.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor


def check_max_grad_norm(value: Any) -> Optional[float]:
    """``None`` or a finite float > 0 (the error names ``max_grad_norm``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"max_grad_norm must be None or a number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {value!r}")
    return float(value)


def _norm(grad: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(grad, dtype=torch.float64)
    full = getattr(norm, "full_tensor", None)  # a DTensor's partial norm, reduced over its mesh
    return full() if callable(full) else norm


def total_norm(params: Sequence[Tensor]) -> float:
    """The 2-norm of every ``.grad`` of ``params`` together (float64)."""
    norms = [_norm(p.grad).cpu() for p in params if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def clip_(params: Sequence[Tensor], max_norm: float) -> float:
    """Scale the ``.grad`` of ``params`` in place so their total norm is at most ``max_norm``.

    Returns:
        The total norm before clipping.
    """
    norm = total_norm(params)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
