"""Solver for ``G w = w^(-1/alpha)``, ``w > 0``: FairGrad's condition and Nash-MTL's.

For ``alpha > 0`` the system is the stationarity condition of the strictly convex
function (on ``w > 0``, for positive definite ``G``)::

    phi(w) = 1/2 w^T G w - sum_i h(w_i),   h'(w) = w^(-1/alpha)

(``h = log`` for ``alpha = 1``, which is Nash-MTL's bargaining condition
``w_i (G w)_i = 1``). It is minimised by Newton's method with a backtracking line search
that keeps ``w > 0`` and decreases ``phi``; its Hessian ``G + diag(w^(-1/alpha-1)) /
alpha`` is positive definite. ``phi`` is self-concordant for ``alpha = 1`` (a quadratic
plus logarithms), so the damped method converges globally and quadratically near the
solution.

A ridge ``RIDGE * I`` (relative to a unit diagonal) is added to ``G``: when a
non-negative combination of the gradients vanishes (the point is Pareto stationary,
e.g. two opposite gradients) the system has no solution and ``phi`` is unbounded
below; with the ridge the weights stay finite (of order ``RIDGE^(-alpha/(1+alpha))``)
while moving the residual of a solvable system by only ``RIDGE * w_i`` relative.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Ridge added to the (unit-diagonal) matrix; see the module docstring.
RIDGE = 1e-10
#: Stop when the squared Newton decrement is below this.
DECREMENT_TOL = 1e-20


def _phi(g: Tensor, w: Tensor, alpha: float, a: Tensor) -> float:
    quad = 0.5 * float(w @ (g @ w))
    if alpha == 1.0:
        return quad - float((a * w.log()).sum())
    e = 1.0 - 1.0 / alpha
    return quad - float((a * w.pow(e) / e).sum())


def _damped_cholesky(hess: Tensor) -> Tensor | None:
    """Cholesky factor of ``hess``, or of ``hess + d I`` with the smallest ``d`` (from
    ``1e-12`` of the largest diagonal entry, times 100) that makes it numerically positive
    definite: a descent direction either way (the line search does the rest). Not
    ``lstsq``: on the CPU it returns different solutions for the same ill-conditioned
    system from one call to the next, so two identical runs would part. None when no
    damping helps (a non-finite Hessian)."""
    chol, info = torch.linalg.cholesky_ex(hess)
    if int(info) == 0:
        return chol
    top = float(hess.diagonal().abs().max())
    if not top > 0.0 or top == float("inf"):
        return None
    eye = torch.eye(hess.shape[0], dtype=hess.dtype)
    damp = 1e-12 * top
    while damp <= 1e6 * top:
        chol, info = torch.linalg.cholesky_ex(hess + damp * eye)
        if int(info) == 0:
            return chol
        damp *= 100.0
    return None


def solve_power_balance(
    g: Tensor, alpha: float, start: Tensor | None, max_iter: int, a: Tensor | None = None
) -> tuple[Tensor, int]:
    """``w > 0`` with ``(G + RIDGE I) w = a w^(-1/alpha)`` for one ``(K, K)`` matrix ``G``.

    Args:
        g: float64 ``K x K`` positive semi-definite matrix, scaled to a diagonal of at
            most about 1.
        alpha: FairGrad's ``alpha > 0`` (1 for Nash-MTL).
        start: positive float64 starting point (a warm start), or ``None`` for the best
            multiple of the all-ones vector.
        max_iter: cap on Newton iterations.
        a: positive per-task factors of the right-hand side (default 1).

    Returns:
        ``(w, iterations)``.
    """
    k = g.shape[0]
    m = g + RIDGE * torch.eye(k, dtype=torch.float64)
    a = torch.ones(k, dtype=torch.float64) if a is None else a
    inv_alpha = 1.0 / alpha
    if start is None:
        # the best multiple of 1: minimise phi(t 1) over t > 0
        quad = float(m.sum())
        t = (float(a.sum()) / quad) ** (alpha / (1.0 + alpha)) if quad > 0.0 else 1.0
        start = torch.full((k,), t, dtype=torch.float64)
    w = start.clone()
    f = _phi(m, w, alpha, a)
    it = 0
    while it < max_iter:
        it += 1
        mw = m @ w
        grad = mw - a * w.pow(-inv_alpha)
        hess = m + torch.diag(inv_alpha * a * w.pow(-inv_alpha - 1.0))
        chol = _damped_cholesky(hess)
        if chol is None:
            break
        step = -torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        dec = -float(grad @ step)
        if not dec > DECREMENT_TOL:
            break
        # largest step keeping w > 0 (with a margin), then Armijo backtracking on phi
        neg = step < 0
        t = 1.0
        if bool(neg.any()):
            t = min(1.0, 0.99 * float((-w[neg] / step[neg]).min()))
        while True:
            cand = w + t * step
            fc = _phi(m, cand, alpha, a)
            if fc <= f - 0.25 * t * dec or t < 1e-12:
                break
            t *= 0.5
        if not fc < f:
            break
        w, f = cand, fc
    return w, it
