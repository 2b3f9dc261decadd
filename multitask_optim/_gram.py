"""Gram kernels: ``G = J J^T`` of dense Jacobian rows, with a float64 fallback.

Precision:

- a small block (at most :data:`CONCAT_BELOW` Jacobian entries, e.g. a bias, or a
  layer with fewer elements than tasks) is formed in float64: exact for the rows it
  has, whatever their dtype;
- a larger block is formed in the rows' dtype (float32 at least) over
  :data:`CHUNK` columns at a time, the partial Grams summed in float64: each entry is
  then accurate to about float32's ``eps ||g_i|| ||g_j||`` however many elements the
  block has (one product over ten million float32 elements is off by ``2e-3``
  relative). The float32 products cost what one product costs; float64 ones would
  cost 20 times more;
- float64 rows give a float64 Gram.

Either way the rows themselves are only as precise as their dtype: the surgeries are
told that precision (``ctx.rounding``, :func:`gram_rounding`) and treat what lies
below it as zero (:func:`~multitask_optim.aggregators._common.clean_gram`).

A Gram is recomputed in float64 when its entries overflow, or when a non-zero gradient
row has a squared norm so small that the dtype's precision is lost (underflow, below
``tiny / eps``). The factored layers' Grams (:mod:`._gradients`) are float32-accurate
(float64 for float64 inputs).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

#: The rounding of a Gram formed in float64 (relative to ``||g_i|| ||g_j||``).
EXACT = torch.finfo(torch.float64).eps


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


#: Up to this many elements (K x P of a block) the rows are concatenated and multiplied
#: once, in float64: one product instead of one per parameter (the copy costs less than
#: the calls), and an exact Gram for small blocks (a bias, a layer with fewer elements
#: than tasks), where rank deficiency is the rule.
CONCAT_BELOW = 1 << 16
#: Larger blocks are multiplied over this many columns at a time, summed in float64.
CHUNK = 1 << 14


def _small(rows: Sequence[Tensor]) -> bool:
    """Whether a block's rows are few enough to be formed in float64 (see :data:`CONCAT_BELOW`)."""
    return sum(r.numel() for r in rows) <= CONCAT_BELOW


def _gram(rows: Sequence[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """The float64 Gram of one block's rows (float64 products for a small block)."""
    flats = [jac.reshape(jac.shape[0], -1) for jac in rows]
    small = _small(flats)
    if len(flats) > 1 and small and len({f.device for f in flats}) == 1:
        flats = [torch.cat([f.to(torch.float64) for f in flats], dim=1)]
    if dtype is None and small:
        dtype = torch.float64
    gram: Optional[Tensor] = None
    for flat in flats:
        if dtype is not None:
            flat = flat.to(dtype)
        elif flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        part = _product(flat)
        gram = part if gram is None else gram + part
    assert gram is not None
    return gram


def _product(flat: Tensor) -> Tensor:
    """``flat flat^T`` in float64: float32 products over :data:`CHUNK` columns summed in float64."""
    k, p = flat.shape
    if flat.dtype == torch.float64 or p <= CHUNK:
        return (flat @ flat.T).to(torch.float64)
    n = p // CHUNK
    main = flat[:, : n * CHUNK].reshape(k, n, CHUNK).transpose(0, 1)  # (n, K, CHUNK), a view
    out = torch.bmm(main, main.transpose(1, 2)).to(torch.float64).sum(dim=0)
    if p > n * CHUNK:
        rest = flat[:, n * CHUNK :]
        out = out + (rest @ rest.T).to(torch.float64)
    return out


def rounding_of(dtype: torch.dtype) -> float:
    """The rounding of a Gram of rows of ``dtype`` formed in that dtype (float32 at least)."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def gram_rounding(
    jacobians: Sequence[Optional[Tensor]],
    blocks: Sequence[Sequence[int]],
    factor_dtypes: Dict[int, torch.dtype],
) -> Tensor:
    """``(B,)`` float64: the precision of each block's rows, ``ctx.rounding``.

    Relative to ``||g_i|| ||g_j||`` (see
    :class:`~multitask_optim.aggregators.AggregationContext`): the unit roundoff of the
    rows' dtype, float32's for float32, float16 and bfloat16 rows (whose Grams are
    accumulated in float32 at least), :data:`EXACT` for float64 rows.
    ``factor_dtypes`` gives the dtype of each factored position's rows.
    """
    out: List[float] = []
    for block in blocks:
        dtypes = [jacobians[p].dtype for p in block if jacobians[p] is not None]  # type: ignore[union-attr]
        dtypes += [factor_dtypes[p] for p in block if p in factor_dtypes]
        out.append(max([rounding_of(d) for d in dtypes] + [EXACT]))
    return torch.tensor(out, dtype=torch.float64)


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


#: The factored Gram forms ``(X X^T) delta_j`` for this many bytes of tasks at a time.
_GRAM_CHUNK_BYTES = 16 * 2**20


def factor_gram(inputs: Tensor, deltas: Union[Tensor, Sequence[Tensor]], dtype: torch.dtype) -> Tensor:
    """``G_ij = <delta_i, (X X^T) delta_j>``, the product ``(X X^T) delta_j`` formed for
    :data:`_GRAM_CHUNK_BYTES` of tasks at a time (bounded memory: a ``K x N x out``
    temporary would match the deltas' own size).

    ``deltas`` is one ``(K, N, out)`` tensor, or its parts (``(K_p, N, out)`` each, tasks
    end to end: no copy of the whole is made).
    """
    x = inputs.to(dtype)
    a = x @ x.T
    parts = [deltas] if isinstance(deltas, Tensor) else list(deltas)
    rows = [p.reshape(p.shape[0], -1).to(dtype) for p in parts]
    step = max(1, _GRAM_CHUNK_BYTES // max(1, rows[0][0].numel() * rows[0].element_size()))
    cols = []
    for part in parts:
        for chunk in part.split(step):
            mixed = (a @ chunk.to(dtype)).reshape(chunk.shape[0], -1)
            cols.append(torch.cat([r @ mixed.T for r in rows]))
    return torch.cat(cols, dim=1)
