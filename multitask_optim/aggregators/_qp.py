"""Exact solver for the small QP behind MGDA and PE-LTR.

Problem, for a symmetric positive semi-definite ``K x K`` matrix ``G`` (a Gram matrix
``G = J J^T``, so ``a^T G a = ||J^T a||^2``) and lower bounds ``l``::

    minimise  a^T G a   subject to   a >= l,  sum(a) = 1.

With ``l = 0`` this is the minimum-norm point of the convex hull of the rows of ``J``.

Method:

* ``G`` is symmetrised and divided by its largest diagonal entry, so huge and tiny
  scales behave alike and every tolerance below is relative to ``max_i G_ii``.
* Lower bounds are removed by a change of variables: with ``s = 1 - sum(l)`` and
  ``a = l + s b``, ``b`` on the simplex, ``J^T a = sum_i b_i h_i`` for the shifted
  points ``h_i = J^T l + s g_i``. Their Gram matrix
  ``H_ij = l^T G l + s (G l)_i + s (G l)_j + s^2 G_ij`` is built from ``G`` alone, so
  the bounded problem is again a minimum-norm point of a convex hull.
* ``K = 2``: the closed form of the minimum-norm point of a segment, clipped to the
  feasible interval ``[l_1, 1 - l_2]`` (the better end when the two rows are equal up
  to rounding, so that the segment's curvature cannot be read from ``G``).
* ``K > 2``: Wolfe's minimum-norm-point algorithm (P. Wolfe, "Finding the nearest point
  in a polytope", Mathematical Programming 11, 1976), an active-set method over
  affinely independent "corrals". Each minor step solves the KKT system of the
  equality-constrained problem on the current support
  ``[[H_SS, 1], [1^T, 0]] [v; mu] = [0; 1]`` exactly (Gaussian elimination with partial
  pivoting in plain Python floats for small supports, ``torch.linalg.solve_ex`` for
  larger ones). A first solve on all points returns at once when the minimiser has full
  support (gradients in general position). Wolfe's corrals stay affinely independent, so
  rank-deficient ``G`` (duplicated, opposite or zero rows) needs no special treatment.
* Accuracy: the method stops when the Frank-Wolfe gap ``b^T H b - min_j (H b)_j`` is at
  most ``1e-12`` (relative to ``max_i G_ii``), which bounds the excess objective by
  ``2e-12``; on its support the weights are the exact affine minimiser, so ``(G a)_i``
  is equal there (to rounding) and no smaller elsewhere: the KKT conditions hold to
  about ``1e-13``. Rows that are nearly parallel copies of each other (equal up to a
  relative ``1e-9``) make the affine minimiser too ill-conditioned to compute; Wolfe's
  method then stops early and a few pairwise Frank-Wolfe steps with exact line search
  move the weight between the copies, leaving a KKT residual of at most about ``1e-9``
  (so the objective is still within that of the optimum).
* ``G = 0`` (every point is optimal): the uniform point ``l + s / K`` is returned.

Cost, in plain Python floats (no per-element torch dispatch): a few microseconds for
``K = 2``, tens of microseconds for ``K <= 8``, about a millisecond at ``K = 16..32``
when many tasks are active.
"""

from __future__ import annotations

import math
from operator import mul
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

#: Stop when the Frank-Wolfe gap is below this (relative to ``max_i G_ii``).
GAP_TOL = 1e-12
#: Supports up to this size are solved in plain Python; larger ones with torch.
_PY_SOLVE_LIMIT = 8
#: Slack allowed on ``sum(lower) <= 1`` before the bounds are declared infeasible.
_SUM_SLACK = 1e-12
#: Below this (relative) curvature the two-task objective is treated as linear.
_FLAT = 1e-13

LowerSpec = Union[None, float, Sequence[float], Tensor]


