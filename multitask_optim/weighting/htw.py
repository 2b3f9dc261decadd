"""Hybrid main/auxiliary task weighting (Kongyoung, Macdonald and Ounis, 2020)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union  # noqa: F401

import torch
from torch import Tensor

from ._per_task import (
    LossRatio,
    check_loss_ratio_inputs,
    check_nonnegative_float,
    check_nonnegative_int,
    check_positive_int,
)
from .base import WEIGHTINGS, State, Weighting, WeightingContext


@WEIGHTINGS.register
class HTW(Weighting):
    """A main task warmed up linearly, auxiliary tasks weighted by their loss ratio.

    With ``s = ctx.step`` (0 for the first non-skipped step), ``T = total_steps`` and
    ``tau = warmup``, the warm-up lasts ``W = tau * T`` steps and::

        main task m:       w_m(s) = min(1, (s + 1) / W)         (w_m = 1 if W == 0)
        auxiliary task i:  w_i(s) = (L_i(s) / L_i(0)) ** alpha

    i.e. the main-task weight is ``t / W`` with ``t = s + 1`` the number of steps taken
    including this one: it starts at ``1/W`` (not 0, so no step is wasted) and is 1 from
    step ``ceil(W) - 1`` on. ``L_i(0)`` is the first loss observed for task ``i``
    (stored in the state), so every auxiliary weight starts at 1 and falls as the task
    is learned.

    Notes on the sources: the paper's body could not be consulted while writing this
    (only its abstract), so the exact start of the warm-up (``1/W`` here) is our choice,
    stated above. LBTW as originally published takes ``L_i(0)`` from the first batch of
    *each epoch*; following the project design (and the HTW description) we take the
    first loss of training, once.

    A step that lacks some tasks weighs the present ones as above; an auxiliary task's
    ``L_i(0)`` is its loss in the first step that had it.

    Losses of 0: a first loss of exactly 0 gives no usable ``L_i(0)``; the task's
    ``L_i(0)`` is then its first *positive* loss, and until one is seen its weight is 1
    (ratio 1, as on the step that records it), so the run goes on. A negative loss
    raises a ``ValueError`` naming the task.

    Paper:
        S. Kongyoung, C. Macdonald, I. Ounis, "Multi-Task Learning using Dynamic Task
        Weighting for Conversational Question Answering", SCAI workshop at EMNLP 2020 (the
        hybrid of an "Abridged Linear" main-task schedule and LBTW, Liu, Liang & Gitter,
        AAAI 2019).

    Departures:
        The warm-up's first weight (``1/W``) is our choice (see above), and ``L_i(0)`` is
        the first loss of training, not of each epoch as in LBTW. No anchor test compares it
        with another library's code.

    Cost:
        No Gram matrix or per-task gradient of its own: the first loss of each task in the
        state.

    When to use:
        One main task with auxiliary tasks that should fade as they are learned. On the
        quality suites (task 0 as the main task) it is within the seed spread of the plain
        sum (MultiDigits 2.60, scale 386).

    Args:
        main_task: index or name of the main task (default 0).
        total_steps: total number of training steps ``T`` (>= 1), keyword-only.
        warmup: fraction ``tau`` in ``[0, 1]`` of ``T`` over which the main-task weight
            rises to 1 (default 0.1; 0 means weight 1 from the start).
        alpha: exponent of the auxiliary loss ratio (``>= 0``, default 0.5 as in LBTW).

    Raises:
        ValueError: a bad argument (named), a ``main_task`` that is not a task, or
            (in :meth:`weights`) a negative loss, which makes the loss ratio meaningless.

    Example:
        ```python
        import torch
        from torch import nn
        from multitask_optim import MultiTaskOptimizer

        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        heads = nn.ModuleDict({"main": nn.Linear(16, 1), "aux": nn.Linear(16, 1)})
        opt = MultiTaskOptimizer(
            torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-2),
            weighting="htw",
            weighting_kwargs={"main_task": "main", "total_steps": 40, "warmup": 0.1, "alpha": 0.5},
            surgery=None,
        )
        for step in range(5):
            z = trunk(torch.randn(32, 8))
            opt.zero_grad()
            opt.step({name: head(z).pow(2).mean() for name, head in heads.items()})
        print(opt.last_stats["weights"])  # the main task reached 1 after 4 steps
        ```
    """

    name = "htw"

    def __init__(
        self,
        main_task: Union[int, str] = 0,
        *,
        total_steps: int,
        warmup: float = 0.1,
        alpha: float = 0.5,
    ) -> None:
        if isinstance(main_task, str):
            self.main_task: Union[int, str] = main_task
        else:
            self.main_task = check_nonnegative_int(main_task, "main_task")
        self.total_steps = check_positive_int(total_steps, "total_steps")
        self.warmup = check_nonnegative_float(warmup, "warmup")
        if self.warmup > 1.0:
            raise ValueError(f"warmup is a fraction of total_steps and must be in [0, 1], got {warmup!r}")
        self.alpha = check_nonnegative_float(alpha, "alpha")
        self._main: Optional[int] = None

    @property
    def warmup_steps(self) -> float:
        """``W = warmup * total_steps``."""
        return self.warmup * self.total_steps

    def build(self, task_names: Tuple[str, ...]) -> None:
        """Resolve ``main_task`` (a name or an index) against the tasks.

        Raises:
            ValueError: ``main_task`` names no task, or its index is out of range.
        """
        num_tasks = len(task_names)
        if isinstance(self.main_task, str):
            if self.main_task not in task_names:
                raise ValueError(
                    f"main_task {self.main_task!r} is not a task; the tasks are {list(task_names)}"
                )
            self._main = list(task_names).index(self.main_task)
        elif self.main_task >= num_tasks:
            raise ValueError(f"main_task index {self.main_task} is out of range for {num_tasks} tasks")
        else:
            self._main = self.main_task

    def init_state(self, num_tasks: int, num_blocks: int = 1) -> State:
        return LossRatio.init_state(num_tasks)

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        return dict(LossRatio.AXES)

    def main_weight(self, step: int) -> float:
        """Main-task weight at a step.

        Args:
            step: the step index (0-based).

        Returns:
            ``min(1, (step + 1) / W)`` (1 without warm-up).
        """
        w = self.warmup_steps
        if w <= 0.0:
            return 1.0
        return min(1.0, (step + 1) / w)

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        assert self._main is not None
        tasks = ctx.indices
        losses = losses.to(torch.float64)
        initial, new_state = LossRatio.initial(losses, state)
        aux = [n for n, i in enumerate(tasks) if i != self._main]
        if aux:
            check_loss_ratio_inputs(losses[aux], [ctx.task_names[tasks[n]] for n in aux], "HTW")
        w = LossRatio.ratio(losses, initial).pow(self.alpha)
        if self._main in tasks:
            w[tasks.index(self._main)] = self.main_weight(int(ctx.step))
        return w, new_state

    def settings(self) -> Dict[str, Any]:
        return {
            "main_task": self.main_task,
            "total_steps": self.total_steps,
            "warmup": self.warmup,
            "alpha": self.alpha,
        }
