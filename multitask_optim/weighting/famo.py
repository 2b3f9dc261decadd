"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., 2023)."""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor

from ._per_task import (
    check_nonnegative_float,
    check_nonnegative_losses,
    check_num_losses,
    check_positive_float,
    present_names,
    scalar,
    state_for,
)
from .base import WEIGHTINGS, State, Weighting, WeightingContext

#: The offset FAMO adds to every loss before its log (as the official code).
LOSS_EPS = 1e-8


@WEIGHTINGS.register
class FAMO(Weighting):
    """FAMO: weights that make every task's log-loss fall at the same rate.

    FAMO keeps logits ``xi`` (``z = softmax(xi)``, starting uniform). With
    ``D_i = L_i + 1e-8`` a step's weights are the gradient of
    ``sum_i z_i log D_i / c`` with ``c = sum_j z_j / D_j`` held constant::

        w_i = z_i / (c D_i)                      (sum_i w_i = 1)

    so the shared update is ``sum_i w_i grad L_i``. The logits then learn from how much
    each log-loss fell: with ``delta_i = log D_i(before) - log D_i(after)`` they take one
    Adam step (``lr``, ``betas``, ``eps``, L2 weight decay ``gamma`` added to the gradient,
    as ``torch.optim.Adam(weight_decay=gamma)``) on

        ``J_softmax(xi)^T delta = z * delta - z (z . delta)``,

    raising the weight of the tasks that improved least.

    Which losses are "after" (the paper needs the losses after a step):

    - by default the losses handed to the *next* step: at step ``t > 0`` the logits
      first take the Adam step with ``delta = log D(t-1) - log D(t)`` (the previous and
      this step's losses, on different batches), then this step's weights are computed
      from the updated logits;
    - the paper's same-batch variant: after each ``opt.step(losses)``, recompute the
      losses on the same batch and call ``opt.update_weighting(losses_after)``
      (:meth:`observe`). That call takes the Adam step with ``delta = log D(t) -
      log D(after)`` and consumes step ``t``'s losses, so the next step does not update
      the logits again (it only records its own losses).

    Each step's losses wait in the state for one of the two; a call to
    :meth:`observe` with nothing waiting (before the first step, after a skipped step,
    or a second time) changes nothing.

    The losses FAMO sees are the values the optimizer hands to its weighting stage:
    the raw (unweighted) per-task loss values as a float64 CPU vector, summed over
    micro-batches when :meth:`~multitask_optim.MultiTaskOptimizer.accumulate` is used and
    averaged across ranks under torch.distributed. Pass ``update_weighting`` losses on
    the same footing (e.g. the same ``1 / micro_batches`` scaling).

    State (tensors, so a skipped step drops the update and checkpoints resume
    bitwise): ``logits``, ``exp_avg``, ``exp_avg_sq`` (``(K,)`` float64), ``adam_steps``
    (0-d int64), ``pending`` (``(K,)``, the last step's losses) and ``has_pending`` (0-d
    bool). The logits are not a parameter group of the inner optimizer.

    Our ``delta`` uses the same ``+1e-8`` as the weights (as the official code and
    LibMTL's ``FAMO``); the official code's ``min_losses`` offset is 0 there and is not
    offered.

    Losses of 0: FAMO takes ``log D_i`` with ``D_i = L_i + 1e-8``, as the official code
    (which clamps nothing else), so a loss that reaches exactly 0 in a legitimate run (a
    separable classification loss underflows in float32) keeps the run going: ``D_i =
    1e-8`` and that task gets most of the weight (``w_i = z_i / (c D_i)``, as in the
    official code). A *negative* loss makes ``D_i`` zero or negative, so :meth:`weights`
    and :meth:`observe` raise a ``ValueError`` naming the task(s) for ``L_i < 0``, before
    any state changes.

    Paper:
        B. Liu, Y. Feng, P. Stone, Q. Liu, "FAMO: Fast Adaptive Multitask Optimization",
        NeurIPS 2023 (Algorithm 1).

    Departures:
        Equals LibMTL's ``FAMO`` (from the authors' code) to 1e-12 relative in the weights
        and the logits, in both the next-step and the same-batch variant
        (``tests/test_anchor_weighting_wave2.py``), with the official code's ``1e-8`` added to
        each loss inside the log. Its ``min_losses`` offset is not offered.

    Cost:
        No Gram matrix or per-task gradient of its own: K logits with Adam moments in the
        state, updated on the host.

    When to use:
        Losses of different scales and speeds: every log-loss falls at the same rate (scale
        suite 87, MultiDigits 1.43). Like GLS it weights a task by ``1 / L_i``: a loss that
        approaches 0 starves the others.

    Args:
        lr: Adam learning rate of the logits (default 0.025, the paper's).
        gamma: L2 weight decay of the logits (default 1e-3, the paper's).
        betas: Adam's ``(beta1, beta2)``, each in ``[0, 1)`` (default torch's).
        eps: Adam's ``eps`` (default torch's 1e-8).

    Raises:
        ValueError: a non-positive ``lr`` or ``eps``, a negative ``gamma`` or betas out
            of range.
    """

    name = "famo"

    def __init__(
        self,
        lr: float = 0.025,
        gamma: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        # not ``self.lr``: that names the learning rate of a weighting's param group,
        # and FAMO's logits live in its state, not in the inner optimizer
        self.logits_lr = check_positive_float(lr, "lr")
        self.gamma = check_nonnegative_float(gamma, "gamma")
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        checked = [check_nonnegative_float(b, f"betas[{n}]") for n, b in enumerate(betas)]
        for n, b in enumerate(checked):
            if b >= 1.0:
                raise ValueError(f"betas[{n}] must be in [0, 1), got {betas[n]!r}")
        self.betas = (checked[0], checked[1])
        self.eps = check_positive_float(eps, "eps")

    def init_state(self, num_tasks: int, num_blocks: int = 1) -> State:
        zeros = torch.zeros(num_tasks, dtype=torch.float64)
        return {
            "logits": zeros.clone(),
            "exp_avg": zeros.clone(),
            "exp_avg_sq": zeros.clone(),
            "adam_steps": scalar(0, torch.int64),
            "pending": zeros.clone(),
            "has_pending": scalar(False, torch.bool),
        }

    def _state(self, state: State, num_tasks: int) -> State:
        return state_for(self, state, num_tasks, "logits", "FAMO")

    def _check(self, losses: Tensor) -> None:
        check_num_losses(losses, None if self.task_names is None else len(self.task_names), "FAMO")
        check_nonnegative_losses(losses, self.task_names, "FAMO", "takes log(L_i + 1e-8)")

    def mixture(self, state: State) -> Tensor:
        """``z = softmax(logits)``, the task mixture the weights are built from.

        Args:
            state: FAMO's state.

        Returns:
            ``(K,)`` float64 mixture.
        """
        return torch.softmax(state["logits"], dim=0)

    def update_logits(self, state: State, before: Tensor, after: Tensor) -> State:
        """One Adam step of the logits from the losses ``before`` and ``after`` a step.

        Args:
            state: FAMO's state (never mutated).
            before: ``(K,)`` losses before the step.
            after: ``(K,)`` losses after it.

        Returns:
            The new state.
        """
        delta = torch.log(before + LOSS_EPS) - torch.log(after + LOSS_EPS)
        logits = state["logits"]
        z = torch.softmax(logits, dim=0)
        grad = z * delta - z * torch.dot(z, delta) + self.gamma * logits
        beta1, beta2 = self.betas
        steps = state["adam_steps"] + 1
        t = int(steps)
        exp_avg = state["exp_avg"] * beta1 + grad * (1.0 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1.0 - beta2)
        step_size = self.logits_lr / (1.0 - beta1**t)
        denom = exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**t) + self.eps
        return {
            "logits": logits - step_size * exp_avg / denom,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
            "adam_steps": steps,
            "pending": state["pending"],
            "has_pending": state["has_pending"],
        }

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        losses = losses.to(torch.float64)
        check_nonnegative_losses(losses, present_names(ctx), "FAMO", "takes log(L_i + 1e-8)")
        state = self._state(state, losses.shape[0])
        if bool(state["has_pending"]):
            state = self.update_logits(state, state["pending"], losses)
        z = self.mixture(state)
        d = losses + LOSS_EPS
        c = (z / d).sum()
        new_state = dict(state)
        new_state["pending"] = losses.clone()
        new_state["has_pending"] = scalar(True, torch.bool)
        return z / (c * d), new_state

    def observe(self, losses: Tensor, state: State) -> State:
        """The paper's same-batch update: the losses recomputed on this step's batch after it.

        Takes the logits' Adam step with ``delta = log D(before) - log D(after)`` for the
        last step's losses, which it consumes (see the class docstring). With nothing
        waiting it returns ``state`` unchanged.

        Args:
            losses: ``(K,)`` loss values after the step (float64, CPU).
            state: the weighting's state.

        Raises:
            ValueError: a wrong number of losses or a negative loss (named), before
                anything changes.
        """
        losses = losses.to(torch.float64)
        self._check(losses)
        if not state or not bool(state.get("has_pending", False)):
            return state
        state = self._state(state, losses.shape[0])
        new_state = self.update_logits(state, state["pending"], losses)
        new_state["has_pending"] = scalar(False, torch.bool)
        return new_state

    def task_axes(self) -> None:
        """Not defined for steps lacking some tasks (FAMO's logit update compares each task's losses of two consecutive steps): such a step is refused."""
        return None

    def settings(self) -> Dict[str, Any]:
        return {"lr": self.logits_lr, "gamma": self.gamma, "betas": self.betas, "eps": self.eps}
