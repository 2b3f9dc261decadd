"""Helpers shared by the second-wave aggregators: ``pref_vector``, non-finite input, and
:class:`GramSolver`, the prologue every Gram method shares."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .base import AggregationContext, Aggregator, State

PrefVector = Union[None, Sequence[float], Tensor]


def check_pref_vector(pref_vector: PrefVector) -> Optional[Tuple[float, ...]]:
    """``None`` or a non-empty 1-D sequence of finite floats, returned as a tuple.

    Raises:
        ValueError: naming ``pref_vector`` if it is not 1-D, empty or not finite.
    """
    if pref_vector is None:
        return None
    if isinstance(pref_vector, Tensor):
        if pref_vector.dim() != 1:
            raise ValueError(f"pref_vector must be a 1-D tensor, got shape {tuple(pref_vector.shape)}")
        pref_vector = pref_vector.detach().to("cpu", torch.float64).tolist()
    try:
        values = tuple(float(x) for x in pref_vector)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise ValueError(f"pref_vector must be None or a sequence of floats, got {pref_vector!r}") from err
    if not values:
        raise ValueError("pref_vector must not be empty")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"pref_vector must be finite, got {values}")
    return values


def pref_weights(pref_vector: Optional[Tuple[float, ...]], k: int, default: float) -> Tensor:
    """``(K,)`` float64 weights: ``pref_vector``, or ``default`` for every task when ``None``.

    Raises:
        ValueError: naming ``pref_vector`` if its length is not ``K``.
    """
    if pref_vector is None:
        return torch.full((k,), default, dtype=torch.float64)
    if len(pref_vector) != k:
        raise ValueError(f"pref_vector has {len(pref_vector)} entries but there are {k} tasks")
    return torch.tensor(pref_vector, dtype=torch.float64)


def nan_coefficients(gram: Tensor) -> Optional[Tensor]:
    """``(B, K)`` NaN coefficients when ``gram`` is not finite (the optimizer then skips
    the step, as for any non-finite gradient), else ``None``."""
    if bool(torch.isfinite(gram).all()):
        return None
    return torch.full(gram.shape[:2], float("nan"), dtype=torch.float64)


class GramSolver(Aggregator):
    """A Gram method whose coefficients come from a clean float64 Gram matrix.

    :meth:`aggregate` returns NaN coefficients for a non-finite Gram (the step is then
    skipped), symmetrises it in float64 and, with ``unit_scale``, divides each block by
    its largest diagonal entry (for methods whose coefficients do not change when ``G``
    is scaled), then calls :meth:`solve`.
    """

    #: Divide each block by its largest squared gradient norm before :meth:`solve`.
    unit_scale: ClassVar[bool] = False

    def aggregate(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        bad = nan_coefficients(gram)
        if bad is not None:
            return bad, state
        g = gram.to(torch.float64)
        g = 0.5 * (g + g.transpose(-1, -2))
        if self.unit_scale:
            s = g.diagonal(dim1=-2, dim2=-1).amax(-1).view(-1, 1, 1)
            g = g / torch.where(s > 0, s, 1.0)
        return self.solve(g, state, ctx)

    @abstractmethod
    def solve(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        """Coefficients ``(B, K)`` and the new state from the prepared ``(B, K, K)`` Gram."""
