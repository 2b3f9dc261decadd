"""CAGrad: conflict-averse gradient descent (Liu et al., 2021).

Reference: B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient Descent
for Multi-task Learning", NeurIPS 2021 (Algorithm 1).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ._common import GramSolver, noise_floor
from ._qp import _solve_small, solve_simplex_qp
from .base import AGGREGATORS, AggregationContext, State

#: Relative accuracy of the root in ``beta`` (see :class:`CAGrad`).
BETA_RTOL = 1e-12
#: ``||g_w||`` below this (relative to ``max_i ||g_i||``) is treated as 0: a norm read from
#: the Gram matrix is only known to about ``sqrt(eps) max_i ||g_i||``.
ZERO_TOL = 1e-7


def _shifted_gram(g: List[List[float]], b: List[float], s0: float, beta: float) -> List[List[float]]:
    """Gram matrix of the points ``g_i + beta g_0`` (``b = G u``, ``s0 = ||g_0||^2``)."""
    k = len(g)
    return [[g[i][j] + beta * (b[i] + b[j]) + beta * beta * s0 for j in range(k)] for i in range(k)]


def _norm_w(g: List[List[float]], w: List[float]) -> float:
    return math.sqrt(max(0.0, sum(w[i] * sum(g[i][j] * w[j] for j in range(len(w))) for i in range(len(w)))))


def _support_root(
    g: List[List[float]], b: List[float], rho: float, w: List[float], lo: float, hi: float
) -> Optional[float]:
    """Root of ``||g_w(beta)|| = rho beta`` assuming the support of ``w`` does not change.

    On a fixed support ``S`` the minimiser is affine in ``beta``: the KKT system
    ``G_SS w + beta b_S = mu 1, 1^T w = 1`` gives ``w = w_a + beta w_b``, so the equation
    is a quadratic in ``beta``. ``None`` when the system is singular or the root is not
    strictly inside ``(lo, hi)``.
    """
    support = [i for i, wi in enumerate(w) if wi > 0.0]
    n = len(support)
    mat = [[g[i][j] for j in support] + [-1.0] for i in support]
    mat.append([1.0] * n + [0.0])
    sol_a = _solve_small(mat, [0.0] * n + [1.0])
    sol_b = _solve_small(mat, [-b[i] for i in support] + [0.0])
    if sol_a is None or sol_b is None:
        return None
    wa, wb = sol_a[:n], sol_b[:n]
    ga = [sum(g[i][j] * x for j, x in zip(support, wa)) for i in support]
    gb = [sum(g[i][j] * x for j, x in zip(support, wb)) for i in support]
    qa = sum(x * y for x, y in zip(wa, ga))
    qab = sum(x * y for x, y in zip(wa, gb))
    qb = sum(x * y for x, y in zip(wb, gb))
    # (qb - rho^2) beta^2 + 2 qab beta + qa = 0
    a2, a1, a0 = qb - rho * rho, 2.0 * qab, qa
    roots: List[float] = []
    if abs(a2) <= 1e-15 * max(abs(a1), abs(a0), 1e-300):
        if a1 != 0.0:
            roots.append(-a0 / a1)
    else:
        disc = a1 * a1 - 4.0 * a2 * a0
        if disc >= 0.0:
            sq = math.sqrt(disc)
            q = -0.5 * (a1 + math.copysign(sq, a1))
            if q != 0.0:
                roots += [q / a2, a0 / q]
    inside = [r for r in roots if lo < r < hi]
    return min(inside) if inside else None


def cagrad_weights(gram: List[List[float]], c: float, noise: float = 0.0) -> List[float]:
    """CAGrad coefficients for one ``K x K`` Gram matrix (plain floats).

    Args:
        gram: the Gram matrix as nested lists.
        c: the radius of the ball around the average gradient (see :class:`CAGrad`).
        noise: the Gram's rounding noise (:func:`~._common.noise_floor`); a norm
            ``||g_w||`` below ``sqrt(noise)`` (relative to ``max_i ||g_i||``) is not
            resolved.

    Returns:
        ``K`` coefficients (all 0 at a Pareto-stationary point).
    """
    k = len(gram)
    u = 1.0 / k
    scale = max(gram[i][i] for i in range(k))
    if not scale > 0.0:
        return [0.0] * k
    g = [[x / scale for x in row] for row in gram]
    b = [u * sum(row) for row in g]
    s0 = max(0.0, u * sum(b))
    rho = c * math.sqrt(s0)
    if rho == 0.0:
        return [u] * k

    def solve(beta: float) -> tuple[List[float], float]:
        w = solve_simplex_qp(_shifted_gram(g, b, s0, beta))
        return w, _norm_w(g, w)

    zero = max(ZERO_TOL, math.sqrt(noise))
    w, nw = solve(0.0)
    if nw <= zero:  # Pareto stationary: the min-norm point of the hull is 0
        return [0.0] * k
    lo, f_lo = 0.0, nw
    hi, f_hi = 1.0 / rho, -math.inf  # every ||g_w|| <= max_i ||g_i|| = 1 after scaling
    best = (w, nw, abs(nw))
    side = 0
    for _ in range(100):
        beta = _support_root(g, b, rho, w, lo, hi)
        if beta is None:  # Illinois regula falsi (bisection while hi is not evaluated)
            beta = 0.5 * (lo + hi) if math.isinf(f_hi) else (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
            if not lo < beta < hi:
                beta = 0.5 * (lo + hi)
        w, nw = solve(beta)
        f = nw - rho * beta
        if abs(f) < best[2]:
            best = (w, nw, abs(f))
        if abs(f) <= BETA_RTOL * max(nw, rho * beta) or hi - lo <= BETA_RTOL * hi:
            break
        if f > 0.0:
            lo, f_lo = beta, f
            if side == 1 and not math.isinf(f_hi):
                f_hi *= 0.5
            side = 1
        else:
            hi, f_hi = beta, f
            if side == -1:
                f_lo *= 0.5
            side = -1
    w, nw, _ = best
    if nw <= zero:
        return [0.0] * k
    lam = rho / nw
    return [u + lam * wi for wi in w]


@AGGREGATORS.register
class CAGrad(GramSolver):
    """CAGrad (Liu et al., 2021): the best worst-case improvement near the average gradient.

    With ``g_0 = J^T 1/K`` (the average gradient) the update solves::

        max_d  min_i <g_i, d>   subject to   ||d - g_0|| <= c ||g_0||,

    through its dual (the paper's Algorithm 1): with ``rho = c ||g_0||``,

        w = argmin_{w in simplex}  <g_w, g_0> + rho ||g_w||,   g_w = J^T w,
        d = g_0 + (rho / ||g_w||) g_w,   c_i = 1/K + (rho / ||g_w||) w_i.

    Method (exact, from ``G``): for ``beta >= 0`` let ``w(beta)`` be the min-norm point
    of the hull of the shifted gradients ``g_i + beta g_0`` (Wolfe's method,
    :mod:`._qp`; their Gram matrix is ``G + beta (b 1^T + 1 b^T) + beta^2 ||g_0||^2``,
    ``b = G 1/K``). On the simplex
    ``||g_w + beta g_0||^2 = ||g_w||^2 + 2 beta <g_w, g_0> + const``, so ``w(beta)``
    minimises the dual objective exactly when ``||g_{w(beta)}|| = rho beta``; that
    scalar equation has one root (it is the optimality condition of a jointly convex
    problem in ``(w, beta)``), found by Illinois regula falsi on ``[0, max_i ||g_i|| /
    rho]``. At the root the update solves the dual, so ``min_i <g_i, d>`` attains the
    primal's optimum: the paper's worst-case improvement bound.

    Scaling: ``c = 1/K + w rho / ||g_w||`` is invariant to the scale of ``J``, so the
    method is positively homogeneous. ``c = 0`` is the average gradient. When the
    minimum-norm point of the gradients' hull is 0 (a Pareto-stationary point) the
    coefficients are 0, as in TorchJD; "0" is below ``1e-7 max_i ||g_i||``, or below what
    the Gram resolves when that is more (float32 rows: about ``7e-4 sqrt(K)``, see
    :func:`~._common.noise_floor`; a float32 Gram of rank-deficient rows puts rounding
    noise there, and dividing by it gave coefficients of ``1e300``).

    Same formula and scale as TorchJD 0.18 (which solves the dual with cvxpy/Clarabel)
    and the paper; the official code additionally divides the update by ``1 + c^2``
    (its ``rescale=1``), which we do not.

    Paper:
        B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient Descent for
        Multi-task Learning", NeurIPS 2021 (Algorithm 1).

    Departures:
        Same formula and scale as the paper and TorchJD 0.18; the official code (and
        LibMTL's default ``rescale=1``) also divides the update by ``1 + c^2``, which we do
        not. LibMTL 1.1.5's ``CAGrad`` runs with exactly 3 tasks; ours with any number.
        Agreement with TorchJD's ``CAGrad`` (a cvxpy/Clarabel solve): 1e-4 relative, the
        less accurate side being TorchJD's (``tests/test_anchor_wave2.py``; our worst-case
        improvement bound is checked in ``tests/test_aggregators_wave2.py``).

    Cost:
        One Gram matrix per block, shared by every Gram method (factored for ``Linear``
        layers, so no K x P buffer there), then a one-dimensional root search over min-norm
        problems on the host in float64. Measured: 0.4 ms at K = 4, 7-14 ms at K = 16 per
        call (median of 30 aggregation calls, one thread; a one-off script timing
        ``aggregate`` on a Gram matrix of 100,000-element rows). The slowest Gram method at
        many tasks.

    When to use:
        Conflicting tasks at similar scales: the best mean on MultiDigits (0.51 Δm%) and a
        partial fix of a magnitude imbalance (scale 218 against ~400). ``c`` trades the
        average gradient (``c = 0``) for the worst task's improvement.

    Args:
        c: radius of the ball around ``g_0``, relative to ``||g_0||`` (``>= 0``);
            default 0.4, the paper's value for its multi-task experiments.

    Raises:
        ValueError: naming ``c`` if it is negative or not finite.
    """

    name = "cagrad"

    def __init__(self, c: float = 0.4) -> None:
        c = float(c)
        if not (math.isfinite(c) and c >= 0.0):
            raise ValueError(f"c must be a finite non-negative float, got {c!r}")
        self.c = c

    def solve(self, g: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        noise = noise_floor(ctx, g.shape[-1], g.shape[0]).tolist()
        out = [cagrad_weights(g_b, self.c, n) for g_b, n in zip(g.tolist(), noise)]
        return torch.tensor(out, dtype=torch.float64).reshape(g.shape[0], g.shape[1]), state

    def settings(self) -> Dict[str, Any]:
        return {"c": self.c}
