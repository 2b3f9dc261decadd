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
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


def total_norm(params: Sequence[Tensor]) -> Tensor:
    """The 2-norm of every ``.grad`` of ``params`` together: a float64 0-d tensor on their
    device (no host read)."""
    norms = [_norm(p.grad) for p in params if p.grad is not None]
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def clip_(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """Scale the ``.grad`` of ``params`` in place so their total norm is at most ``max_norm``.

    Done on the device, as ``torch.nn.utils.clip_grad_norm_`` does: the factor
    ``min(1, max_norm / (total + 1e-6))`` multiplies every gradient (1 leaves them
    bitwise unchanged), with no host read.

    Returns:
        The total norm before clipping (a float64 0-d tensor).
    """
    norm = total_norm(params)
    grads = [p.grad for p in params if p.grad is not None]
    if any(hasattr(g, "device_mesh") for g in grads):  # DTensor shards (FSDP2): scaled one by one
        factor = max_norm / (float(norm) + 1e-6)
        if factor < 1.0:
            for g in grads:
                g.mul_(factor)
        return norm
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    by_device: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), group in by_device.items():
        torch._foreach_mul_(group, coef.to(device=device, dtype=dtype))
    return norm
