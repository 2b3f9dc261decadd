"""Shared linear layers kept factored: their Jacobian rows are never formed.

- :class:`LinearFactor`: a shared linear map's weight and bias, from its input and the
  per-task output gradients;
- :class:`HeadFactor`: representation mode's rows when every head starts with a linear
  map of ``z``;
- :class:`GramFactor`: layers whose rows the native walk reduced to their Gram as it
  passed them (many tasks), the update being one more backward.

Each gives its Gram contribution (on the rows' device), its update for coefficients, and
bounds on the magnitudes its update computation can reach (so the host can decide,
before combining, whether the parameters' dtype can overflow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._gram import GramPart, factor_gram, precise_gram
from ._host import host_stage, peak_magnitudes


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

    def gram_part(self, position: int, block: int) -> GramPart:
        """The weight's or the bias' Gram contribution, formed on the device (see :class:`GramPart`)."""
        if position == self.bias:
            return GramPart(block, self.gram(position))
        dtype = torch.promote_types(self.inputs.dtype, torch.float32)
        value = factor_gram(self.inputs, self.deltas, dtype).to(torch.float64)
        if dtype == torch.float64:
            return GramPart(block, value)
        k = self.deltas.shape[0]
        return GramPart(
            block,
            value,
            dtype,
            exact=lambda: factor_gram(self.inputs, self.deltas, torch.float64),
            peaks=lambda: self.deltas.reshape(k, -1).abs().amax(dim=1) * self.inputs.abs().amax(),
        )

    def peaks(self) -> Optional[Tensor]:
        """``(K + 1,)``: each task's largest output gradient, then the largest input (device).

        NaN or inf there means a non-finite gradient; the host bounds the update's
        magnitude from them (:meth:`bounds`)."""
        return torch.cat([self.deltas.abs().amax(dim=(1, 2)), self.inputs.abs().amax().reshape(1)]).to(
            torch.float64
        )

    def bounds(self, peaks: List[float]) -> List[float]:
        """Per task, a bound on ``|c_i|``'s share of any value the update computation forms."""
        n = self.inputs.shape[0]
        spread = max(1.0, n, n * peaks[-1])
        return [p * spread for p in peaks[:-1]]

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
    gradient at the map's output. Concatenating the maps' columns (``O = sum_a o_a``) and
    writing ``W = M^T`` (``O x D``, the stacked weights of ``nn.Linear`` heads)::

        <Z_i, Z_j> = sum over columns a of i, b of j of (Delta^T Delta)_ab (W W^T)_ab
        sum_i c_i Z_i = (Delta diag(c[owner])) W

    so no ``K x N x D`` buffer is formed: the Gram costs ``(N + D) O^2`` (about half of
    it with the symmetry, :func:`head_gram`) and the update one ``N x O x D`` product.

    Attributes:
        deltas: ``Delta``, ``(N, O)``.
        weights: ``W = M^T``, ``(O, D)``, contiguous (one row per column of ``Delta``).
        owner: ``(O,)`` long, the task of every column.
        num_tasks: ``K``.
    """

    deltas: Tensor
    weights: Tensor
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
        return {0: torch.einsum("no,ok,od->knd", self.deltas, s, self.weights.to(self.deltas.dtype))}

    def gram(self, position: int) -> Tensor:
        """Float64 ``(K, K)`` Gram of the rows, on the CPU.

        The two ``O x O`` products are formed in the rows' dtype (float32 at least), as
        the dense rows' Gram is, and recomputed in float64 when that overflows or loses
        a small row (:func:`~._gram.precise_gram`): in float64 they would cost twice the
        time of the dense path's Gram on most hardware.
        """
        dtype = torch.promote_types(self.deltas.dtype, torch.float32)
        return precise_gram(self._gram, dtype).cpu()

    def gram_part(self, position: int, block: int) -> GramPart:
        """The rows' Gram, formed on the device in their dtype (see :class:`GramPart`)."""
        dtype = torch.promote_types(self.deltas.dtype, torch.float32)
        value = self._gram(dtype).to(torch.float64)
        if dtype == torch.float64:
            return GramPart(block, value)
        return GramPart(
            block, value, dtype, exact=lambda: self._gram(torch.float64), peaks=lambda: self._task_peaks()
        )

    def _by_task(self, columns: Tensor) -> Tensor:
        """``(K,)``: the largest of each task's entries of ``columns`` (``(O,)``, non-negative)."""
        out = torch.zeros(self.num_tasks, dtype=columns.dtype, device=columns.device)
        return out.scatter_reduce(0, self.owner.to(columns.device), columns, reduce="amax")

    def _task_peaks(self) -> Tensor:
        return self._by_task(self.deltas.abs().amax(dim=0)) * self.weights.abs().amax()

    def peaks(self) -> Optional[Tensor]:
        """``(K + 2,)``: each task's largest output gradient, the largest of them all (NaN
        when any is: a scatter need not carry NaN on every device), the maps' largest entry."""
        columns = self.deltas.abs().amax(dim=0).to(torch.float64)
        return torch.cat([self._by_task(columns), columns.amax().reshape(1), peak_magnitudes([self.weights])])

    def bounds(self, peaks: List[float]) -> List[float]:
        """Per task, a bound on ``|c_i|``'s share of any value the update computation forms."""
        spread = max(1.0, self.deltas.shape[1] * peaks[-1])
        return [p * spread for p in peaks[: self.num_tasks]]

    def _gram(self, dtype: torch.dtype) -> Tensor:
        d = self.deltas.to(dtype)
        w = self.weights.to(device=d.device, dtype=dtype)
        return head_gram(d, w, self._onehot(dtype, d.device))

    def update(self, position: int, coefs: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        """``sum_i c_i Z_i`` (``N x D``) computed in ``dtype`` (None: the deltas')."""
        d = self.deltas if dtype is None else self.deltas.to(dtype)
        c = coefs.to(device=d.device, dtype=d.dtype)[self.owner.to(d.device)]
        return ((d * c) @ self.weights.to(d.dtype)).to(self.deltas.dtype)


#: Columns per strip of :func:`head_gram`'s ``O x O`` products.
HEAD_BLOCK = 128


def head_gram(deltas: Tensor, weights: Tensor, onehot: Tensor) -> Tensor:
    """``S^T ((Delta^T Delta) * (W W^T)) S`` (see :class:`HeadFactor`), in the inputs' dtype.

    ``deltas`` is ``Delta`` (``N x O``), ``weights`` is ``W`` (``O x D``), ``onehot`` is
    ``S`` (``O x K``). Both ``O x O`` products are symmetric: the columns are cut into
    ``c`` strips of about :data:`HEAD_BLOCK`, and strip ``s`` forms its rows from its own
    first column on (its diagonal block and everything right of it), ``(c + 1) / 2c``
    of the work; the part right of the diagonal block is added with its transpose.
    """
    o = deltas.shape[1]
    count = max(1, o // HEAD_BLOCK)
    bounds = [o * b // count for b in range(count + 1)]
    gram: Optional[Tensor] = None
    for start, stop in zip(bounds, bounds[1:]):
        inner = deltas[:, start:stop].T @ deltas[:, start:]
        inner.mul_(weights[start:stop] @ weights[start:].T)
        left = onehot[start:stop].T
        part = left @ inner[:, : stop - start] @ onehot[start:stop]
        if stop < o:
            right = left @ inner[:, stop - start :] @ onehot[stop:]
            part = part + right + right.T
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
        f = factors.to(torch.float64).cpu()  # host factors (the weights)
        grams = {p: g * (f.view(-1, 1) * f.view(1, -1)).to(g.device) for p, g in self.grams.items()}
        return GramFactor(grams, self.solve, f if self.factors is None else self.factors * f, self.dtype)

    def rows(self) -> Dict[int, Tensor]:
        raise RuntimeError("the rows of these layers were reduced to their Gram during the step and are gone")

    def gram(self, position: int) -> Tensor:
        return self.grams[position]

    def gram_part(self, position: int, block: int) -> GramPart:
        """The contribution the walk formed (float64, never over- or underflowing)."""
        return GramPart(block, self.grams[position])

    def peaks(self) -> Optional[Tensor]:
        """None: the Grams carry every non-finite value, and they bound the update."""
        return None

    def bounds(self, peaks: List[float]) -> List[float]:
        raise NotImplementedError  # the Gram bounds it (see peaks)

    def update(self, position: int, coefs: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        """``J^T c`` of ``position``; the backward runs once, for the first coefficients given.

        The backward runs with the coefficients divided by the sum of their magnitudes:
        every gradient it forms is then a convex combination of the tasks' own (at the
        losses' magnitude, a loss scale in effect: no overflow where no task overflows,
        tiny coefficients stay normal); the results are multiplied back once.
        """
        with host_stage():  # the coefficients are the host stage's (host tensors)
            c = coefs.detach().to(torch.float64).cpu()
            if self._done is not None and not torch.equal(self._done[0], c):
                raise RuntimeError("a GramFactor's update is computed once, for one set of coefficients")
        if self._done is None:
            self._done = (c, self._solve(c if self.factors is None else c * self.factors))
        return self._done[1][position]

    def _solve(self, coefs: Tensor) -> Dict[int, Tensor]:
        with host_stage():
            peak = float(coefs.abs().sum())
        if peak == 0.0 or not math.isfinite(peak):
            return self.solve(coefs)
        out = self.solve(coefs / peak)
        return {
            p: u.mul_(peak) if peak >= torch.finfo(u.dtype).tiny else _rescaled(u, peak)
            for p, u in out.items()
        }


def _rescaled(update: Tensor, factor: float) -> Tensor:
    """``update * factor`` with the factor in float64 (a float32 scalar would flush it to 0)."""
    return (update.to(torch.float64) * factor).to(update.dtype)
