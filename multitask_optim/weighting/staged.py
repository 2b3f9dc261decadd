"""Staged task start: each task joins training at its own step, optionally ramped in."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._per_task import check_nonnegative_int, check_per_task, resolve_per_task
from .base import WEIGHTINGS, State, Weighting, WeightingContext


@WEIGHTINGS.register
class StagedStart(Weighting):
    """Task ``i`` has weight 0 before its start step, then ramps linearly to 1.

    With ``s = ctx.step`` (0 for the first non-skipped optimizer step), ``start_i`` the
    task's start step and ``R = ramp_steps``::

        R == 0:  w_i(s) = 0 if s < start_i else 1
        R >= 1:  w_i(s) = clamp((s - start_i + 1) / R, 0, 1)

    so with a ramp the task's first weighted step is ``s = start_i`` with weight ``1/R``,
    and it reaches weight 1 at ``s = start_i + R - 1`` (``R`` steps with a non-zero
    weight below or at 1). ``R = 1`` is the same as no ramp.

    Paper:
        None: a schedule (tasks that join training at their own step).

    Departures:
        None.

    Cost:
        No Gram matrix or per-task gradient of its own: the weights follow the step count.

    When to use:
        A task that should only start once another is learned (curriculum), or a new task
        added to a trained model. Not in the quality runs.

    Args:
        start_steps: one start step (integer >= 0) per task, as a sequence in task order
            or a mapping ``{task name: start step}``. Tasks a mapping leaves out start at
            step 0; naming an unknown task raises in :meth:`bind`.
        ramp_steps: length of the linear ramp in steps (0: switch on at once).

    Raises:
        ValueError: a negative or non-integer step, a wrong number of start steps, or
            unknown task names.

    Example:
        ```python
        import torch
        from torch import nn
        from multitask_optim import MultiTaskOptimizer

        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])
        opt = MultiTaskOptimizer(
            torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-2),
            weighting="staged",
            weighting_kwargs={"start_steps": [0, 2], "ramp_steps": 2},
            surgery=None,
        )
        for step in range(4):
            z = trunk(torch.randn(32, 8))
            opt.zero_grad()
            opt.step([head(z).pow(2).mean() for head in heads])
            print(step, opt.last_stats["weights"])  # task 1: 0, 0, 0.5, 1
        ```
    """

    name = "staged"

    def __init__(self, start_steps: Union[Sequence[int], Mapping[str, int]], ramp_steps: int = 0) -> None:
        self._spec = check_per_task(start_steps, "start_steps", check_nonnegative_int)
        self.ramp_steps = check_nonnegative_int(ramp_steps, "ramp_steps")
        self._starts: Optional[List[int]] = None

    def build(self, task_names: Tuple[str, ...]) -> None:
        self._starts = resolve_per_task(self._spec, task_names, "start_steps", default=0, allow_missing=True)

    def weight_at(self, step: int) -> Tensor:
        """The weights at an optimizer step.

        Args:
            step: the step index (0 for the first taken step).

        Returns:
            ``(K,)`` float64 weights.

        Raises:
            RuntimeError: the weighting is not bound to its tasks yet.
        """
        if self._starts is None:
            raise RuntimeError("StagedStart needs bind(task_names) first")
        start = torch.tensor(self._starts, dtype=torch.float64)
        if self.ramp_steps == 0:
            return (step >= start).to(torch.float64)
        return ((step - start + 1.0) / self.ramp_steps).clamp(0.0, 1.0)

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        return {}

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        """The present tasks' weights at ``ctx.step`` (absent tasks are left out)."""
        return self.weight_at(int(ctx.step))[ctx.indices], state

    def settings(self) -> Dict[str, Any]:
        return {"start_steps": self._spec, "ramp_steps": self.ramp_steps}
