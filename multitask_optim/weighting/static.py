"""Static loss weights, as Keras' ``Model.compile(loss_weights=...)``."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._per_task import check_nonnegative_float, check_per_task, resolve_per_task
from .base import WEIGHTINGS, State, Weighting, WeightingContext


@WEIGHTINGS.register
class StaticWeights(Weighting):
    """Fixed per-task weights: the objective is ``sum_i w_i L_i`` with constant ``w``.

    This is the weighting Keras applies with ``loss_weights``: a list in task order or
    a dict keyed by task (output) name.

    Paper:
        None: Keras' ``Model.compile(loss_weights=...)``.

    Departures:
        None.

    Cost:
        No Gram matrix or per-task gradient of its own: the weights are constant.

    When to use:
        Known loss scales: weights ``1 / L_i(0)`` remove a magnitude imbalance at once
        (scale suite 80 against 391 for the plain sum).

    Args:
        weights: one non-negative finite weight per task, as a sequence in task order or
            a mapping ``{task name: weight}``. A mapping must name every task and only
            known tasks; this is checked in :meth:`bind`, once the names are known.

    Raises:
        ValueError: a negative or non-finite weight, a wrong number of weights, or
            unknown or missing task names (naming them).

    Example:
        ```python
        import torch
        from torch import nn
        from multitask_optim import MultiTaskOptimizer

        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        heads = nn.ModuleDict({"a": nn.Linear(16, 1), "b": nn.Linear(16, 1)})
        opt = MultiTaskOptimizer(
            torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-2),
            weighting="static",
            weighting_kwargs={"weights": {"a": 1.0, "b": 0.01}},
            surgery=None,
        )
        z = trunk(torch.randn(32, 8))
        opt.zero_grad()
        opt.step({"a": heads["a"](z).pow(2).mean(), "b": 100 * heads["b"](z).pow(2).mean()})
        print(opt.last_stats["weights"])  # [1.0, 0.01]
        ```
    """

    name = "static"

    def __init__(self, weights: Union[Sequence[float], Mapping[str, float]]) -> None:
        self._spec = check_per_task(weights, "weights", check_nonnegative_float)
        self._weights: Optional[List[float]] = None

    def build(self, task_names: Tuple[str, ...]) -> None:
        self._weights = resolve_per_task(self._spec, task_names, "weights")

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        return {}

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        """The present tasks' weights (a step lacking a task leaves its weight out)."""
        assert self._weights is not None
        return torch.tensor(self._weights, dtype=torch.float64)[ctx.indices], state

    def settings(self) -> Dict[str, Any]:
        return {"weights": self._spec}
