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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._distributed import all_average, all_sum
from ._gram import dense_grams, factor_gram, gram_rounding, precise_gram
from .aggregators.base import Shards

Rows = List[Optional[Tensor]]

#: Coefficients below this are rescaled before combining (see :meth:`TaskGradients.combine`).
_TINY_COEF = 2.0**-60


@dataclass
class LinearFactor:
    """The Jacobian of a shared linear map ``Y = X W^T (+ b)``, kept factored.

    Row ``i`` of the weight's Jacobian is ``deltas[i]^T inputs`` and of the bias'
    ``deltas[i].sum(0)``; its Gram contribution is ``<delta_i, (X X^T) delta_j>`` and its
    update for coefficients ``c`` is ``(sum_i c_i delta_i)^T X``: no ``K x P`` buffer.

    Attributes:
        weight: position of ``W`` in the shared parameter list.
        bias: position of ``b`` (None without a bias).
        inputs: ``X``, shape ``(N, in)``.
        deltas: per-task output gradients, shape ``(K, N, out)``.
    """

    weight: int
    bias: Optional[int]
    inputs: Tensor
    deltas: Tensor

    def positions(self) -> List[int]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def gram_dtype(self) -> torch.dtype:
        """The dtype of the rows this factor stands for (their precision)."""
        return self.deltas.dtype

    def tensors(self) -> List[Tensor]:
        return [self.deltas]

    def scaled(self, factors: Tensor) -> LinearFactor:
        k = factors.shape[0]
        scale = factors.to(dtype=self.deltas.dtype, device=self.deltas.device).view(k, 1, 1)
        return LinearFactor(self.weight, self.bias, self.inputs, self.deltas * scale)

    def rows(self) -> Dict[int, Tensor]:
        """The explicit Jacobian rows, by shared position."""
        x = self.inputs.to(self.deltas.dtype)
        out = {self.weight: torch.einsum("kno,ni->koi", self.deltas, x)}
        if self.bias is not None:
            out[self.bias] = self.deltas.sum(dim=1)
        return out

    def gram(self, position: int) -> Tensor:
        """Float64 ``(K, K)`` Gram contribution of the weight or the bias."""
        if position == self.bias:
            sums = self.deltas.sum(dim=1).to(torch.float64)
            return sums @ sums.T
        dtype = torch.promote_types(self.inputs.dtype, torch.float32)
        return precise_gram(lambda d: factor_gram(self.inputs, self.deltas, d), dtype)

    def update(self, position: int, coefs: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        """``J^T c`` for the weight or the bias, computed in ``dtype`` (None: the deltas')."""
        d = self.deltas if dtype is None else self.deltas.to(dtype)
        c = coefs.to(device=d.device, dtype=d.dtype)
        mixed = torch.tensordot(c, d, dims=1)  # (N, out)
        out = mixed.sum(dim=0) if position == self.bias else mixed.T @ self.inputs.to(d.dtype)
        return out.to(self.deltas.dtype)


@dataclass
class HeadFactor:
    """Representation rows kept factored: heads that start with a linear map of ``z``.

    When every head reads the representation ``z`` (``N x D``) only through linear
    maps ``z M_a`` (``nn.Linear``, ``F.linear``, ``z @ W``), task ``i``'s row is
    ``Z_i = sum_a delta_a M_a^T`` over its maps ``a``, with ``delta_a`` (``N x o_a``) the
    gradient at the map's output. Concatenating the maps' columns (``O = sum_a o_a``)::

        <Z_i, Z_j> = sum over columns a of i, b of j of (Delta^T Delta)_ab (M^T M)_ab
        sum_i c_i Z_i = (Delta diag(c[owner])) M^T

    so no ``K x N x D`` buffer is formed: the Gram costs ``(N + D) O^2`` and the update
    one ``N x O x D`` product.

    Attributes:
        deltas: ``Delta``, ``(N, O)``.
        maps: ``M``, ``(D, O)``.
        owner: ``(O,)`` long, the task of every column.
        num_tasks: ``K``.
    """

    deltas: Tensor
    maps: Tensor
    owner: Tensor
    num_tasks: int

    def positions(self) -> List[int]:
        return [0]

    def gram_dtype(self) -> torch.dtype:
        return self.deltas.dtype  # the rows' precision (the Gram itself is formed in float64)

    def tensors(self) -> List[Tensor]:
        return [self.deltas]

    def scaled(self, factors: Tensor) -> HeadFactor:
        scale = factors.to(dtype=self.deltas.dtype, device=self.deltas.device)[
            self.owner.to(self.deltas.device)
        ]
        return replace(self, deltas=self.deltas * scale)

    def _onehot(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        owner = self.owner.to(device)
        return torch.nn.functional.one_hot(owner, self.num_tasks).to(dtype)  # (O, K)

    def rows(self) -> Dict[int, Tensor]:
        """The explicit rows ``Z`` (``K x N x D``)."""
        s = self._onehot(self.deltas.dtype, self.deltas.device)
        return {0: torch.einsum("no,ok,do->knd", self.deltas, s, self.maps.to(self.deltas.dtype))}

    def gram(self, position: int) -> Tensor:
        """Float64 ``(K, K)`` Gram of the rows, on the CPU.

        The two ``O x O`` products are formed in the rows' dtype (float32 at least), as
        the dense rows' Gram is, and recomputed in float64 when that overflows or loses
        a small row (:func:`~._gram.precise_gram`): in float64 they would cost twice the
        time of the dense path's Gram on most hardware.
        """
        dtype = torch.promote_types(self.deltas.dtype, torch.float32)
        return precise_gram(self._gram, dtype).cpu()

    def _gram(self, dtype: torch.dtype) -> Tensor:
        d, m = self.deltas.to(dtype), self.maps.to(device=self.deltas.device, dtype=dtype)
        return head_gram(d, m, self._onehot(dtype, d.device))

    def update(self, position: int, coefs: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        """``sum_i c_i Z_i`` (``N x D``) computed in ``dtype`` (None: the deltas')."""
        d = self.deltas if dtype is None else self.deltas.to(dtype)
        c = coefs.to(device=d.device, dtype=d.dtype)[self.owner.to(d.device)]
        return ((d * c) @ self.maps.to(d.dtype).T).to(self.deltas.dtype)


#: Columns per block of :func:`head_gram`'s ``O x O`` products.
HEAD_BLOCK = 128


def head_gram(deltas: Tensor, maps: Tensor, onehot: Tensor) -> Tensor:
    """``S^T ((Delta^T Delta) * (M^T M)) S`` (see :class:`HeadFactor`), in the inputs' dtype.

    Both ``O x O`` products are symmetric: with ``c`` blocks of about :data:`HEAD_BLOCK`
    columns only the blocks on and above the diagonal are formed, ``(c + 1) / 2c`` of
    the work (the products of the mirrored blocks are each other's transposes).
    """
    o = deltas.shape[1]
    count = max(1, o // HEAD_BLOCK)
    bounds = [o * b // count for b in range(count + 1)]
    cols = [slice(bounds[b], bounds[b + 1]) for b in range(count)]
    gram: Optional[Tensor] = None
    for a, ca in enumerate(cols):
        for b in range(a, count):
            cb = cols[b]
            inner = (deltas[:, ca].T @ deltas[:, cb]) * (maps[:, ca].T @ maps[:, cb])
            part = onehot[ca].T @ inner @ onehot[cb]
            part = part if b == a else part + part.T
            gram = part if gram is None else gram + part
    assert gram is not None
    return gram


@dataclass
class GramFactor:
    """Shared parameters whose rows were reduced to their Gram as the gradient walk passed them.

    With many tasks the per-task output gradients of every linear layer (``K x N x out``
    each, :class:`LinearFactor`) would be held until the update: here each layer's
    Gram contribution is formed as soon as its K output gradients are complete and they
    are dropped (:func:`._native.trunk_backward`). The update ``J^T c`` is then one
    backward of ``sum_i c_i L_i`` (``solve``): exact, one backward pass more, bounded memory.
    The update is computed in the parameters' dtype (no float64 recomputation).

    Attributes:
        grams: per shared position, its float64 ``(K, K)`` Gram contribution (CPU).
        solve: coefficients ``(K,)`` float64 -> the update of every position in ``grams``
            (callable once: its backward frees the graph).
        factors: per-task factors applied by :meth:`scaled` (float64 ``(K,)``; None: ones).
        dtype: the dtype of the rows (the parameters'), their precision.
    """

    grams: Dict[int, Tensor]
    solve: Callable[[Tensor], Dict[int, Tensor]]
    factors: Optional[Tensor] = None
    dtype: torch.dtype = torch.float32
    _done: Optional[Tuple[Tensor, Dict[int, Tensor]]] = field(default=None, repr=False)

    def positions(self) -> List[int]:
        return sorted(self.grams)

    def gram_dtype(self) -> torch.dtype:
        return self.dtype  # the rows' precision (their Grams are float64)

    def tensors(self) -> List[Tensor]:
        return list(self.grams.values())  # NaN and inf in the gradients reach the Gram

    def scaled(self, factors: Tensor) -> GramFactor:
        f = factors.to(torch.float64).cpu()
        grams = {p: g * (f.view(-1, 1) * f.view(1, -1)) for p, g in self.grams.items()}
        return GramFactor(grams, self.solve, f if self.factors is None else self.factors * f, self.dtype)

    def rows(self) -> Dict[int, Tensor]:
        raise RuntimeError("the rows of these layers were reduced to their Gram during the step and are gone")

    def gram(self, position: int) -> Tensor:
        return self.grams[position]

    def update(self, position: int, coefs: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        """``J^T c`` of ``position``; the backward runs once, for the first coefficients given.

        The backward runs with the coefficients divided by the sum of their magnitudes:
        every gradient it forms is then a convex combination of the tasks' own (at the
        losses' magnitude, a loss scale in effect: no overflow where no task overflows,
        tiny coefficients stay normal); the results are multiplied back once.
        """
        c = coefs.detach().to(torch.float64).cpu()
        if self._done is None:
            self._done = (c, self._solve(c if self.factors is None else c * self.factors))
        elif not torch.equal(self._done[0], c):
            raise RuntimeError("a GramFactor's update is computed once, for one set of coefficients")
        return self._done[1][position]

    def _solve(self, coefs: Tensor) -> Dict[int, Tensor]:
        peak = float(coefs.abs().sum())
        if peak == 0.0 or not math.isfinite(peak):
            return self.solve(coefs)
        out = self.solve(coefs / peak)
        return {
            p: u.mul_(peak) if peak >= torch.finfo(u.dtype).tiny else _rescaled(u, peak)
            for p, u in out.items()
        }


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


def _rescaled(update: Tensor, factor: float) -> Tensor:
    """``update * factor`` with the factor in float64 (a float32 scalar would flush it to 0)."""
    return (update.to(torch.float64) * factor).to(update.dtype)


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
    by_device: Dict[torch.device, List[Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append(t.detach())
    for group in by_device.values():
        small = [t for t in group if t.numel() < _FUSED_BELOW]
        sums = [t.sum() for t in group if t.numel() >= _FUSED_BELOW]
        if small:
            sums.extend(torch._foreach_norm(small, 1))
        if all(math.isfinite(v) for v in torch.stack(sums).tolist()):  # stack promotes: exact
            continue
        extremes = [e.double() for t in group for e in torch.aminmax(t)]
        if not all(math.isfinite(v) for v in torch.stack(extremes).tolist()):
            return False
    return True
