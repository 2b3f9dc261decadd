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

#: Entries of a ``K x K`` cosine matrix each off by ``r`` move its eigenvalues by at most
#: ``K r`` (Gershgorin); this factor leaves room above that.
NOISE_FACTOR = 4.0


def noise_floor(ctx: AggregationContext, num_tasks: int, num_blocks: int) -> Tensor:
    """``(B,)`` float64: per block, the eigenvalue of the ``K x K`` cosine matrix below
    which the rows' precision cannot resolve it, ``4 K ctx.rounding`` (about ``5e-7 K``
    for float32 rows, ``1e-15 K`` for float64 ones).

    Raises:
        ValueError: ``ctx.rounding`` has neither one entry nor one per block.
    """
    rounding = torch.as_tensor(ctx.rounding, dtype=torch.float64).reshape(-1)
    if rounding.numel() == 1:
        rounding = rounding.expand(num_blocks)
    elif rounding.numel() != num_blocks:
        raise ValueError(f"ctx.rounding has {rounding.numel()} entries for {num_blocks} blocks")
    return NOISE_FACTOR * num_tasks * rounding


def clean_gram(gram: Tensor, noise: Tensor) -> Tensor:
    """The Gram matrices with what the rows' precision cannot resolve set to exactly zero.

    Each entry of a Gram of float32 rows is off by about ``eps ||g_i|| ||g_j||``, so in
    the cosine matrix ``C = D^-1 G D^-1`` (``D = diag ||g_i||``) every entry is off by
    about ``eps``. A rank-deficient Gram (a 3-element bias with 4 tasks, duplicated or
    dependent rows) then has eigenvalues of about ``+-1e-8`` where the exact ones are 0,
    and a solver that inverts, factors or projects turns them into coefficients of
    ``1e18`` and more. Here the eigenvalues of ``C`` below ``noise``
    (:func:`noise_floor`) are set to 0 and ``G`` is rebuilt as ``D C D``: positive
    semi-definite with an exact null space, so the solvers' own float64 tolerances
    apply. Scaling each row by its norm first keeps rows of any scale resolved (a row
    ``1e-4`` times another keeps its direction). A block whose smallest eigenvalue is
    above ``noise`` is returned as it is (bitwise).

    Args:
        gram: ``(B, K, K)`` symmetric float64 Gram matrices (finite).
        noise: ``(B,)``, the eigenvalue floor of each block's cosine matrix.

    Returns:
        ``(B, K, K)`` float64.
    """
    if gram.shape[-1] < 2 or not bool((noise > 0).any()):
        return gram
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()
    nonzero = norms > 0
    safe = torch.where(nonzero, norms, 1.0)
    pair = nonzero.unsqueeze(-1) & nonzero.unsqueeze(-2)
    eye = torch.eye(gram.shape[-1], dtype=torch.bool)
    # a zero row stays exactly zero: it sits in the cosine matrix as a unit vector of its own
    cos = torch.where(pair, gram / safe.unsqueeze(-1) / safe.unsqueeze(-2), torch.where(eye, 1.0, 0.0))
    lam, vec = torch.linalg.eigh(cos)
    noisy = lam[..., 0] < noise
    if not bool(noisy.any()):
        return gram
    kept = torch.where(lam >= noise.unsqueeze(-1), lam, 0.0)
    rebuilt = (vec * kept.unsqueeze(-2)) @ vec.transpose(-1, -2)
    rebuilt = 0.5 * (rebuilt + rebuilt.transpose(-1, -2)) * safe.unsqueeze(-1) * safe.unsqueeze(-2)
    rebuilt = torch.where(pair, rebuilt, 0.0)
    return torch.where(noisy.view(-1, 1, 1), rebuilt, gram)


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
    skipped), symmetrises it in float64, sets what its rounding cannot resolve to zero
    (:func:`clean_gram`, at the precision of the rows, ``ctx.rounding``) and, with
    ``unit_scale``, divides each block by its largest diagonal entry (for methods whose
    coefficients do not change when ``G`` is scaled), then calls :meth:`solve`.
    """

    #: Divide each block by its largest squared gradient norm before :meth:`solve`.
    unit_scale: ClassVar[bool] = False

    def aggregate(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        bad = nan_coefficients(gram)
        if bad is not None:
            return bad, state
        g = gram.to(torch.float64)
        g = clean_gram(0.5 * (g + g.transpose(-1, -2)), noise_floor(ctx, g.shape[-1], g.shape[0]))
        if self.unit_scale:
            s = g.diagonal(dim1=-2, dim2=-1).amax(-1).view(-1, 1, 1)
            g = g / torch.where(s > 0, s, 1.0)
        return self.solve(g, state, ctx)

    @abstractmethod
    def solve(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        """Coefficients ``(B, K)`` and the new state from the prepared ``(B, K, K)`` Gram."""
