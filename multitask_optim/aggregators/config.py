"""ConFIG: conflict-free inverse gradients (Liu et al., 2025).

Reference: Q. Liu, M. Chu, N. Thuerey, "ConFIG: Towards Conflict-free Training of
Physics Informed Neural Networks", ICLR 2025, Equation 2.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from ._common import GramSolver, PrefVector, check_pref_vector, noise_floor, pref_weights
from .base import AGGREGATORS, AggregationContext, State

#: Eigenvalues of the cosine matrix below this (relative to the largest) are dropped.
RCOND = 1e-13


#: Below this fraction of ``||w||`` the preference vector's projection counts as zero.
_CANCEL = 1e-10


@AGGREGATORS.register
class ConFIG(GramSolver):
    """ConFIG: the direction with equal cosine to every task gradient, scaled by projections.

    With unit gradients ``u_i = g_i / ||g_i||`` (zero rows stay zero) stacked in ``U``
    and the preference vector ``w`` (default all ones)::

        b = U^+ w,   e = b / ||b||,   d = (sum_i <g_i, e>) e.

    ``U b = w`` when the gradients are linearly independent, so ``cos(d, g_i)`` is
    proportional to ``w_i``: equal for every task by default, and positive, so ``d``
    conflicts with no task. In Gram space, with the cosine matrix
    ``C = D^-1 G D^-1`` (``D = diag ||g_i||``): ``U^+ w = J^T a`` with
    ``a = D^-1 C^+ w``, and ``d = J^T a (1^T G a) / (a^T G a)``. ``b = 0`` gives 0.

    Relation to TorchJD 0.18 (same formula and defaults): TorchJD takes the
    pseudo-inverse of the ``K x P`` matrix ``U`` and cuts its singular values below
    ``max(K, P) eps`` times the largest; from the Gram matrix we cut the eigenvalues of
    ``C`` (squared singular values) below ``1e-13`` times the largest, i.e. singular
    values below about ``3e-7``, or below the Gram's rounding noise when that is larger
    (float32 rows: about ``5e-7 K``; see :func:`~._common.noise_floor`). The two differ
    only for nearly dependent gradients.

    Paper:
        Q. Liu, M. Chu, N. Thuerey, "ConFIG: Towards Conflict-free Training of Physics
        Informed Neural Networks", ICLR 2025 (Equation 2).

    Departures:
        Same formula and defaults as TorchJD 0.18's ``ConFIG``; the pseudo-inverse is taken
        on the cosine matrix (eigenvalues below 1e-13 of the largest cut) instead of on the
        K x P unit rows, which differs only for nearly dependent gradients. Agreement: 1e-5
        relative (``tests/test_anchor_wave2.py``).

    Cost:
        One Gram matrix per block, shared by every Gram method (factored for ``Linear``
        layers, so no K x P buffer there), then one K x K pseudo-inverse on the host in
        float64. Measured: 0.4 ms at K = 4 and at K = 16 per call (median of 30 aggregation
        calls, one thread; a one-off script timing ``aggregate`` on a Gram matrix of
        100,000-element rows).

    When to use:
        Conflicts and a magnitude imbalance: every task gets the same cosine with the
        update. Among the best on both suites (MultiDigits 0.70, scale 86).

    Args:
        pref_vector: ``K`` target cosines (up to scale); ``None`` means all ones. A step
            lacking some tasks uses the present tasks' entries.

    Raises:
        ValueError: naming ``pref_vector`` if it is not a finite 1-D vector (or, at a
            call, does not have ``K`` entries).
    """

    name = "config"
    unit_scale = True  # the coefficients do not change when G is scaled

    #: A step lacking some tasks uses the present tasks' target cosines (rescaled to the
    #: same total; ConFIG does not depend on their scale).
    per_task = {"pref_vector": "rescale"}

    def __init__(self, pref_vector: PrefVector = None) -> None:
        self.pref_vector = check_pref_vector(pref_vector)

    def solve(self, g: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        k = g.shape[-1]
        w = pref_weights(self.pref_vector, k, 1.0)
        n = g.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()
        nonzero = n > 0
        inv = torch.where(nonzero, 1.0 / torch.where(nonzero, n, 1.0), 0.0)
        c = g * inv.unsqueeze(-1) * inv.unsqueeze(-2)
        lam, vec = torch.linalg.eigh(c)
        noise = noise_floor(ctx, k, g.shape[0]).clamp_min(RCOND).view(-1, 1)
        cut = lam.amax(-1, keepdim=True) * noise
        keep = lam > cut
        lam_inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
        wv = vec.transpose(-1, -2) @ w
        a = inv * (vec @ (lam_inv * wv).unsqueeze(-1)).squeeze(-1)
        ga = (g @ a.unsqueeze(-1)).squeeze(-1)
        sq = (a * ga).sum(-1, keepdim=True)
        # b = U^+ w is 0 exactly when w is orthogonal to the span of the cosine matrix
        # (e.g. opposite unit rows that cancel); decide that on the projection of w, so
        # rounding noise is not normalised into a full-size update.
        projected = (torch.where(keep, wv, 0.0) ** 2).sum(-1, keepdim=True).sqrt()
        ok = (sq > 0) & (projected > noise.clamp_min(_CANCEL) * w.norm())
        coefs = torch.where(ok, a * ga.sum(-1, keepdim=True) / torch.where(ok, sq, 1.0), 0.0)
        return coefs, state

    def settings(self) -> Dict[str, Any]:
        return {"pref_vector": self.pref_vector}
