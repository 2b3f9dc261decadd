"""Dynamic Weight Average (Liu, Johns and Davison, 2019)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ._per_task import check_positive_int, scalar
from .base import WEIGHTINGS, State, Weighting, WeightingContext


@WEIGHTINGS.register
class DynamicWeightAverage(Weighting):
    """Dynamic Weight Average (DWA): weight tasks by how slowly their loss falls.

    Reference: S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, eq. (7).

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

    State (all tensors): ``epoch_sum (K,)`` and ``epoch_count`` (0-d) of the current
    epoch, ``last_means (2, K)`` (``Lbar(t-1)``, ``Lbar(t-2)``) and ``epochs_done`` (0-d).

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
        self.steps_per_epoch = (
            None if steps_per_epoch is None else check_positive_int(steps_per_epoch, "steps_per_epoch")
        )

    def init_state(self, num_tasks: int, num_blocks: int = 1) -> State:
        return {
            "epoch_sum": torch.zeros(num_tasks, dtype=torch.float64),
            "epoch_count": scalar(0, torch.int64),
            "last_means": torch.zeros(2, num_tasks, dtype=torch.float64),
            "epochs_done": scalar(0, torch.int64),
        }

    def _state(self, state: State, num_tasks: int) -> State:
        if not state or "epoch_sum" not in state:
            return self.init_state(num_tasks)
        if state["epoch_sum"].shape[0] != num_tasks:
            raise ValueError(f"DWA state is for {state['epoch_sum'].shape[0]} tasks, got {num_tasks} losses")
        return state

    def current_weights(self, state: State) -> Tensor:
        """The weights of the current epoch, from the two last completed epochs."""
        k = state["epoch_sum"].shape[0]
        if int(state["epochs_done"]) < 2:
            return torch.ones(k, dtype=torch.float64)
        prev, prev2 = state["last_means"][0], state["last_means"][1]
        defined = prev2 != 0
        ratio = torch.where(defined, prev / torch.where(defined, prev2, 1.0), 1.0)
        return k * torch.softmax(ratio / self.temperature, dim=0)

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        state = self._state(state, losses.shape[0])
        w = self.current_weights(state)
        new_state = {
            "epoch_sum": state["epoch_sum"] + losses.to(torch.float64),
            "epoch_count": state["epoch_count"] + 1,
            "last_means": state["last_means"].clone(),
            "epochs_done": state["epochs_done"].clone(),
        }
        if self.steps_per_epoch is not None and int(new_state["epoch_count"]) >= self.steps_per_epoch:
            new_state = self.epoch_end(new_state)
        return w, new_state

    def epoch_end(self, state: State) -> State:
        if not state or "epoch_count" not in state or int(state["epoch_count"]) == 0:
            return state
        mean = state["epoch_sum"] / state["epoch_count"].to(torch.float64)
        return {
            "epoch_sum": torch.zeros_like(state["epoch_sum"]),
            "epoch_count": torch.zeros_like(state["epoch_count"]),
            "last_means": torch.stack([mean, state["last_means"][0]]),
            "epochs_done": state["epochs_done"] + 1,
        }

    def settings(self) -> Dict[str, Any]:
        return {"temperature": self.temperature, "steps_per_epoch": self.steps_per_epoch}
