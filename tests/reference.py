"""Plain vector-loop reference implementations of the pairwise gradient surgeries.

These live in the tests only. They work on the explicit Jacobian ``J`` (a ``K x P``
float64 tensor, one task gradient per row), one ``P``-vector operation at a time, exactly
as the papers write the algorithms, so that the Gram-space implementations in
:mod:`multitask_optim.aggregators` can be checked against them for the same visiting
orders (the project design (DESIGN.md, shared with the developers), sections 3 and 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

#: A running gradient whose squared norm is at most ``RELATIVE_ZERO**2 * ||g_i||^2``
#: (a correction cancelled it) is treated as zero by GradVac (the project design
#: (DESIGN.md, shared with the developers), section 3).
RELATIVE_ZERO = 1e-6

Order = Sequence[Sequence[int]]


@dataclass(frozen=True)
class PairVisit:
    """What the GradVac reference saw when task ``i`` visited task ``j``.

    Used by the tests to bound the rounding error a Gram-space implementation may
    legitimately make on ill-conditioned inputs (near-parallel pairs, near-cancelled
    running gradients).

    Attributes:
        i: the task whose gradient is being corrected.
        j: the visited task.
        valid: False when ``g_j`` or the running ``g_i'`` counts as zero (``phi = 0``).
        rel_norm: ``||g_i'|| / ||g_i||`` before the visit (0 when ``g_i = 0``).
        phi: the pre-correction cosine.
        sin_phi: ``sqrt(1 - phi^2)`` computed from the orthogonal component.
        target: the target ``phi_hat[i, j]`` before the EMA update.
        corrected: whether ``g_i'`` was corrected towards ``g_j``.
    """

    i: int
    j: int
    valid: bool
    rel_norm: float
    phi: float
    sin_phi: float
    target: float
    corrected: bool


def _as_order(order: Order | Tensor) -> list[list[int]]:
    if isinstance(order, Tensor):
        return [[int(j) for j in row] for row in order.tolist()]
    return [[int(j) for j in row] for row in order]


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return rows.sum(dim=0)
    if reduction == "mean":
        return rows.sum(dim=0) / rows.shape[0]
    raise ValueError(f"unknown reduction {reduction!r}")


def pcgrad_reference_rows(jac: Tensor, order: Order | Tensor) -> Tensor:
    """The projected task gradients ``g_i'`` of PCGrad (Yu et al. 2020, Algorithm 1).

    Args:
        jac: ``(K, P)`` float64 Jacobian, one task gradient per row.
        order: ``order[i]`` is the visiting order of the tasks ``j != i``.

    Returns:
        ``(K, P)`` tensor whose row ``i`` is ``g_i'``.
    """
    jac = jac.to(torch.float64)
    order = _as_order(order)
    rows = []
    for i in range(jac.shape[0]):
        g = jac[i].clone()
        for j in order[i]:
            g_j = jac[j]
            sq_j = float(torch.dot(g_j, g_j))
            inner = float(torch.dot(g, g_j))
            if inner < 0.0 and sq_j > 0.0:
                g = g - (inner / sq_j) * g_j
        rows.append(g)
    return torch.stack(rows) if rows else jac.new_zeros(jac.shape)


def pcgrad_reference(jac: Tensor, order: Order | Tensor, reduction: str = "sum") -> Tensor:
    """PCGrad update vector ``sum_i g_i'`` (or the mean) for one block, shape ``(P,)``."""
    return _reduce(pcgrad_reference_rows(jac, order), reduction)


def gradvac_reference_rows(
    jac: Tensor,
    order: Order | Tensor,
    targets: Tensor,
    beta: float,
    trace: Optional[List[PairVisit]] = None,
) -> tuple[Tensor, Tensor]:
    """The corrected task gradients of GradVac (Wang et al. 2021) and the new targets.

    For each task ``i`` and each ``j`` in ``order[i]``, with ``phi = cos(g_i', g_j)``::

        if phi < phi_hat[i, j]:
            g_i' += ||g_i'|| (phi_hat sin(phi) - phi sin(phi_hat)) / (||g_j|| sin(phi_hat)) g_j
        phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi      (pre-correction phi)

    where ``sin(x) = sqrt(1 - x^2)``. ``sin(phi)`` is computed from the component of
    ``g_i'`` orthogonal to ``g_j`` (the same quantity, without the cancellation of
    ``1 - phi^2`` near ``phi = +-1``). A zero ``g_j``, or a running ``g_i'`` with
    ``||g_i'||^2 <= RELATIVE_ZERO^2 ||g_i||^2``, gives ``phi = 0`` and no correction; the
    target is still updated.

    Args:
        jac: ``(K, P)`` float64 Jacobian.
        order: visiting orders, ``order[i]`` a permutation of the tasks other than ``i``.
        targets: ``(K, K)`` targets ``phi_hat`` with entries in ``(-1, 1)``.
        beta: EMA rate of the targets.
        trace: if given, one :class:`PairVisit` per visited pair is appended to it.

    Returns:
        ``((K, P) corrected rows g_i', (K, K) new targets)``.
    """
    jac = jac.to(torch.float64)
    order = _as_order(order)
    new_targets = targets.to(torch.float64).clone()
    rows = []
    for i in range(jac.shape[0]):
        g = jac[i].clone()
        sq_0 = float(torch.dot(g, g))
        for j in order[i]:
            g_j = jac[j]
            target = float(new_targets[i, j])
            sq_j = float(torch.dot(g_j, g_j))
            sq = float(torch.dot(g, g))
            phi, sin_phi, corrected = 0.0, 1.0, False
            valid = sq_j > 0.0 and sq > 0.0 and sq > RELATIVE_ZERO**2 * sq_0
            rel_norm = math.sqrt(sq / sq_0) if sq_0 > 0.0 else 0.0
            if valid:
                norm = math.sqrt(sq)
                norm_j = math.sqrt(sq_j)
                inner = float(torch.dot(g, g_j))
                phi = min(1.0, max(-1.0, inner / (norm * norm_j)))
                perp = g - (inner / sq_j) * g_j
                sin_phi = min(1.0, float(perp.norm()) / norm)
                if phi < target:
                    sin_target = math.sqrt(1.0 - target * target)
                    scale = norm * (target * sin_phi - phi * sin_target) / (norm_j * sin_target)
                    g = g + scale * g_j
                    corrected = True
            if trace is not None:
                trace.append(PairVisit(i, j, valid, rel_norm, phi, sin_phi, target, corrected))
            new_targets[i, j] = (1.0 - beta) * target + beta * phi
        rows.append(g)
    out = torch.stack(rows) if rows else jac.new_zeros(jac.shape)
    return out, new_targets


def gradvac_reference(
    jac: Tensor, order: Order | Tensor, targets: Tensor, beta: float, reduction: str = "sum"
) -> tuple[Tensor, Tensor]:
    """GradVac update vector ``(P,)`` and new targets ``(K, K)`` for one block."""
    rows, new_targets = gradvac_reference_rows(jac, order, targets, beta)
    return _reduce(rows, reduction), new_targets


def update_from_coefficients(jac: Tensor, coefs: Tensor) -> Tensor:
    """The update ``J^T c`` of one block as a ``(P,)`` float64 vector, by an explicit loop."""
    jac = jac.to(torch.float64)
    out = torch.zeros(jac.shape[1], dtype=torch.float64)
    for i in range(jac.shape[0]):
        out = out + float(coefs[i]) * jac[i]
    return out
