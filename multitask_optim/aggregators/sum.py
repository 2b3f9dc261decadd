"""Plain sum of the task gradients (no surgery)."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from .base import AGGREGATORS, AggregationContext, Aggregator, State, check_reduction


@AGGREGATORS.register
class Sum(Aggregator):
    """``d = sum_i g_i`` (or the mean with ``reduction="mean"``).

    With this aggregator the wrapper trains exactly like the inner optimizer on
    ``sum(losses)``.

    Paper:
        None: the plain sum of the task gradients, ``sum(losses).backward()``.

    Departures:
        None. TorchJD's ``Sum`` is this aggregator and its ``Mean`` is ``reduction="mean"``;
        LibMTL's ``EW`` is the plain sum.

    Cost:
        With no weighting or preconditioning, a step is one plain backward of the sum:
        exactly the inner optimizer's cost (the per-task gradients are not formed).

    When to use:
        The baseline to beat, and what ``surgery=None`` gives. Published comparisons (Kurin
        et al. 2022; Xin et al. 2022) found tuned equal weighting often matches the
        specialised methods; it fails under a large magnitude imbalance (scale suite ~400).

    Args:
        reduction: ``"sum"`` (default) or ``"mean"`` of the task gradients.

    Raises:
        ValueError: naming ``reduction`` when it is neither.
    """

    name = "sum"

    def __init__(self, reduction: str = "sum") -> None:
        self.reduction = check_reduction(reduction)

    def aggregate(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        b, k, _ = gram.shape
        value = 1.0 / k if self.reduction == "mean" else 1.0
        return torch.full((b, k), value, dtype=gram.dtype), state

    def is_plain_sum(self) -> bool:
        return self.reduction == "sum"

    def settings(self) -> Dict[str, Any]:
        return {"reduction": self.reduction}


AGGREGATORS.default = Sum
