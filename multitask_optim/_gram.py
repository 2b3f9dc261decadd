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
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ._host import finite_values, host_stage, to_host

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


@dataclass
class GramPart:
    """One contribution to a block's Gram, formed on the rows' device (no host read).

    The host checks the fetched value (:func:`settle`): a value formed in float32 whose
    entries overflowed, or whose diagonal lost a row that is not zero, is recomputed in
    float64 by ``exact``, at the cost of one more host read (rare: a squared row norm
    beyond float32's range).

    Attributes:
        block: the block the contribution belongs to.
        value: ``(K, K)`` float64 on the rows' device.
        dtype: the dtype its products were formed in (float64: exact, never checked).
        exact: the float64 recomputation (None: ``value`` is final).
        peaks: ``(K,)`` largest magnitude of each task's rows (device), read only to
            tell a zero row from a lost tiny one.
    """

    block: int
    value: Tensor
    dtype: torch.dtype = torch.float64
    exact: Optional[Callable[[], Tensor]] = None
    peaks: Optional[Callable[[], Tensor]] = None


def dense_parts(jacobians: Sequence[Optional[Tensor]], blocks: Sequence[Sequence[int]]) -> List[GramPart]:
    """Every block's Gram contribution from its dense rows (on their device, no host read)."""
    parts: List[GramPart] = []
    for b, block in enumerate(blocks):
        rows = [jacobians[p] for p in block if jacobians[p] is not None]
        rows = [r for r in rows if r.numel()]  # an empty shard (FSDP2) has no entries
        if not rows:
            continue
        value = _gram(rows)
        if _small(rows) or rows[0].dtype == torch.float64:
            parts.append(GramPart(b, value))
            continue
        parts.append(
            GramPart(
                b,
                value,
                torch.promote_types(rows[0].dtype, torch.float32),
                exact=lambda rows=rows: _gram(rows, torch.float64),
                peaks=lambda rows=rows: _row_peaks(rows),
            )
        )
    return parts


def _row_peaks(rows: Sequence[Tensor]) -> Tensor:
    return torch.stack([r.reshape(r.shape[0], -1).abs().amax(dim=1) for r in rows]).amax(dim=0)


def suspect(value: Tensor, dtype: torch.dtype) -> bool:
    """Whether a fetched float32-formed Gram contribution may be imprecise (host values only)."""
    if dtype == torch.float64:
        return False
    info = torch.finfo(torch.promote_types(dtype, torch.float32))
    if not finite_values(value):
        return True
    return bool((value.diagonal() < info.tiny / info.eps).any())


def settle(part: GramPart, value: Tensor) -> Tensor:
    """The final float64 value of a suspect part: **one more host read** (and a float64
    recomputation when the float32 one overflowed or lost a tiny non-zero row)."""
    assert part.exact is not None and part.peaks is not None
    info = torch.finfo(torch.promote_types(part.dtype, torch.float32))
    with host_stage():
        finite = bool(torch.isfinite(value).all())
    if finite:
        peaks = to_host(part.peaks())
        with host_stage():
            if not bool(((peaks > 0) & (value.diagonal() < info.tiny / info.eps)).any()):
                return value
    return to_host(part.exact().to(torch.float64))


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


def _pow2(peak: Tensor) -> Tensor:
    """``2^-e`` with ``e = floor(log2(peak))`` (within float32's exponent range; 1 where
    ``peak`` is 0 or not finite): ``peak * scale`` lies in ``[1, 2)``, and multiplying by
    it is exact."""
    peak = peak.to(torch.float64)
    safe = torch.where(torch.isfinite(peak) & (peak > 0), peak, torch.ones_like(peak))
    return torch.exp2(-torch.floor(torch.log2(safe)).clamp(-126.0, 126.0))


def scaled_factor_gram(inputs: Tensor, parts: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """:func:`factor_gram` in ``dtype`` that neither overflows nor underflows (on the device).

    The inputs and every task's output gradients are first multiplied by a power of two
    that brings their largest entry into ``[1, 2)``, and the float64 result is divided by
    the same powers: in the normal range of ``dtype`` that is bitwise the unscaled
    product (scaling by a power of two is exact), and a task's rows of ``1e-30`` or
    ``1e25`` stay accurate where an unscaled float32 product loses or overflows them --
    with no host read to find out (the walk drops the gradients right after).
    """
    if dtype == torch.float64:
        return factor_gram(inputs, list(parts), dtype)
    x_scale = _pow2(inputs.abs().amax()).to(dtype)
    scales = [_pow2(p.abs().amax(dim=tuple(range(1, p.dim())))).to(dtype) for p in parts]
    x = inputs.to(dtype) * x_scale
    a = x @ x.T
    # every task's rows at its power of two, formed once (a transient copy of the output
    # gradients: scaling them again for every chunk cost a fifth of a K = 40 MLP step)
    rows = [p.reshape(p.shape[0], -1).to(dtype) * s.view(-1, 1) for p, s in zip(parts, scales)]
    step = max(1, _GRAM_CHUNK_BYTES // max(1, rows[0][0].numel() * rows[0].element_size()))
    cols = []
    for part, part_rows in zip(parts, rows):
        for chunk in part_rows.split(step):
            mixed = (a @ chunk.reshape(chunk.shape[0], *part.shape[1:])).reshape(chunk.shape[0], -1)
            cols.append(torch.cat([r @ mixed.T for r in rows]))
    gram = torch.cat(cols, dim=1).to(torch.float64)
    s = torch.cat(scales).to(torch.float64)
    return gram / (s.view(-1, 1) * s.view(1, -1) * x_scale.to(torch.float64).square())
