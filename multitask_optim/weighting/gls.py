"""Geometric Loss Strategy (Chennupati et al., 2019)."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from ._per_task import check_nonnegative_losses, present_names
from .base import WEIGHTINGS, State, Weighting, WeightingContext

#: Each loss enters the weights clamped at this floor (FAMO's offset; see "Losses of 0").
LOSS_FLOOR = 1e-8


@WEIGHTINGS.register
class GeometricLossStrategy(Weighting):
    """Geometric Loss Strategy (GLS): minimise the geometric mean of the losses.

    The objective is ``G = (prod_i L_i)^(1/K)``. Its gradient is
    ``grad G = sum_i G / (K L_i) grad L_i``, so the weights are::

        w_i = G / (K L_i) = exp(mean_j log L_j - log L_i) / K

    computed in log space (no product over- or underflows, whatever K and the loss
    scales). Multiplying one task's loss by ``c > 0`` scales its weight by
    ``c^(1/K) / c`` and every other weight by ``c^(1/K)``, so the update direction
    ``sum_i w_i grad L_i`` does not change, only its length (by ``c^(1/K)``): GLS is
    invariant to the loss scales in direction. :meth:`objective` reports ``G``.

    LibMTL's ``GLS`` back-propagates ``(prod_i L_i)^(1/K)`` (the same gradient, up to the
    product's float32 range) but reports the weights ``L_i / (K prod_j L_j)``, which are
    not the weights its gradient uses; we report the weights we apply.

    Losses of 0: ``log L_i`` is undefined at 0, and a loss does reach exactly 0 in a
    legitimate run (a separable classification loss underflows in float32). Neither the
    paper nor LibMTL guards it (LibMTL's product gives NaN there); here every loss enters
    the formula clamped at ``1e-8`` (the offset of FAMO's official code),
    ``L~_i = max(L_i, 1e-8)``: exactly the method for losses of at least ``1e-8``, and a
    loss of 0 keeps the run going (its task gets weight ``G~ / (K 1e-8)``, the largest).
    A *negative* loss still raises a ``ValueError`` naming the task(s), before any state
    changes (the optimizer then changes nothing).

    GLS has no hyper-parameters and no state.

    Paper:
        S. Chennupati, G. Sistu, S. Yogamani, S. A. Rawashdeh, "MultiNet++: Multi-Stream
        Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR 2019
        Workshops (Equation 2).

    Departures:
        Computed in log space, each loss clamped at ``1e-8`` (the paper and LibMTL have no
        guard: a loss of exactly 0 gives them NaN). LibMTL's ``GLS`` applies the same
        weights (to 1e-12 relative, ``tests/test_anchor_weighting_wave2.py``) but reports
        others and forms the product of the losses, which overflows float32 with many tasks.

    Cost:
        No Gram matrix or per-task gradient of its own: a few operations on the K loss
        values.

    When to use:
        Losses of very different scales (its direction is invariant to them): scale suite 88
        against ~400. It weights a task by ``1 / L_i``, so a loss that approaches 0 takes
        every weight from the other tasks.
    """

    name = "gls"

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        check_nonnegative_losses(losses, present_names(ctx), "GLS", "takes log L_i")
        log = torch.log(losses.to(torch.float64).clamp_min(LOSS_FLOOR))
        return torch.exp(log.mean() - log) / losses.shape[0], state

    def objective(self, losses: Tensor, weights: Tensor) -> float:
        """The geometric mean ``G`` of the (floored) losses."""
        return float(torch.exp(torch.log(losses.to(torch.float64).clamp_min(LOSS_FLOOR)).mean()))

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        """Steps lacking some tasks: stateless: the geometric mean of the present tasks' losses."""
        return {}

    def settings(self) -> Dict[str, Any]:
        return {}
