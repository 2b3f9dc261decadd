"""UPGrad: unconflicting projection of gradients (Quinton & Rey, 2024).

Reference: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization",
arXiv:2406.16232, 2024 (Section 3, UPGrad).
"""

from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor

from ._common import PrefVector, check_pref_vector, nan_coefficients, pref_weights
from ._dual_cone import project_weights
from .base import AGGREGATORS, AggregationContext, Aggregator, State


def check_eps(value: float, name: str) -> float:
    """A finite, non-negative float, or a ``ValueError`` naming ``name``."""
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite non-negative float, got {value!r}")
    return value


@AGGREGATORS.register
class UPGrad(Aggregator):
    """UPGrad (Quinton & Rey, 2024): project every gradient onto the dual cone, then combine.

    With ``pi`` the Euclidean projection onto the dual cone
    ``{d : <g_j, d> >= 0 for all j}`` of the task gradients and ``p`` the preference
    vector (default ``1/K`` for every task, so the update is on the mean's scale)::

        d = sum_i p_i pi(g_i),   pi(g_i) = J^T v_i,
        v_i = argmin_v v^T G v  subject to  v >= p_i e_i

    (the paper's Proposition 1). Each ``pi(g_i)`` has a non-negative inner product with
    every task gradient, hence so does ``d`` for ``p >= 0``: no task's loss increases to
    first order. The coefficients are ``c = sum_i v_i``; the ``K`` problems are solved
    exactly, together, by :mod:`._dual_cone`.

    Relation to TorchJD 0.18: its default ``QuadprogProjector`` solves the problem on
    ``G / tr(G) + 1e-4 I`` and replaces ``G`` by 0 when ``tr(G) < 1e-4``. That ridge
    is large next to the small eigenvalues of ``G / tr(G)`` (it moved the update by up to
    1% on the agreement tests' Jacobians) and can leave a slightly negative inner
    product; the threshold turns UPGrad into the plain mean for small
    gradients (``sum ||g_i||^2 < 1e-4``), so the method is no longer positively
    homogeneous. By default we solve the paper's problem exactly; ``reg_eps=1e-4,
    norm_eps=1e-4`` reproduces TorchJD's default output.

    Args:
        pref_vector: ``K`` weights combining the projected gradients; ``None`` means
            ``1/K`` each.
        norm_eps: TorchJD's threshold on ``tr(G)`` (used only with ``reg_eps > 0``).
        reg_eps: ridge added to ``G / tr(G)``; 0 (default) solves the exact problem.

    Raises:
        ValueError: naming the argument if ``pref_vector`` is not a 1-D finite vector
            (or, at a call, does not have ``K`` entries) or an eps is negative.
    """

    name = "upgrad"

    def __init__(self, pref_vector: PrefVector = None, norm_eps: float = 0.0, reg_eps: float = 0.0) -> None:
        self.pref_vector = check_pref_vector(pref_vector)
        self.norm_eps = check_eps(norm_eps, "norm_eps")
        self.reg_eps = check_eps(reg_eps, "reg_eps")

    def aggregate(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        bad = nan_coefficients(gram)
        if bad is not None:
            return bad, state
        b, k, _ = gram.shape
        p = pref_weights(self.pref_vector, k, 1.0 / k)
        u = torch.diag(p).expand(b, k, k)
        v = project_weights(gram, u, self.reg_eps, self.norm_eps)
        return v.sum(1), state

    def settings(self) -> Dict[str, Any]:
        return {"pref_vector": self.pref_vector, "norm_eps": self.norm_eps, "reg_eps": self.reg_eps}
