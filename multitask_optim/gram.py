"""Gram matrices of the per-task gradients, per block of shared parameters."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor


def _block_gram(rows: Sequence[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    gram: Optional[Tensor] = None
    for jac in rows:
        flat = jac.reshape(jac.shape[0], -1)
        if dtype is not None:
            flat = flat.to(dtype)
        part = flat @ flat.T
        gram = part if gram is None else gram + part.to(gram.dtype)
    assert gram is not None
    return gram


def block_grams(
    jacobians: Sequence[Optional[Tensor]], blocks: Sequence[Sequence[int]], num_tasks: int
) -> Tensor:
    """Gram matrices ``G_b = J_b J_b^T`` of every block, as a ``(B, K, K)`` float64 CPU tensor.

    ``jacobians[p]`` is the ``(K, *shape)`` Jacobian of shared parameter ``p`` (or None
    when no loss reached it); ``blocks`` lists parameter indices per block. Each Gram
    is computed in the parameters' dtype and recomputed in float64 when its entries
    overflow, or when a non-zero gradient row has a squared norm so small that the
    dtype's precision is lost (underflow).
    """
    out = torch.zeros(len(blocks), num_tasks, num_tasks, dtype=torch.float64)
    for b, block in enumerate(blocks):
        rows = [jacobians[p] for p in block if jacobians[p] is not None]
        if not rows:
            continue
        gram = _block_gram(rows)
        out[b] = gram.double()
    dtype = _lowest_precision(jacobians)
    if dtype is None or dtype == torch.float64:
        return out
    info = torch.finfo(dtype)
    diag = out.diagonal(dim1=-2, dim2=-1)
    overflow = ~torch.isfinite(out).flatten(1).all(dim=1)
    suspicious = ((diag < info.tiny / info.eps) & (diag >= 0)).any(dim=1) | overflow
    for b in suspicious.nonzero().flatten().tolist():
        rows = [jacobians[p] for p in blocks[b] if jacobians[p] is not None]
        if overflow[b] or _has_tiny_nonzero_row(rows):
            out[b] = _block_gram(rows, torch.float64).cpu()
    return out


def _lowest_precision(jacobians: Sequence[Optional[Tensor]]) -> Optional[torch.dtype]:
    dtypes = {j.dtype for j in jacobians if j is not None}
    if not dtypes:
        return None
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _has_tiny_nonzero_row(rows: List[Tensor]) -> bool:
    peak = torch.stack([r.reshape(r.shape[0], -1).abs().amax(dim=1) for r in rows]).amax(dim=0)
    gram_diag = torch.stack([r.reshape(r.shape[0], -1).pow(2).sum(dim=1) for r in rows]).sum(dim=0)
    info = torch.finfo(rows[0].dtype)
    return bool(((peak > 0) & (gram_diag < info.tiny / info.eps)).any())
