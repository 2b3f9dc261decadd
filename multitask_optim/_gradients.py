"""Per-task gradients of one step, and their algebra.

:class:`TaskGradients` holds what the gather stage computed: for every shared
parameter its ``(K, *shape)`` Jacobian rows, for every task the gradients of its own
parameters, and the shared linear layers kept *factored* (:class:`LinearFactor`). Every
operation the later stages need is a method here -- scale, add, densify, all-finite,
Gram per block, combine with coefficients, average across ranks -- so the factored
form lives in this one file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._combine import CombinePlan
from ._distributed import all_average, all_sum
from ._factors import GramFactor, HeadFactor, LinearFactor, _rescaled
from ._gram import GramPart, dense_grams, dense_parts, gram_rounding
from ._host import by_device, host_stage, peak_magnitudes, to_host
from .aggregators.base import Shards

Rows = List[Optional[Tensor]]

#: Coefficients below this are rescaled before combining (see :meth:`TaskGradients.combine`).
_TINY_COEF = 2.0**-60


@dataclass
class TaskGradients:
    """Per-task gradients of one step (or of accumulated micro-batches).

    Attributes:
        shared: per shared parameter, its ``(K, *shape)`` Jacobian; None if no loss
            reached it or if a factor holds it.
        tasks: per task, the gradients of its own parameters (None where unreached).
        factors: factored Jacobians of shared linear layers.
    """

    shared: Rows
    tasks: List[List[Optional[Tensor]]]
    factors: List[Union[LinearFactor, HeadFactor, GramFactor]] = field(default_factory=list)

    #: Whether these are one rank's shards (FSDP2): a local check then needs every rank's vote.
    sharded: ClassVar[bool] = False

    @classmethod
    def empty(cls, num_shared: int, task_sizes: Sequence[int]) -> TaskGradients:
        return cls([None] * num_shared, [[None] * n for n in task_sizes])

    def tensors(self) -> List[Tensor]:
        """Every gradient tensor (for finiteness checks and collectives)."""
        out = [j for j in self.shared if j is not None]
        out += [g for t in self.tasks for g in t if g is not None]
        out += [t for f in self.factors for t in f.tensors()]
        return out

    def all_finite(self) -> bool:
        return all_finite(self.tensors())

    def scaled(self, factors: Sequence[float]) -> TaskGradients:
        """Task ``i``'s gradients (rows, deltas, own parameters) times ``factors[i]``."""
        k = len(factors)
        vector = torch.tensor(factors, dtype=torch.float64)
        shared: Rows = []
        for j in self.shared:
            if j is None:
                shared.append(None)
                continue
            work = j.to(torch.float64) if _below_normal(factors, j.dtype) else j
            scale = vector.to(dtype=work.dtype, device=j.device).view(k, *([1] * (j.dim() - 1)))
            shared.append((work * scale).to(j.dtype))
        tasks = [
            task if f == 1.0 else [None if g is None else scaled_grad(g, f) for g in task]
            for task, f in zip(self.tasks, factors)
        ]
        return replace(self, shared=shared, tasks=tasks, factors=[f.scaled(vector) for f in self.factors])

    def dense(self) -> TaskGradients:
        """The same gradients with every factored layer turned into explicit rows."""
        if not self.factors:
            return self
        rows = list(self.shared)
        for f in self.factors:
            for pos, r in f.rows().items():
                prev = rows[pos]
                rows[pos] = r if prev is None else prev + r
        return TaskGradients(rows, self.tasks, [])

    def __add__(self, other: TaskGradients) -> TaskGradients:
        """The sum of two micro-batches' gradients (factors are densified: bounded memory)."""
        a, b = self.dense(), other.dense()
        return TaskGradients(
            _add_lists(a.shared, b.shared), [_add_lists(x, y) for x, y in zip(a.tasks, b.tasks)]
        )

    def with_shared(self, shared: Rows) -> TaskGradients:
        return replace(self, shared=list(shared))

    def agree(self, ok: bool) -> bool:
        """Whether a check of these gradients holds everywhere: ``ok`` itself here; sharded
        gradients (:mod:`.fsdp`) ask every rank, since each checked only its shards."""
        return ok

    def grams(self, blocks: Sequence[Sequence[int]], num_tasks: int) -> Tensor:
        """Gram matrices ``G_b = J_b J_b^T`` of every block, ``(B, K, K)`` float64 on the CPU."""
        out = dense_grams(self.shared, blocks, num_tasks)
        block_of = {p: b for b, block in enumerate(blocks) for p in block}
        for f in self.factors:
            for pos in f.positions():
                if pos in block_of:
                    out[block_of[pos]] += f.gram(pos).cpu()
        return out

    def gram_parts(self, blocks: Sequence[Sequence[int]]) -> List[GramPart]:
        """Every block's Gram contributions, formed on the rows' device (no host read)."""
        parts = dense_parts(self.shared, blocks)
        block_of = {p: b for b, block in enumerate(blocks) for p in block}
        for f in self.factors:
            for pos in f.positions():
                if pos in block_of:
                    parts.append(f.gram_part(pos, block_of[pos]))
        return parts

    def probes(self) -> List[Tuple[str, Tensor]]:
        """Device tensors the host reads to check what the Grams do not cover (no host read).

        ``task_peaks``: the largest magnitude of every own-parameter gradient (NaN or inf
        there means a non-finite gradient; the weights' overflow is bounded from them);
        ``factor<n>``: each factored layer's :meth:`peaks`. The shared rows' finiteness
        is their Gram's (a non-finite entry makes its diagonal non-finite).
        """
        out: List[Tuple[str, Tensor]] = []
        grads = [g for task in self.tasks for g in task if g is not None and g.numel()]
        for n, group in enumerate(by_device(grads).values()):
            out.append((f"task_peaks{n}", peak_magnitudes(group)))
        for n, f in enumerate(self.factors):
            peaks = f.peaks()
            if peaks is not None:
                out.append((f"factor{n}", peaks))
        return out

    def task_peaks(self, fetched: Dict[str, Tensor]) -> List[float]:
        """Per task, the largest own-parameter gradient entry (host values from :meth:`probes`)."""
        owners: Dict[torch.device, List[int]] = {}
        for i, task in enumerate(self.tasks):
            for g in task:
                if g is not None and g.numel():
                    owners.setdefault(g.device, []).append(i)
        out = [0.0] * len(self.tasks)
        with host_stage():
            for n, tasks in enumerate(owners.values()):
                for i, v in zip(tasks, fetched[f"task_peaks{n}"].tolist()):
                    out[i] = v if not math.isfinite(v) else max(out[i], v)
        return out

    def bounds(
        self, gram: Tensor, blocks: Sequence[Sequence[int]], fetched: Dict[str, Tensor]
    ) -> List[List[float]]:
        """Per block and task, a bound on any value combining that task's rows forms (host).

        ``gram`` is the host Gram of these rows (``sqrt(G_ii)`` bounds every entry of row
        ``i``); a factored layer adds the bound of its own intermediates."""
        with host_stage():
            out = [[math.sqrt(max(v, 0.0)) for v in g.diagonal().tolist()] for g in gram]
            block_of = {p: b for b, block in enumerate(blocks) for p in block}
            for n, f in enumerate(self.factors):
                if f"factor{n}" not in fetched:
                    continue
                own = f.bounds(fetched[f"factor{n}"].tolist())
                for b in {block_of[p] for p in f.positions() if p in block_of}:
                    out[b] = [max(x, y) for x, y in zip(out[b], own)]
        return out

    def combine_planned(self, blocks: Sequence[Sequence[int]], plan: CombinePlan) -> Tuple[Rows, bool]:
        """Shared updates ``J_b^T c_b`` as the host planned them (:mod:`._combine`), and
        whether they are finite: known without a host read unless ``plan.checked`` is False."""
        dtype = torch.float64 if plan.wide else None
        out = self._combine(blocks, plan.mix, dtype)
        if plan.scale is not None:
            block_of = {p: b for b, block in enumerate(blocks) for p in block}
            out = [None if u is None else _rescaled(u, plan.scale[block_of[i]]) for i, u in enumerate(out)]
        if plan.checked:
            return out, True
        return out, all_finite([u for u in out if u is not None])  # one more host read (rare)

    def like(self) -> Optional[torch.dtype]:
        """The dtype of the rows (None: no rows at all)."""
        like = next((j for j in self.shared if j is not None), None)
        if like is None:
            like = next((f.deltas for f in self.factors if isinstance(f, (LinearFactor, HeadFactor))), None)
        if like is None:
            return next((f.dtype for f in self.factors if isinstance(f, GramFactor)), None)
        return like.dtype

    def gram_rounding(self, blocks: Sequence[Sequence[int]]) -> Tensor:
        """``(B,)``: the precision of each block's rows (see :func:`._gram.gram_rounding`)."""
        dtypes = {pos: f.gram_dtype() for f in self.factors for pos in f.positions()}
        return gram_rounding(self.shared, blocks, dtypes)

    def combine(self, blocks: Sequence[Sequence[int]], coefs: Tensor) -> Tuple[Rows, bool]:
        """Shared updates ``J_b^T c_b`` per parameter, and whether they are all finite.

        Recomputed in float64 when the parameters' dtype overflows. Tiny coefficients (a
        weight of 1e-42) are scaled by a power of two first and the updates scaled back
        once, so the products stay out of the subnormal range until the last rounding.
        """
        if _has_tiny(coefs):
            peak = coefs.abs().amax(dim=1)
            scale = torch.where(peak > 0, torch.exp2(torch.floor(torch.log2(peak.where(peak > 0, 1.0)))), 1.0)
            block_of = {p: b for b, block in enumerate(blocks) for p in block}
            out, finite = self.combine(blocks, coefs / scale.unsqueeze(1))
            back = [None if u is None else _rescaled(u, float(scale[block_of[i]])) for i, u in enumerate(out)]
            return back, finite and all_finite([u for u in back if u is not None])
        # a coefficient below the rows' normal range (1e-45 next to 1e-15 in float32) would be
        # rounded to a few bits when cast: such blocks are combined in float64
        out = self._combine(blocks, coefs, torch.float64 if self._subnormal(coefs) else None)
        if all_finite([u for u in out if u is not None]):
            return out, True
        out = self._combine(blocks, coefs, torch.float64)
        return out, all_finite([u for u in out if u is not None])

    def _subnormal(self, coefs: Tensor) -> bool:
        like = next((j for j in self.shared if j is not None), None)
        if like is None:
            like = next((f.deltas for f in self.factors if isinstance(f, (LinearFactor, HeadFactor))), None)
        if like is None or like.dtype == torch.float64 or not coefs.numel():
            return False
        return _below_normal(coefs.flatten().tolist(), like.dtype)

    def _combine(self, blocks: Sequence[Sequence[int]], coefs: Tensor, dtype: Optional[torch.dtype]) -> Rows:
        out: Rows = [None] * len(self.shared)
        block_of = {p: b for b, block in enumerate(blocks) for p in block}
        cast: Dict[Tuple[int, torch.device, torch.dtype], Tensor] = {}  # each block's coefficients, once
        for i, rows in enumerate(self.shared):
            if rows is None or i not in block_of:
                continue
            work = rows if dtype is None else rows.to(dtype)
            key = (block_of[i], rows.device, work.dtype)
            if key not in cast:
                cast[key] = coefs[key[0]].to(device=rows.device, dtype=work.dtype)
            update = (cast[key] @ work.reshape(work.shape[0], -1)).view(rows.shape[1:])
            out[i] = update if update.dtype == rows.dtype else update.to(rows.dtype)
        for f in self.factors:
            for pos in f.positions():
                if pos in block_of:
                    out[pos] = f.update(pos, coefs[block_of[pos]], dtype)
        return out

    def block_rows(self, blocks: Sequence[Sequence[int]], like: Sequence[Tensor]) -> List[Tensor]:
        """Per block, the ``(K, P_b)`` rows (flattened, concatenated; zeros where unreached).

        ``like`` are the shared parameters (for the shapes of unreached ones).
        """
        dense = self.dense()
        k = len(self.tasks)
        out = []
        for block in blocks:
            parts = []
            for pos in block:
                j = dense.shared[pos]
                p = like[pos]
                parts.append(
                    j.reshape(k, -1)
                    if j is not None
                    else torch.zeros(k, p.numel(), dtype=p.dtype, device=p.device)
                )
            out.append(torch.cat(parts, dim=1) if parts else torch.zeros(k, 0))
        return out

    def shards(self, blocks: Sequence[Sequence[int]], like: Sequence[Tensor]) -> Shards:
        """Where :meth:`block_rows` sit in the whole rows: here they are whole (sharded
        gradients, :mod:`.fsdp`, say which elements each rank holds)."""
        return Shards()

    def split_updates(
        self, blocks: Sequence[Sequence[int]], updates: Sequence[Tensor], like: Sequence[Tensor]
    ) -> Rows:
        """Per-parameter updates from per-block flat updates (None where no loss reached)."""
        out: Rows = [None] * len(self.shared)
        reached = self.dense().shared
        for block, flat in zip(blocks, updates):
            offset = 0
            for pos in block:
                numel = like[pos].numel()
                if reached[pos] is not None:
                    out[pos] = flat[offset : offset + numel].view_as(like[pos])
                offset += numel
        return out

    def reindex(self, src: Sequence[int], dst: Sequence[int], sizes: Sequence[int]) -> TaskGradients:
        """The rows laid out for the tasks ``dst`` instead of ``src`` (task indices).

        A task of ``dst`` that ``src`` lacks gets zero rows and no own-parameter
        gradients; ``sizes[t]`` is the number of own parameters of task ``t``.
        """
        src, dst = list(src), list(dst)
        if src == dst:
            return self
        grads = self.dense()
        position = {t: n for n, t in enumerate(src)}
        if all(t in position for t in dst):
            index = torch.tensor([position[t] for t in dst], dtype=torch.long)
            shared = [None if j is None else j.index_select(0, index.to(j.device)) for j in grads.shared]
        else:
            kept = [n for n, t in enumerate(dst) if t in position]
            source = torch.tensor([position[dst[n]] for n in kept], dtype=torch.long)
            target = torch.tensor(kept, dtype=torch.long)
            shared = []
            for j in grads.shared:
                if j is None:
                    shared.append(None)
                    continue
                out = j.new_zeros((len(dst), *j.shape[1:]))
                shared.append(out.index_copy(0, target.to(j.device), j.index_select(0, source.to(j.device))))
        tasks = [list(grads.tasks[position[t]]) if t in position else [None] * sizes[t] for t in dst]
        return TaskGradients(shared, tasks)

    def averaged(self, values: Tensor) -> Tuple[TaskGradients, Tensor]:
        """Gradients and loss values averaged across ranks (one bucketed collective)."""
        grads = self.dense()
        like = next(iter(grads.tensors()), None)
        head = values if like is None else values.to(like.device, like.dtype)
        reduced = iter(all_average([head, *grads.tensors()]))
        new_values = next(reduced).to(torch.float64).cpu()
        shared = [None if j is None else next(reduced) for j in grads.shared]
        tasks = [[None if g is None else next(reduced) for g in task] for task in grads.tasks]
        return TaskGradients(shared, tasks), new_values


