"""Dynamic Weight Average (Liu, Johns and Davison, 2019)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._per_task import check_steps_per_epoch, epoch_totals, scalar
from .base import WEIGHTINGS, State, Weighting, WeightingContext


@WEIGHTINGS.register
class DynamicWeightAverage(Weighting):
    """Dynamic Weight Average (DWA): weight tasks by how slowly their loss falls.

    With ``Lbar_k(t)`` the mean loss of task ``k`` over epoch ``t`` (mean of the raw loss
    values passed to :meth:`weights` during that epoch)::

        r_k(t-1)    = Lbar_k(t-1) / Lbar_k(t-2)
        lambda_k(t) = K * exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T)

    and ``lambda_k(t) = 1`` during the first two epochs (``t = 1, 2``). The weights always
    sum to ``K``. A task whose ``Lbar_k(t-2)`` is exactly 0 has no defined ratio; it is
    given ``r_k = 1`` (no change).

    Epochs: every call of :meth:`weights` adds the current losses to the running sums
    of the current epoch and returns the weights of the current epoch, which depend only
    on the two previous *completed* epochs (so they are constant within an epoch).
    :meth:`epoch_end` (``opt.epoch_end()``) closes the epoch. With ``steps_per_epoch``
    set, the epoch also closes by itself right after the ``steps_per_epoch``-th call of
    :meth:`weights` in it (the returned state is already closed); an explicit
    :meth:`epoch_end` on an epoch that has recorded nothing yet (e.g. just after such an
    automatic close) does nothing, so calling both never closes an empty epoch.

    Steps that lack some tasks (which the paper does not define): a task's epoch mean
    is over the steps of the epoch that had it; an epoch in which a task never appeared
    gives it no mean (its two last means stay those of the last epochs that had it). A
    task with two means takes part in the softmax; a task with fewer has weight 1. On a
    step, the present tasks with two means share ``K'' softmax(r / T)`` among them
    (``K''`` of them), so the present weights sum to the number of present tasks; with
    every task in every step this is the paper's rule.

    State (all tensors): ``epoch_sum (K,)``, ``task_count (K,)`` (steps that had each
    task) and ``epoch_count`` (0-d, steps) of the current epoch, ``last_means (2, K)``
    (``Lbar(t-1)``, ``Lbar(t-2)`` of each task's last epochs), ``epochs_seen (K,)``
    (epochs that gave each task a mean) and ``epochs_done`` (0-d). The weighting reads
    ``ctx.present`` itself (its state is not sliced: :meth:`task_axes` is ``{}``).

    Paper:
        S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning with Attention",
        CVPR 2019 (Equation 7).

    Departures:
        The paper's rule on epoch-mean losses (LibMTL's ``DWA`` also uses epoch means).
        Steps that lack tasks, which the paper does not define, follow the rule above. No
        anchor test compares it with another library's code.

    Cost:
        No Gram matrix or per-task gradient of its own: two epoch means per task in the
        state.

    When to use:
        Tasks that learn at different speeds (velocity). On the quality suites it equals the
        plain sum (MultiDigits 2.94, scale 390): it cannot fix a magnitude imbalance, since
        its weights stay within a softmax of loss ratios.

    Args:
        temperature: softmax temperature ``T > 0`` (the paper uses 2).
        steps_per_epoch: close the epoch automatically after this many steps
            (``None``: only :meth:`epoch_end` closes it).

    Raises:
        ValueError: a non-positive temperature or ``steps_per_epoch``.
    """

    name = "dwa"

    def __init__(self, temperature: float = 2.0, steps_per_epoch: Optional[int] = None) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.steps_per_epoch = check_steps_per_epoch(steps_per_epoch)

    def init_state(self, num_tasks: int, num_blocks: int = 1) -> State:
        return {
            **epoch_totals(num_tasks),
            "task_count": torch.zeros(num_tasks, dtype=torch.int64),
            "last_means": torch.zeros(2, num_tasks, dtype=torch.float64),
            "epochs_seen": torch.zeros(num_tasks, dtype=torch.int64),
            "epochs_done": scalar(0, torch.int64),
        }

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        return {}

    def _state(self, state: State, num_tasks: int) -> State:
        if not state or "epoch_sum" not in state:
            return self.init_state(num_tasks)
        if state["epoch_sum"].shape[0] != num_tasks:
            raise ValueError(f"DWA state is for {state['epoch_sum'].shape[0]} tasks, got {num_tasks} losses")
        state = dict(state)
        if "task_count" not in state:  # a checkpoint from before per-task counts
            state["task_count"] = state["epoch_count"].expand(num_tasks).clone()
            state["epochs_seen"] = state["epochs_done"].expand(num_tasks).clone()
        return state

    def current_weights(self, state: State, tasks: Optional[Sequence[int]] = None) -> Tensor:
        """The weights of the current epoch, from each task's two last epoch means.

        Args:
            state: DWA's state.
            tasks: the task indices to weigh (default all).

        Returns:
            ``(len(tasks),)`` float64 weights.
        """
        k = state["epoch_sum"].shape[0]
        tasks = list(range(k)) if tasks is None else list(tasks)
        out = torch.ones(len(tasks), dtype=torch.float64)
        if int(state["epochs_done"]) < 2:
            return out
        seen = state.get("epochs_seen")
        rated = [n for n, i in enumerate(tasks) if seen is None or int(seen[i]) >= 2]
        if not rated:
            return out
        index = [tasks[n] for n in rated]
        prev, prev2 = state["last_means"][0][index], state["last_means"][1][index]
        defined = prev2 != 0
        ratio = torch.where(defined, prev / torch.where(defined, prev2, 1.0), 1.0)
        out[rated] = len(rated) * torch.softmax(ratio / self.temperature, dim=0)
        return out

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        tasks = ctx.indices
        state = self._state(state, len(ctx.task_names) if ctx.present is not None else losses.shape[0])
        w = self.current_weights(state, tasks)
        spread = torch.zeros_like(state["epoch_sum"])
        spread[tasks] = losses.to(torch.float64)
        had = torch.zeros_like(state["task_count"])
        had[tasks] = 1
        new_state = {
            "epoch_sum": state["epoch_sum"] + spread,
            "epoch_count": state["epoch_count"] + 1,
            "task_count": state["task_count"] + had,
            "last_means": state["last_means"].clone(),
            "epochs_seen": state["epochs_seen"].clone(),
            "epochs_done": state["epochs_done"].clone(),
        }
        if self.steps_per_epoch is not None and int(new_state["epoch_count"]) >= self.steps_per_epoch:
            new_state = self.epoch_end(new_state)
        return w, new_state

    def epoch_end(self, state: State) -> State:
        if not state or "epoch_count" not in state or int(state["epoch_count"]) == 0:
            return state
        state = self._state(state, state["epoch_sum"].shape[0])
        count = state["task_count"]
        had = count > 0
        mean = state["epoch_sum"] / torch.where(had, count, 1).to(torch.float64)
        shifted = torch.stack([mean, state["last_means"][0]])
        return {
            "epoch_sum": torch.zeros_like(state["epoch_sum"]),
            "epoch_count": torch.zeros_like(state["epoch_count"]),
            "task_count": torch.zeros_like(count),
            "last_means": torch.where(had.view(1, -1), shifted, state["last_means"]),
            "epochs_seen": state["epochs_seen"] + had.to(torch.int64),
            "epochs_done": state["epochs_done"] + 1,
        }

    def settings(self) -> Dict[str, Any]:
        return {"temperature": self.temperature, "steps_per_epoch": self.steps_per_epoch}
