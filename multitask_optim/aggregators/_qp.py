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
  feasible interval ``[l_1, 1 - l_2]``.
* ``K > 2``: Wolfe's minimum-norm-point algorithm (P. Wolfe, "Finding the nearest point
  in a polytope", Mathematical Programming 11, 1976), an active-set method over
  affinely independent "corrals". Each minor step solves the KKT system of the
  equality-constrained problem on the current support
  ``[[H_SS, 1], [1^T, 0]] [v; mu] = [0; 1]`` exactly (Gaussian elimination with partial
  pivoting in plain Python floats for small supports, ``torch.linalg.solve`` for larger
  ones). The result is exact up to rounding: it stops when the Frank-Wolfe gap
  ``b^T H b - min_j (H b)_j`` is at most ``1e-12`` (relative), which bounds the excess
  objective by ``2e-12 max_i G_ii``, and on its support the weights are the exact
  affine minimiser, so ``(G a)_i`` is equal there (to rounding) and no smaller
  elsewhere. Wolfe's corrals stay affinely independent, so rank-deficient ``G``
  (duplicated, opposite or zero rows) needs no special treatment.
* ``G = 0`` (every point is optimal): the uniform point ``l + s / K`` is returned.

Everything runs in plain Python floats (no per-element torch dispatch), so a block
with ``K = 16`` costs well under a millisecond.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

#: Stop when the Frank-Wolfe gap is below this (relative to ``max_i G_ii``).
GAP_TOL = 1e-12
#: Supports up to this size are solved in plain Python; larger ones with torch.
_PY_SOLVE_LIMIT = 10
#: Slack allowed on ``sum(lower) <= 1`` before the bounds are declared infeasible.
_SUM_SLACK = 1e-12

LowerSpec = Union[None, float, Sequence[float], Tensor]


def _solve_linear(mat: List[List[float]], rhs: List[float]) -> Optional[List[float]]:
    """Solve ``mat x = rhs``; ``None`` when the system is (numerically) singular."""
    n = len(rhs)
    if n > _PY_SOLVE_LIMIT:
        a = torch.tensor(mat, dtype=torch.float64)
        b = torch.tensor(rhs, dtype=torch.float64)
        x, info = torch.linalg.solve_ex(a, b)
        if int(info) != 0 or not bool(torch.isfinite(x).all()):
            return None
        return x.tolist()
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


def _affine_minimiser(h: List[List[float]], support: List[int]) -> Optional[List[float]]:
    """Weights (summing to 1) of the min-norm point of the affine hull of ``support``."""
    n = len(support)
    mat = [[h[i][j] for j in support] + [1.0] for i in support]
    mat.append([1.0] * n + [0.0])
    sol = _solve_linear(mat, [0.0] * n + [1.0])
    return None if sol is None else sol[:n]


def _quad(h: List[List[float]], support: List[int], w: List[float]) -> tuple[List[float], float]:
    """``(H w)`` for all rows and ``w^T H w`` for weights ``w`` on ``support``."""
    hw = [sum(h[i][j] * wj for j, wj in zip(support, w)) for i in range(len(h))]
    obj = sum(hw[i] * wi for i, wi in zip(support, w))
    return hw, obj


def _wolfe(h: List[List[float]], tol: float) -> List[float]:
    """Minimum-norm point of the convex hull of points with Gram ``h``: simplex weights."""
    k = len(h)
    start = min(range(k), key=lambda i: h[i][i])
    support, w = [start], [1.0]
    hw, obj = _quad(h, support, w)
    budget = 50 + 20 * k  # Wolfe's method is finite; this only guards against rounding loops
    while budget > 0:
        budget -= 1
        j = min(range(k), key=hw.__getitem__)
        if hw[j] >= obj - tol or j in support:
            break
        prev = (support[:], w[:], hw, obj)
        support.append(j)
        w.append(0.0)
        stalled = False
        while budget > 0:
            budget -= 1
            v = _affine_minimiser(h, support)
            if v is None:
                stalled = True
                break
            if all(x > 0.0 for x in v):
                w = v
                break
            # Move from w towards v until the first weight hits zero, drop it.
            theta, drop = 1.0, -1
            for idx, (wi, vi) in enumerate(zip(w, v)):
                if vi <= 0.0:
                    ratio = wi / (wi - vi) if wi > vi else 0.0
                    if ratio < theta or drop < 0:
                        theta, drop = ratio, idx
            if support[drop] == j and theta <= 0.0:
                stalled = True  # the new point cannot enter: converged up to rounding
                break
            w = [(1.0 - theta) * wi + theta * vi for wi, vi in zip(w, v)]
            w[drop] = 0.0
            keep = [idx for idx, wi in enumerate(w) if wi > 0.0]
            support = [support[idx] for idx in keep]
            w = [w[idx] for idx in keep]
            total = sum(w)
            w = [wi / total for wi in w]
        if stalled:
            support, w, hw, obj = prev
            break
        hw, obj = _quad(h, support, w)
        if obj > prev[3]:  # no progress (rounding): keep the better point and stop
            support, w, hw, obj = prev
            break
    out = [0.0] * k
    for i, wi in zip(support, w):
        out[i] = wi
    return out


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
    scale = max(float(gram[i][i]) for i in range(k))
    if not all(math.isfinite(float(x)) for row in gram for x in row):
        raise ValueError("gram must be finite")
    slack = 1.0 - math.fsum(low)
    if slack <= 0.0:
        return low
    if not scale > 0.0:  # G = 0: every feasible point is optimal
        return [li + slack / k for li in low]
    inv = 1.0 / scale
    g = [[0.5 * (float(gram[i][j]) + float(gram[j][i])) * inv for j in range(k)] for i in range(k)]
    if k == 2:
        den = g[0][0] + g[1][1] - 2.0 * g[0][1]
        lo, hi = low[0], 1.0 - low[1]
        a0 = (g[1][1] - g[0][1]) / den if den > 0.0 else 0.5 * (lo + hi)
        a0 = min(max(a0, lo), hi)
        return [a0, 1.0 - a0]
    if any(low):
        gl = [sum(gij * lj for gij, lj in zip(row, low)) for row in g]
        lgl = sum(x * lj for x, lj in zip(gl, low))
        h = [[lgl + slack * (gl[i] + gl[j]) + slack * slack * g[i][j] for j in range(k)] for i in range(k)]
    else:
        h = g
    if not max(h[i][i] for i in range(k)) > 0.0:  # every shifted point is the origin
        return [li + slack / k for li in low]
    b = _wolfe(h, GAP_TOL)
    if slack == 1.0 and not any(low):
        return b
    return [li + slack * bi for li, bi in zip(low, b)]


def min_norm_weights(gram: Tensor, lower: LowerSpec = None) -> Tensor:
    """Batched :func:`solve_simplex_qp`: ``(K, K) -> (K,)`` or ``(B, K, K) -> (B, K)``.

    Args:
        gram: Gram matrix or a batch of them (any float dtype; solved in float64).
        lower: lower bounds shared by every block (see :func:`solve_simplex_qp`).

    Returns:
        The minimisers, float64 on the CPU.
    """
    if gram.dim() not in (2, 3) or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must have shape (K, K) or (B, K, K), got {tuple(gram.shape)}")
    k = gram.shape[-1]
    low = check_lower(lower, k)
    blocks = gram.detach().to(device="cpu", dtype=torch.float64).reshape(-1, k, k).tolist()
    out = [solve_simplex_qp(g_b, low) for g_b in blocks]
    result = torch.tensor(out, dtype=torch.float64).reshape(len(blocks), k)
    return result[0] if gram.dim() == 2 else result
