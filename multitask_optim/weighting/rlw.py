"""Random Loss Weighting (Lin et al., 2021)."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from .base import WEIGHTINGS, State, Weighting, WeightingContext

_SCALES = ("sum1", "sumK")


@WEIGHTINGS.register
class RandomLossWeighting(Weighting):
    """Random Loss Weighting (RLW): fresh random weights at every step.

    At every step a vector is drawn from a standard normal and mapped through a
    softmax::

        z ~ N(0, I_K)     (torch.randn(K, generator=ctx.generator, dtype=float64))
        w = softmax(z)                       scale="sum1" (the paper): sum_i w_i = 1
        w = K * softmax(z)                   scale="sumK": sum_i w_i = K

    The paper's weights lie on the simplex (they sum to 1), and that is the default.
    ``"sumK"`` keeps the expected weight of each task at 1, the scale of the plain sum
    of losses that :class:`~multitask_optim.weighting.Equal` uses, so switching between
    the two does not change the effective learning rate. The draw comes from the
    optimizer's own seeded generator, so runs and resumed checkpoints repeat exactly.
    The paper also studies other sampling distributions; only the normal one (its main
    choice) is offered here.

    A step that lacks some tasks draws ``K'`` values for the ``K'`` present tasks: the
    weights are the method's on the present tasks (they sum to 1, or to ``K'``).

    Paper:
        B. Lin, F. Ye, Y. Zhang, I. W. Tsang, "Reasonable Effectiveness of Random Weighting:
        A Litmus Test for Multi-Task Learning", TMLR 2022 (normal sampling through a
        softmax).

    Departures:
        Only the normal distribution (LibMTL's default ``dist``) is offered;
        ``scale="sumK"`` keeps the plain sum's scale. No anchor test compares it with
        another library's code.

    Cost:
        No Gram matrix or per-task gradient of its own: K normal draws per step from the
        optimizer's generator.

    When to use:
        A baseline (the paper's litmus test: a method should beat random weights), or to
        explore. Not in the quality runs' tables.

    Args:
        scale: ``"sum1"`` (default, the paper) or ``"sumK"``.

    Raises:
        ValueError: an unknown ``scale``.
    """

    name = "rlw"

    def __init__(self, scale: str = "sum1") -> None:
        if scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
        self.scale = scale

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        return {}

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        k = losses.shape[0]
        z = torch.randn(k, generator=ctx.generator, dtype=torch.float64)
        w = torch.softmax(z, dim=0)
        if self.scale == "sumK":
            w = w * k
        return w, state

    def settings(self) -> Dict[str, Any]:
        return {"scale": self.scale}
