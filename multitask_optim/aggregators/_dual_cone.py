"""Projection onto the dual cone of the task gradients, in Gram space (UPGrad, DualProj).

The dual cone of the rows ``g_1..g_K`` of ``J`` is ``{d : <g_j, d> >= 0 for all j}``.
For ``x = J^T u`` its Euclidean projection is ``J^T v`` with (Quinton & Rey, 2024,
Proposition 1)::

    v = argmin_v  v^T G v   subject to  v >= u.

Substituting ``v = u + w`` this is a linear complementarity problem in ``w >= 0`` with
``y = G (u + w) >= 0`` and ``w_j y_j = 0``; ``y_j`` is ``<g_j, J^T v>``, so the
projection has a non-negative inner product with every row.

Method: block principal pivoting (Judice & Pires, 1994; as used for non-negative least
squares by Kim & Park, 2011), vectorised in torch over every projected vector and every
block at once. Each iteration solves the equality-constrained problem on the current
free set ``F`` (``w_F = -G_FF^{-1} q_F``, ``q = G u``) and exchanges every variable that
violates its sign condition; when the number of violations stops decreasing, Murty's
single-exchange rule (the largest violating index) takes over, which is finite for a
positive definite matrix. A few iterations suffice in practice.

Conditioning: the dual cone does not change when a row is multiplied by a positive
number, so the problem is solved on the cosine matrix ``C = D^-1 G D^-1``
(``D = diag ||g_j||``) with ``u' = D u`` and mapped back ``v = D^-1 v'``: row scales from
``1e-20`` to ``1e20`` cost nothing. Zero rows impose no constraint and keep ``v_j = u_j``.
A ridge of ``RIDGE`` (relative to the unit diagonal) keeps ``C_FF`` invertible when rows
are duplicated or linearly dependent; it moves ``<g_j, d>`` by at most
``RIDGE * ||g_j|| * |v'_j|``, far below the rounding of a float64 Gram. Rows of float32
are only float32-accurate (a rank-deficient Gram of them has eigenvalues of about
``-1e-8`` where the exact ones are 0, and its entries' rounding, divided by a tiny ridge,
gave coefficients of ``1e3`` to ``1e17``): what their precision cannot resolve is set to
zero first (:func:`~._common.clean_gram`) and the ridge is raised to that level.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from ._common import PrefVector, check_pref_vector, clean_gram
from .base import Aggregator

#: Ridge added to the unit diagonal of the cosine matrix.
RIDGE = 1e-13
#: Sign tolerance on ``w`` and ``y`` (relative: ``u'`` is scaled to unit max-norm).
TOL = 1e-12
#: Give up on exchanging blocks after this many iterations without fewer violations.
_PATIENCE = 3


def _solve_lcp(c: Tensor, u: Tensor, ridge: Union[float, Tensor]) -> Tensor:
    """``argmin v^T C v s.t. v >= u`` for ``c (B, 1, K, K)`` and ``u (B, N, K)``: ``v (B, N, K)``."""
    b, n, k = u.shape
    eye = torch.eye(k, dtype=c.dtype)
    m = c + ridge * eye
    q = (m @ u.unsqueeze(-1)).squeeze(-1)  # (B, N, K)
    free = q < -TOL
    w = torch.zeros_like(u)
    best = torch.full((b, n), k + 1, dtype=torch.long)
    stalls = torch.zeros(b, n, dtype=torch.long)
    idx = torch.arange(k)
    for _ in range(10 * k + 10):
        pair = free.unsqueeze(-1) & free.unsqueeze(-2)
        mat = torch.where(pair, m, eye)
        rhs = torch.where(free, -q, 0.0)
        w = torch.linalg.solve(mat, rhs.unsqueeze(-1)).squeeze(-1)
        w = torch.where(free, w, 0.0)
        y = q + (m @ w.unsqueeze(-1)).squeeze(-1)
        bad = (free & (w < -TOL)) | (~free & (y < -TOL))
        count = bad.sum(-1)
        if not bool(count.any()):
            break
        improved = count < best
        best = torch.where(improved, count, best)
        stalls = torch.where(improved, 0, stalls + 1)
        # Murty's rule after a stall: exchange only the largest violating index.
        largest = torch.where(bad, idx, -1).max(-1).values
        single = torch.zeros_like(bad).scatter_(-1, largest.clamp_min(0).unsqueeze(-1), True) & bad
        flip = torch.where((stalls >= _PATIENCE).unsqueeze(-1), single, bad)
        free = free ^ flip
    return u + w.clamp_min(0.0)


def project_weights(
    gram: Tensor, u: Tensor, reg_eps: float = 0.0, norm_eps: float = 0.0, noise: Optional[Tensor] = None
) -> Tensor:
    """Weights ``v`` of the projections of ``J^T u_n`` onto the dual cone of the rows of ``J``.

    Args:
        gram: ``(B, K, K)`` float64 Gram matrices.
        u: ``(B, N, K)`` weights of the ``N`` vectors to project, per block.
        reg_eps: 0 (default) solves the exact problem on the cosine matrix. A positive
            value reproduces TorchJD's ``QuadprogProjector``: the problem is solved on
            ``G / tr(G) + reg_eps I`` (``reg_eps I`` alone when ``tr(G) < norm_eps``).
        norm_eps: see ``reg_eps``; only used when ``reg_eps > 0``.
        noise: ``(B,)``, the rows' rounding level (:func:`~._common.noise_floor`):
            eigenvalues of the cosine matrix below it are set to 0
            (:func:`~._common.clean_gram`) and the ridge is at least this large (a
            smaller one divides the rounding of the Gram's entries by it). None: the
            Gram is used as it is, with the ridge ``RIDGE`` (or ``reg_eps``).

    Returns:
        ``(B, N, K)`` float64 weights ``v`` with ``pi(J^T u_n) = J^T v_n``.
    """
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.transpose(-1, -2))
    g = g if noise is None else clean_gram(g, noise)
    u = u.to(torch.float64)
    if reg_eps > 0.0:
        tr = g.diagonal(dim1=-2, dim2=-1).sum(-1)
        small = (tr < norm_eps).view(-1, 1, 1)
        c = torch.where(small, 0.0, g / torch.where(small, 1.0, tr.view(-1, 1, 1)))
        scale = u.abs().amax(-1, keepdim=True)
        scale = torch.where(scale > 0, scale, 1.0)
        ridge = reg_eps if noise is None else noise.clamp_min(reg_eps).view(-1, 1, 1, 1)
        return _solve_lcp(c.unsqueeze(1), u / scale, ridge) * scale
    diag = g.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    norms = diag.sqrt()
    nonzero = norms > 0
    safe = torch.where(nonzero, norms, 1.0)
    c = g / safe.unsqueeze(-1) / safe.unsqueeze(-2)
    c = c.clamp(-1.0, 1.0)
    pair = nonzero.unsqueeze(-1) & nonzero.unsqueeze(-2)
    eye = torch.eye(g.shape[-1], dtype=torch.float64)
    c = torch.where(pair, c, 0.0)
    c = torch.where(eye.bool(), 1.0, c)
    up = u * torch.where(nonzero, norms, 0.0).unsqueeze(1)
    scale = up.abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)
    ridge = RIDGE if noise is None else noise.clamp_min(RIDGE).view(-1, 1, 1, 1)
    vp = _solve_lcp(c.unsqueeze(1), up / scale, ridge) * scale
    return torch.where(nonzero.unsqueeze(1), vp / safe.unsqueeze(1), u)


def check_eps(value: float, name: str) -> float:
    """A finite, non-negative float, or a ``ValueError`` naming ``name``."""
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite non-negative float, got {value!r}")
    return value


class ConeProjection(Aggregator):
    """The hyper-parameters UPGrad and DualProj share (TorchJD's names).

    Args:
        pref_vector: ``K`` weights; ``None`` means ``1/K`` each. A step lacking some
            tasks uses the present tasks' weights, rescaled to the same total.
        norm_eps: TorchJD's threshold on ``tr(G)`` (used only with ``reg_eps > 0``).
        reg_eps: ridge added to ``G / tr(G)``; 0 (default) solves the exact problem.

    Raises:
        ValueError: naming the argument if ``pref_vector`` is not a 1-D finite vector
            (or, at a call, does not have ``K`` entries) or an eps is negative.
    """

    #: A step lacking some tasks uses the present tasks' preferences, rescaled to the
    #: same total (the default ``1/K`` each becomes ``1/K'`` each).
    per_task = {"pref_vector": "rescale"}

    def __init__(self, pref_vector: PrefVector = None, norm_eps: float = 0.0, reg_eps: float = 0.0) -> None:
        self.pref_vector = check_pref_vector(pref_vector)
        self.norm_eps = check_eps(norm_eps, "norm_eps")
        self.reg_eps = check_eps(reg_eps, "reg_eps")

    def settings(self) -> Dict[str, Any]:
        return {"pref_vector": self.pref_vector, "norm_eps": self.norm_eps, "reg_eps": self.reg_eps}
