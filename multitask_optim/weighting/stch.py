"""Smooth Tchebycheff scalarization (Lin et al., 2024)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ._per_task import (
    check_nonnegative_losses,
    check_positive_float,
    check_positive_int,
    check_steps_per_epoch,
    epoch_totals,
    scalar,
    state_for,
)
from .base import WEIGHTINGS, State, Weighting, WeightingContext

#: The offset the official code adds inside its logs (see "Losses of 0").
LOG_EPS = 1e-20


@WEIGHTINGS.register
class SmoothTchebycheff(Weighting):
    """Smooth Tchebycheff (STCH): a smoothed max of the log-losses relative to a nadir point.

    What is implemented (the paper's multi-task set-up as in its official code, which
    LibMTL's ``STCH`` copies): equal preferences ``lambda_i = 1``, objectives
    ``f_i = log L_i``, reference point ``z_i = log n_i`` with ``n`` a nadir point, the
    smoothed maximum scaled by ``K``. After the warm-up the objective and the weights
    are (``e = 1e-20``, the official code's offset inside its logs)::

        u_i = log(L_i / n_i + e) / mu
        objective = K mu log sum_i exp(u_i)
        w_i = d objective / d L_i = K softmax(u)_i / (L_i + e n_i)

    (``sum_i w_i L_i = K`` up to ``e``). The smaller ``mu``, the closer this is to the plain
    Tchebycheff ``K max_i log(L_i / n_i)``: nearly all the weight goes to the task
    furthest above its nadir loss.

    Warm-up: for the first ``warmup_epochs`` epochs the objective is
    ``sum_i log(L_i + e)`` (weights ``w_i = 1 / (L_i + e)``), and the nadir point ``n`` is the mean of the raw loss
    values over the *last* warm-up epoch (the official code's schedule:
    ``warmup_epochs = W + 1`` reproduces its ``STCH_warmup_epoch = W``; the default 5
    its default 4). Epochs end with ``opt.epoch_end()`` (:meth:`epoch_end`) or, with
    ``steps_per_epoch`` set, by themselves after that many steps; an epoch with no step
    in it is not counted. Without either the warm-up never ends.

    Departure from the official code: it reports all-ones weights; we report the
    weights the gradient uses.

    Losses of 0: as the official code, the logs read ``L_i + 1e-20`` (``L_i / n_i +
    1e-20`` after the warm-up), so a loss that reaches exactly 0 in a legitimate run (a
    separable classification loss underflows in float32) keeps the run going; its task
    then gets weight ``1e20`` times its softmax share, as in the official code (the
    gradient of such a loss is tiny or 0; an Adam-like inner optimizer or
    ``max_grad_norm`` bounds the step either way). A nadir entry of 0 (a task at 0
    throughout the last warm-up epoch) is read as ``1e-20``. A *negative* loss raises a
    ``ValueError`` naming the task(s), before any state changes.

    State (tensors): ``epoch_sum (K,)`` and ``epoch_count`` (0-d) of the current warm-up
    epoch, ``epochs_done`` (0-d), ``nadir (K,)`` (zeros until the warm-up ends).

    Paper:
        X. Lin, X. Zhang, Z. Yang, F. Liu, Z. Wang, Q. Zhang, "Smooth Tchebycheff
        Scalarization for Multi-Objective Optimization", ICML 2024 (Equation 8, with the
        official code's multi-task set-up).

    Departures:
        Equals LibMTL's ``STCH`` (the official code) through and after the warm-up, nadir
        point included, ``1e-20`` offset inside the logs included
        (``tests/test_anchor_weighting_wave2.py``), except its reported all-ones weights.

    Cost:
        No Gram matrix or per-task gradient of its own: epoch sums and the nadir point in
        the state.

    When to use:
        Losses of very different scales, and the worst task matters most: the best row on
        the scale suite (79.4) and good on MultiDigits (1.17), with one warm-up epoch. Needs
        epoch boundaries; a loss that approaches 0 takes every weight.

    Args:
        mu: smoothing parameter ``mu > 0`` (default 1.0, the official code's).
        warmup_epochs: number of warm-up epochs (>= 1, default 5).
        steps_per_epoch: close an epoch automatically after this many steps
            (``None``: only :meth:`epoch_end` closes it).

    Raises:
        ValueError: a non-positive ``mu``, ``warmup_epochs`` or ``steps_per_epoch``.
    """

    name = "stch"

    def __init__(
        self, mu: float = 1.0, warmup_epochs: int = 5, steps_per_epoch: Optional[int] = None
    ) -> None:
        self.mu = check_positive_float(mu, "mu")
        self.warmup_epochs = check_positive_int(warmup_epochs, "warmup_epochs")
        self.steps_per_epoch = check_steps_per_epoch(steps_per_epoch)

    def init_state(self, num_tasks: int, num_blocks: int = 1) -> State:
        return {
            **epoch_totals(num_tasks),
            "epochs_done": scalar(0, torch.int64),
            "nadir": torch.zeros(num_tasks, dtype=torch.float64),
        }

    def _state(self, state: State, num_tasks: int) -> State:
        return state_for(self, state, num_tasks, "nadir", "STCH")

    def warming_up(self, state: State) -> bool:
        """Whether the warm-up is still running (no nadir point yet).

        Args:
            state: STCH's state.

        Returns:
            True during the warm-up epochs.
        """
        return not state or int(state["epochs_done"]) < self.warmup_epochs

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        losses = losses.to(torch.float64)
        check_nonnegative_losses(losses, ctx.task_names, "STCH", "takes log(L_i + 1e-20)")
        state = self._state(state, losses.shape[0])
        if not self.warming_up(state):
            nadir = state["nadir"].clamp_min(LOG_EPS)
            u = torch.log(losses / nadir + LOG_EPS) / self.mu
            return losses.shape[0] * torch.softmax(u, dim=0) / (losses + LOG_EPS * nadir), state
        new_state = {
            "epoch_sum": state["epoch_sum"] + losses,
            "epoch_count": state["epoch_count"] + 1,
            "epochs_done": state["epochs_done"].clone(),
            "nadir": state["nadir"].clone(),
        }
        if self.steps_per_epoch is not None and int(new_state["epoch_count"]) >= self.steps_per_epoch:
            new_state = self.epoch_end(new_state)
        return 1.0 / (losses + LOG_EPS), new_state

    def epoch_end(self, state: State) -> State:
        """Close a warm-up epoch; closing the last sets the nadir point (no-op after the warm-up)."""
        if not state or "epoch_count" not in state or not self.warming_up(state):
            return state
        if int(state["epoch_count"]) == 0:
            return state
        mean = state["epoch_sum"] / state["epoch_count"].to(torch.float64)
        done = state["epochs_done"] + 1
        return {
            "epoch_sum": torch.zeros_like(state["epoch_sum"]),
            "epoch_count": torch.zeros_like(state["epoch_count"]),
            "epochs_done": done,
            "nadir": mean if int(done) == self.warmup_epochs else state["nadir"].clone(),
        }

    def task_axes(self) -> None:
        """Not defined for steps lacking some tasks (STCH's nadir point is an epoch mean over every task): such a step is refused."""
        return None

    def settings(self) -> Dict[str, Any]:
        return {"mu": self.mu, "warmup_epochs": self.warmup_epochs, "steps_per_epoch": self.steps_per_epoch}