def _below_normal(factors: Sequence[float], dtype: torch.dtype) -> bool:
    """Whether a non-zero factor is below ``dtype``'s smallest normal (not representable)."""
    if dtype == torch.float64:
        return False
    tiny = torch.finfo(dtype).tiny
    return any(f != 0.0 and abs(f) < tiny for f in factors)


def _has_tiny(coefs: Tensor) -> bool:
    """Whether some block's largest coefficient is non-zero but below :data:`_TINY_COEF`."""
    if not coefs.numel():
        return False
    if coefs.numel() <= 256 and coefs.device.type == "cpu":  # a handful of numbers: no tensor ops
        return any(0.0 < max(abs(c) for c in row) < _TINY_COEF for row in coefs.tolist())
    peak = coefs.abs().amax(dim=1)
    return bool(((peak > 0) & (peak < _TINY_COEF)).any())


def scaled_grad(grad: Tensor, factor: float) -> Tensor:
    """``grad * factor``; a factor ``dtype`` cannot represent (1e-42 in float32) is
    applied in float64 and the product rounded once."""
    if not _below_normal([factor], grad.dtype):
        return grad * factor
    return (grad.to(torch.float64) * factor).to(grad.dtype)


def reduce_tasks(
    grads: TaskGradients,
    values: Tensor,
    present: Sequence[int],
    weights: Sequence[float],
    shared_like: Sequence[Tensor],
    task_like: Sequence[Sequence[Tensor]],
) -> Tuple[TaskGradients, Tensor, Tuple[int, ...]]:
    """Each task's gradients and loss averaged over the ranks that had it (one collective).

    Every rank lays its tasks out over all ``K`` tasks (zeros for the tasks it lacks, and
    for a parameter its losses did not reach, with a flag saying so), multiplies task
    ``i``'s rows by its weight ``s_i`` on this rank (1, or its sample count), and one
    bucketed ``all_reduce`` sums them together with the values, the weights and the
    flags. Task ``i``'s average is then ``sum_r s_ir g_ir / sum_r s_ir``: with every task
    on every rank and unit weights, the plain average over ranks.

    Args:
        grads: this rank's gradients of its ``present`` tasks.
        values: their ``(K',)`` float64 loss values.
        present: indices of this rank's tasks among the ``K``.
        weights: this rank's weight of each of its tasks.
        shared_like: the shared parameters (shapes of unreached ones).
        task_like: every task's own parameters.

    Returns:
        ``(gradients, values, present)`` over the tasks some rank had, in task order.
    """
    k = len(task_like)
    full = grads.dense().reindex(present, range(k), [len(t) for t in task_like])
    s = torch.zeros(k, dtype=torch.float64)
    s[list(present)] = torch.tensor(list(weights), dtype=torch.float64)
    vals = torch.zeros(k, dtype=torch.float64)
    vals[list(present)] = values.to(torch.float64)
    ones = bool((s[list(present)] == 1.0).all())
    shared = [
        torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) if j is None else j
        for j, p in zip(full.shared, shared_like)
    ]
    tasks = [
        [torch.zeros_like(p) if g is None else g for g, p in zip(task, like)]
        for task, like in zip(full.tasks, task_like)
    ]
    if not ones:
        shared = [j * s.to(j.dtype).view(k, *([1] * (j.dim() - 1))) for j in shared]
        tasks = [[g * float(s[i]) for g in task] for i, task in enumerate(tasks)]
    flags = [1.0 if j is not None else 0.0 for j in full.shared]
    flags += [1.0 if g is not None else 0.0 for task in full.tasks for g in task]
    like = shared[0] if shared else next((g for task in tasks for g in task), values)
    head = torch.cat([vals * s, s, torch.tensor(flags, dtype=torch.float64)]).to(like.device, like.dtype)
    reduced = all_sum([head, *shared, *[g for task in tasks for g in task]])
    head = reduced[0].to(torch.float64).cpu()
    totals = head[k : 2 * k]
    reached = iter((head[2 * k :] > 0).tolist())
    safe = torch.where(totals > 0, totals, 1.0)
    rest = iter(reduced[1:])
    new_shared: Rows = []
    for _ in shared:
        j = next(rest)
        new_shared.append(j / safe.to(j.dtype).view(k, *([1] * (j.dim() - 1))) if next(reached) else None)
    new_tasks = []
    for i, task in enumerate(tasks):
        row = []
        for _ in task:
            g = next(rest)
            row.append(g / float(safe[i]) if next(reached) else None)
        new_tasks.append(row)
    union = tuple(i for i in range(k) if totals[i] > 0)
    out = TaskGradients(new_shared, new_tasks).reindex(range(k), union, [len(t) for t in task_like])
    return out, (head[:k] / safe)[list(union)], union


