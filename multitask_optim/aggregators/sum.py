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