def _solve_small(mat: List[List[float]], rhs: List[float]) -> Optional[List[float]]:
    """Gaussian elimination with partial pivoting; ``None`` when (numerically) singular."""
    n = len(rhs)
    a = [row[:] + [r] for row, r in zip(mat, rhs)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        p = a[piv][col]
        if p == 0.0 or not math.isfinite(p):
            return None
        if piv != col:
            a[col], a[piv] = a[piv], a[col]
        row_c = a[col]
        for r in range(col + 1, n):
            f = a[r][col] / p
            if f != 0.0:
                row_r = a[r]
                for c in range(col, n + 1):
                    row_r[c] -= f * row_c[c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        row = a[r]
        acc = row[n]
        for c in range(r + 1, n):
            acc -= row[c] * x[c]
        x[r] = acc / row[r]
    if not all(math.isfinite(v) for v in x):
        return None
    return x


class _Hull:
    """The points of a convex hull, known only through their Gram matrix ``h``."""

    def __init__(self, h: List[List[float]]) -> None:
        self.h = h
        self.k = len(h)
        self._bordered: Optional[Tensor] = None

    def affine_minimiser(self, support: List[int]) -> Optional[List[float]]:
        """Weights (summing to 1) of the min-norm point of the affine hull of ``support``.

        Solves ``[[H_SS, 1], [1^T, 0]] [v; mu] = [0; 1]``; ``None`` when it is singular.
        """
        n = len(support)
        if n <= _PY_SOLVE_LIMIT:
            h = self.h
            mat = [[h[i][j] for j in support] + [1.0] for i in support]
            mat.append([1.0] * n + [0.0])
            sol = _solve_small(mat, [0.0] * n + [1.0])
            return None if sol is None else sol[:n]
        if self._bordered is None:
            b = torch.ones(self.k + 1, self.k + 1, dtype=torch.float64)
            b[: self.k, : self.k] = torch.tensor(self.h, dtype=torch.float64)
            b[self.k, self.k] = 0.0
            self._bordered = b
        idx = torch.tensor(support + [self.k])
        mat = self._bordered.index_select(0, idx).index_select(1, idx)
        rhs = torch.zeros(n + 1, dtype=torch.float64)
        rhs[n] = 1.0
        x, info = torch.linalg.solve_ex(mat, rhs)
        if int(info) != 0 or not bool(torch.isfinite(x).all()):
            return None
        return x[:n].tolist()

    def products(self, support: List[int], w: List[float]) -> tuple[List[float], float]:
        """``H b`` (every row) and ``b^T H b`` for weights ``w`` on ``support``."""
        dense = [0.0] * self.k
        for i, wi in zip(support, w):
            dense[i] = wi
        hw = [sum(map(mul, row, dense)) for row in self.h]
        return hw, sum(hw[i] * wi for i, wi in zip(support, w))


def _minor_cycle(
    hull: _Hull, support: List[int], w: List[float], entering: int, budget: int
) -> tuple[List[int], List[float], bool, int]:
    """Wolfe's minor cycle: move to the affine minimiser of ``support``, dropping points.

    Starting from weights ``w > 0`` (the ``entering`` point may have weight 0), step
    towards the affine minimiser ``v`` of the support until it is strictly positive,
    removing at each step the first point whose weight reaches 0.

    Returns:
        ``(support, weights, ok, budget_left)``; ``ok`` is False when the step could not
        be made (singular system, or the entering point left at once: both mean the
        current point is optimal up to rounding).
    """
    while budget > 0:
        budget -= 1
        v = hull.affine_minimiser(support)
        if v is None:
            return support, w, False, budget
        if all(x > 0.0 for x in v):
            return support, v, True, budget
        theta, drop = 1.0, -1
        for idx, (wi, vi) in enumerate(zip(w, v)):
            if vi <= 0.0:
                ratio = wi / (wi - vi) if wi > vi else 0.0
                if drop < 0 or ratio < theta:
                    theta, drop = ratio, idx
        if support[drop] == entering and theta <= 0.0:
            return support, w, False, budget
        w = [(1.0 - theta) * wi + theta * vi for wi, vi in zip(w, v)]
        w[drop] = 0.0
        keep = [idx for idx, wi in enumerate(w) if wi > 0.0]
        support = [support[idx] for idx in keep]
        w = [w[idx] for idx in keep]
        total = sum(w)
        w = [wi / total for wi in w]
    return support, w, True, budget


def _wolfe(h: List[List[float]], tol: float) -> List[float]:
    """Minimum-norm point of the convex hull of points with Gram ``h``: simplex weights.

    Wolfe's algorithm from the shortest point. Fast path first: when the minimiser has
    full support (gradients in general position in many dimensions), one KKT solve on
    all points settles it, and the check ``max_i (H v)_i - min_i (H v)_i <= tol`` with
    ``v > 0`` certifies it.
    """
    hull = _Hull(h)
    k = hull.k
    everything = list(range(k))
    v = hull.affine_minimiser(everything)
    if v is not None and all(x > 0.0 for x in v):
        hw, _ = hull.products(everything, v)
        if max(hw) - min(hw) <= tol:
            return v
    budget = 50 + 20 * k  # Wolfe's method is finite; this only guards against rounding loops
    start = min(everything, key=lambda i: h[i][i])
    support, w = [start], [1.0]
    hw, obj = hull.products(support, w)
    while budget > 0:
        j = min(everything, key=hw.__getitem__)
        if hw[j] >= obj - tol or j in support:
            break
        prev = (support, w, hw, obj)
        support, w, ok, budget = _minor_cycle(hull, support + [j], w + [0.0], j, budget)
        if not ok:
            support, w, hw, obj = prev
            break
        hw, obj = hull.products(support, w)
        if obj > prev[3]:  # no progress (rounding): keep the better point and stop
            support, w, hw, obj = prev
            break
    out = [0.0] * k
    for i, wi in zip(support, w):
        out[i] = wi
    return out


def _pairwise_polish(h: List[List[float]], b: List[float], tol: float, steps: int) -> List[float]:
    """Pairwise Frank-Wolfe steps with exact line search, in place on simplex weights ``b``.

    Each step moves weight from the support point with the largest ``(H b)_m`` to the
    point with the smallest ``(H b)_j``. It only acts when Wolfe's method stopped on
    rounding with a KKT violation above ``tol`` (nearly collinear points, whose affine
    minimiser is too ill-conditioned to compute): there it swaps the weight exactly.
    """
    k = len(h)
    hw = [sum(map(mul, row, b)) for row in h]
    for _ in range(steps):
        j = min(range(k), key=hw.__getitem__)
        m = max((i for i in range(k) if b[i] > 0.0), key=hw.__getitem__)
        diff = hw[m] - hw[j]
        if not diff > tol:
            break
        den = h[j][j] + h[m][m] - 2.0 * h[j][m]
        gamma = b[m] if den <= 0.0 else min(b[m], diff / den)
        if not gamma > 0.0:
            break
        b[j] += gamma
        b[m] = 0.0 if gamma == b[m] else b[m] - gamma
        hj, hm = h[j], h[m]
        hw = [x + gamma * (hj[i] - hm[i]) for i, x in enumerate(hw)]
    return b


def _segment(g: List[List[float]], lo: float, hi: float) -> List[float]:
    """Closed form for ``K = 2``: ``a = (t, 1 - t)`` with ``t`` in ``[lo, hi]``.

    ``f(t) = t^2 G_00 + 2 t (1 - t) G_01 + (1 - t)^2 G_11`` is minimised at
    ``t* = (G_11 - G_01) / ||g_0 - g_1||^2``, clipped to the interval. The curvature
    ``||g_0 - g_1||^2 = G_00 + G_11 - 2 G_01`` is read from ``G`` with an absolute error
    of a few ulps, so when it is below ``_FLAT`` (the two rows equal, or parallel and
    almost equal) ``f`` is treated as linear: the better end of the interval, or its
    midpoint when both ends are equally good.
    """
    g00, g01, g11 = g[0][0], g[0][1], g[1][1]
    den = g00 + g11 - 2.0 * g01
    if den > _FLAT:
        t = min(max((g11 - g01) / den, lo), hi)
        return [t, 1.0 - t]

    def f(t: float) -> float:
        return t * t * g00 + 2.0 * t * (1.0 - t) * g01 + (1.0 - t) * (1.0 - t) * g11

    t = 0.5 * (lo + hi)
    for end in (lo, hi):
        if f(end) < f(t):
            t = end
    return [t, 1.0 - t]


def check_lower(lower: LowerSpec, k: int, name: str = "lower") -> List[float]:
    """Expand and validate lower bounds for ``k`` tasks.

    Raises:
        ValueError: naming ``name`` when a bound is not finite, the length is not ``k``,
            or the bounds sum to more than 1 (no feasible point).
    """
    if lower is None:
        return [0.0] * k
    if isinstance(lower, Tensor):
        lower = lower.detach().to(torch.float64).reshape(-1).tolist() if lower.dim() else float(lower)
    if isinstance(lower, (int, float)):
        values = [float(lower)] * k
    else:
        values = [float(x) for x in lower]
        if len(values) != k:
            raise ValueError(f"{name} has {len(values)} entries but there are {k} tasks")
    if not all(math.isfinite(x) for x in values):
        raise ValueError(f"{name} must be finite, got {values}")
    total = math.fsum(values)
    if total > 1.0 + _SUM_SLACK:
        raise ValueError(f"{name} sums to {total} > 1: no weights satisfy a >= {name} and sum(a) = 1")
    return values


def solve_simplex_qp(gram: Sequence[Sequence[float]], lower: LowerSpec = None) -> List[float]:
    """Minimise ``a^T G a`` over ``{a : a >= lower, sum(a) = 1}`` for one ``K x K`` ``G``.

    Args:
        gram: ``K x K`` symmetric positive semi-definite matrix (nested sequences).
        lower: ``None`` (the simplex), one float for every entry, or ``K`` floats.

    Returns:
        The minimiser as a list of ``K`` floats (one of them when it is not unique).

    Raises:
        ValueError: if ``gram`` is not square or not finite, or ``lower`` is infeasible.
    """
    k = len(gram)
    if any(len(row) != k for row in gram):
        raise ValueError("gram must be a square K x K matrix")
    low = check_lower(lower, k)
    if k == 0:
        return []
    if k == 1:
        return [1.0]
    if not all(math.isfinite(float(x)) for row in gram for x in row):
        raise ValueError("gram must be finite")
    scale = max(float(gram[i][i]) for i in range(k))
    slack = 1.0 - math.fsum(low)
    if slack <= 0.0:
        return low
    if not scale > 0.0:  # G = 0: every feasible point is optimal
        return [li + slack / k for li in low]
    inv = 1.0 / scale
    g = [[0.5 * (float(gram[i][j]) + float(gram[j][i])) * inv for j in range(k)] for i in range(k)]
    if k == 2:
        return _segment(g, low[0], 1.0 - low[1])
    if any(low):
        gl = [sum(map(mul, row, low)) for row in g]
        lgl = sum(map(mul, gl, low))
        h = [[lgl + slack * (gl[i] + gl[j]) + slack * slack * g[i][j] for j in range(k)] for i in range(k)]
    else:
        h = g
    if not max(h[i][i] for i in range(k)) > 0.0:  # every shifted point is the origin
        return [li + slack / k for li in low]
    b = _pairwise_polish(h, _wolfe(h, GAP_TOL), GAP_TOL, 3 * k)
    if not any(low):
        return b
    return [li + slack * bi for li, bi in zip(low, b)]


def min_norm_weights(gram: Tensor, lower: LowerSpec = None) -> Tensor:
    """Batched :func:`solve_simplex_qp`: ``(K, K) -> (K,)`` or ``(B, K, K) -> (B, K)``.

    Args:
        gram: Gram matrix or a batch of them (any float dtype; solved in float64).
        lower: lower bounds shared by every block (see :func:`solve_simplex_qp`).

    Returns:
        The minimisers, float64 on the CPU. A block whose Gram matrix is not finite gets
        NaN weights instead of an error, so that the optimizer skips the step as it does
        for any non-finite gradient.
    """
    if gram.dim() not in (2, 3) or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must have shape (K, K) or (B, K, K), got {tuple(gram.shape)}")
    k = gram.shape[-1]
    low = check_lower(lower, k)
    g64 = gram.detach().to(device="cpu", dtype=torch.float64).reshape(-1, k, k)
    finite = torch.isfinite(g64).flatten(1).all(dim=1).tolist()
    nan = [math.nan] * k
    out = [solve_simplex_qp(g_b, low) if ok else nan for g_b, ok in zip(g64.tolist(), finite)]
    result = torch.tensor(out, dtype=torch.float64).reshape(len(out), k)
    return result[0] if gram.dim() == 2 else result