def _add_lists(a: Sequence[Optional[Tensor]], b: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    return [x if y is None else (y if x is None else x + y) for x, y in zip(a, b)]


#: Tensors below this many elements are checked together in one fused call.
_FUSED_BELOW = 1 << 16


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host sync per device.

    A sum is finite only if every summand is (NaN and inf propagate; finite values can
    only overflow), so a finite sum proves a tensor finite: large tensors are summed
    (one bandwidth-bound pass), small ones take one fused ``_foreach_norm`` call. Only
    when some sum is not finite -- a non-finite element, or finite values whose sum
    overflows -- are the tensors checked exactly, one min/max pass each.
    """
    for group in by_device([t for t in tensors if t.numel()]).values():
        small = [t for t in group if t.numel() < _FUSED_BELOW]
        sums = [t.sum() for t in group if t.numel() >= _FUSED_BELOW]
        if small:
            sums.extend(torch._foreach_norm(small, 1))
        with host_stage():  # a declared read (to_host), then host values
            if all(math.isfinite(v) for v in to_host(torch.stack(sums)).tolist()):  # stack promotes: exact
                continue
        extremes = [e.double() for t in group for e in torch.aminmax(t)]
        with host_stage():
            if not all(math.isfinite(v) for v in to_host(torch.stack(extremes)).tolist()):
                return False
    return True
