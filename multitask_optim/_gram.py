"""Gram kernels: ``G = J J^T`` of dense Jacobian rows, with a float64 fallback.

Each Gram is computed in the rows' dtype (float32 at least) and recomputed in float64
when its entries overflow, or when a non-zero gradient row has a squared norm so small
that the dtype's precision is lost (underflow, below ``tiny / eps``).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor


def dense_grams(
    jacobians: Sequence[Optional[Tensor]], blocks: Sequence[Sequence[int]], num_tasks: int
) -> Tensor:
    """Gram matrices of every block as a ``(B, K, K)`` float64 CPU tensor.

    ``jacobians[p]`` is the ``(K, *shape)`` Jacobian of shared parameter ``p`` (None when
    no loss reached it or a factor holds it); ``blocks`` lists parameter positions per
    block.
    """
    parts: List[Tensor] = []
    filled: List[int] = []
    for b, block in enumerate(blocks):
        rows = [jacobians[p] for p in block if jacobians[p] is not None]
        if rows:
            parts.append(_gram(rows))
            filled.append(b)
    if len(filled) == len(blocks) and parts:
        out = torch.stack(parts).double().cpu()  # one transfer
    else:
        out = torch.zeros(len(blocks), num_tasks, num_tasks, dtype=torch.float64)
        if not parts:
            return out
        out[filled] = torch.stack(parts).double().cpu()
    dtype = next(j.dtype for j in jacobians if j is not None)
    if dtype == torch.float64:
        return out
    info = torch.finfo(torch.promote_types(dtype, torch.float32))
    diag = out.diagonal(dim1=-2, dim2=-1)
    # one sync for the usual case: entries are at most float32's max, so their float64
    # sum is finite exactly when every entry is; NaN propagates through min as well
    total, low = torch.stack([out.sum(), diag.min()]).tolist()
    if math.isfinite(total) and low >= info.tiny / info.eps:
        return out
    suspect = (~torch.isfinite(out).flatten(1).all(dim=1)) | (diag < info.tiny / info.eps).any(dim=1)
    for b in suspect.nonzero().flatten().tolist():
        rows = [jacobians[p] for p in blocks[b] if jacobians[p] is not None]
        if rows and _has_tiny_row(rows, out[b]):
            out[b] = _gram(rows, torch.float64).cpu()
    return out


def precise_gram(compute: Callable[[torch.dtype], Tensor], dtype: torch.dtype) -> Tensor:
    """``compute(dtype)`` as float64, recomputed as ``compute(float64)`` when imprecise."""
    gram = compute(dtype).double()
    if _imprecise(gram.cpu(), dtype):
        gram = compute(torch.float64)
    return gram


#: Below this many elements (K x P of a block) the rows are concatenated and multiplied
#: once: one product instead of one per parameter (the copy costs less than the calls).
CONCAT_BELOW = 1 << 16


def _gram(rows: Sequence[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    flats = [jac.reshape(jac.shape[0], -1) for jac in rows]
    if (
        len(flats) > 1
        and sum(f.numel() for f in flats) <= CONCAT_BELOW
        and len({(f.dtype, f.device) for f in flats}) == 1
    ):
        flats = [torch.cat(flats, dim=1)]
    gram: Optional[Tensor] = None
    for flat in flats:
        if dtype is not None:
            flat = flat.to(dtype)
        elif flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        part = flat @ flat.T
        gram = part if gram is None else gram + part.to(gram.dtype)
    assert gram is not None
    return gram


def _imprecise(gram: Tensor, dtype: torch.dtype) -> bool:
    """Overflowed, or a squared norm below what ``dtype`` resolves."""
    if dtype == torch.float64:
        return False
    if not bool(torch.isfinite(gram).all()):
        return True
    info = torch.finfo(torch.promote_types(dtype, torch.float32))
    return bool((gram.diagonal() < info.tiny / info.eps).any())


def _has_tiny_row(rows: Sequence[Tensor], gram: Tensor) -> bool:
    if not bool(torch.isfinite(gram).all()):
        return True
    rows = [r for r in rows if r.numel()]  # an empty shard (FSDP2) has no entries
    if not rows:
        return False
    peak = torch.stack([r.reshape(r.shape[0], -1).abs().amax(dim=1) for r in rows]).amax(dim=0)
    info = torch.finfo(torch.promote_types(rows[0].dtype, torch.float32))
    return bool(((peak.cpu() > 0) & (gram.diagonal() < info.tiny / info.eps)).any())
