"""Per-task adaptive preconditioning of the shared gradients (``precondition=``).

Each task keeps its own second-moment accumulator ``v_i`` over the shared parameters
and its gradient is rescaled element-wise::

    g_hat_i = g_i / (sqrt(v_hat_i) + eps)

- ``adagrad``: ``v_i <- v_i + g_i^2``, ``v_hat_i = v_i``;
- ``rmsprop``: ``v_i <- beta2 v_i + (1 - beta2) g_i^2``, ``v_hat_i = v_i``;
- ``adam``: the RMSProp EMA with bias correction ``v_hat_i = v_i / (1 - beta2^t)``.

This gives every task its own adaptive learning rate on the shared trunk: multiplying
one task's loss by ``c > 0`` leaves ``g_hat_i`` unchanged (up to ``eps``), so a task
whose loss is 1000x larger no longer dominates the shared update. With an inner SGD the
wrapper is exactly per-task Adagrad/RMSProp/Adam on the shared trunk.

The update is functional: :meth:`Preconditioner.apply` returns the rescaled gradients
and the new accumulators; the optimizer commits them only if the step is taken. The
accumulators have the parameters' dtype. A gradient so large that its square overflows
that dtype (above about 1.8e19 in float32) would make an accumulator infinite and every
later gradient zero: such a step is skipped instead, with nothing written, and training
goes on with the next batch.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._components import Component, Registry, State
from ._host import host_stage

Rows = List[Optional[Tensor]]


class Preconditioner(Component):
    """Per-task second-moment accumulators over the shared parameters.

    State keys are ``"<param>.v"`` (the ``(K, *shape)`` accumulator) and
    ``"<param>.step"`` (``(K,)``: how many times each task's accumulator was updated),
    ``<param>`` being the parameter's index in the optimizer. A step that lacks a task
    leaves its accumulator and its count as they are (Adam's bias correction counts
    the steps the task was present).

    Args:
        eps: added to ``sqrt(v_hat)`` (must be > 0).

    Raises:
        ValueError: naming ``eps`` when it is not a number > 0.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        self.eps = float(eps)

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        return {"*.v": (0,), "*.step": (0,)}

    @abstractmethod
    def second_moment(self, v_old: Tensor, square: Tensor, step: Tensor) -> Tuple[Tensor, Tensor]:
        """The new accumulator and the value the gradient is divided by (before ``sqrt``).

        Args:
            v_old: ``(K, *shape)`` previous accumulator (zeros at the start).
            square: ``(K, *shape)`` squared per-task gradients ``g^2``.
            step: ``(K,)`` float64 per-task step counts, this step included.

        Returns:
            ``(v, v_hat)``: the new accumulator and its bias-corrected value.
        """

    def apply(
        self, rows: Sequence[Optional[Tensor]], keys: Sequence[str], state: State
    ) -> Tuple[Rows, State]:
        """Rescale each ``(K, *shape)`` Jacobian by its tasks' accumulators.

        A parameter no loss reached (``rows[p] is None``) keeps its state unchanged.

        Args:
            rows: per shared parameter, its ``(K, *shape)`` per-task gradients (or None).
            keys: per shared parameter, its state key prefix (its index in the optimizer).
            state: the accumulators (never mutated).

        Returns:
            ``(rows, new_state)``: the rescaled rows and the new accumulators.
        """
        out: Rows = []
        new_state = dict(state)
        for jac, key in zip(rows, keys):
            if jac is None:
                out.append(None)
                continue
            v_old = state.get(f"{key}.v")
            if v_old is None:
                v_old = torch.zeros_like(jac)
            step = state.get(f"{key}.step")
            k = jac.shape[0]
            if step is None or step.dim() == 0:  # fresh, or a checkpoint with one shared count
                step = torch.zeros(k, dtype=torch.float64) + (0.0 if step is None else step)
            step = step + 1
            v, v_hat = self.second_moment(v_old, jac * jac, step)
            out.append(jac / v_hat.sqrt().add_(self.eps))
            new_state[f"{key}.v"] = v
            new_state[f"{key}.step"] = step
        return out, new_state

    def settings(self) -> Dict[str, Any]:
        return {"eps": self.eps}


PRECONDITIONERS: Registry[Preconditioner] = Registry("precondition", Preconditioner)
"""Preconditioners by name (``precondition=``); ``None``: no preconditioning."""


def _check_beta2(beta2: Any) -> float:
    if isinstance(beta2, bool) or not isinstance(beta2, (int, float)) or not 0.0 <= beta2 < 1.0:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
    return float(beta2)


@PRECONDITIONERS.register
class Adagrad(Preconditioner):
    """``v_i <- v_i + g_i^2`` (Duchi et al., 2011), per task.

    Each task keeps its own accumulator over the shared parameters and its gradient is
    rescaled element-wise, ``g_hat_i = g_i / (sqrt(v_i) + eps)``, so multiplying one task's
    loss by ``c > 0`` leaves ``g_hat_i`` unchanged (up to ``eps``). With an inner SGD this
    is per-task Adagrad on the shared trunk.

    Paper:
        J. Duchi, E. Hazan, Y. Singer, "Adaptive Subgradient Methods for Online Learning and
        Stochastic Optimization", JMLR 2011, applied per task.

    Departures:
        Not from a paper (this library's design): the Adagrad rule applied to each
        task's shared gradient separately. ``tests/test_optimizer_inputs.py`` checks
        that multiplying one task's loss by a constant leaves the update unchanged.

    Cost:
        A K x P accumulator over the shared parameters (K times the inner optimizer's second
        moment) and an element-wise rescale of the per-task gradients; it needs each task's
        gradient element by element, so the factored fast path is off.

    When to use:
        A magnitude imbalance, with an inner SGD, when the scales are stable. Its step sizes
        only shrink; ``"adam"`` adapts to scales that change.
    """

    name = "adagrad"

    def second_moment(self, v_old: Tensor, square: Tensor, step: Tensor) -> Tuple[Tensor, Tensor]:
        v = v_old + square
        return v, v


@PRECONDITIONERS.register
class RMSProp(Preconditioner):
    """``v_i <- beta2 v_i + (1 - beta2) g_i^2`` (Tieleman & Hinton, 2012), per task.

    Each task keeps its own accumulator over the shared parameters and its gradient is
    rescaled element-wise, ``g_hat_i = g_i / (sqrt(v_i) + eps)``, so multiplying one task's
    loss by ``c > 0`` leaves ``g_hat_i`` unchanged (up to ``eps``). With an inner SGD this
    is per-task RMSProp on the shared trunk.

    Paper:
        T. Tieleman, G. Hinton, Lecture 6.5 of "Neural Networks for Machine Learning", 2012,
        applied per task.

    Departures:
        Not from a paper (this library's design): the RMSProp rule applied to each
        task's shared gradient separately. ``tests/test_optimizer_inputs.py`` checks
        that multiplying one task's loss by a constant leaves the update unchanged.

    Cost:
        A K x P accumulator over the shared parameters (K times the inner optimizer's second
        moment) and an element-wise rescale of the per-task gradients; it needs each task's
        gradient element by element, so the factored fast path is off.

    When to use:
        As ``"adam"`` without the bias correction (its first steps are larger).

    Args:
        eps: added to ``sqrt(v_hat)`` (must be > 0).
        beta2: EMA rate of the accumulators, in ``[0, 1)``.

    Raises:
        ValueError: naming ``eps`` or ``beta2`` when it is out of range.
    """

    name = "rmsprop"

    def __init__(self, eps: float = 1e-8, beta2: float = 0.999) -> None:
        super().__init__(eps)
        self.beta2 = _check_beta2(beta2)

    def second_moment(self, v_old: Tensor, square: Tensor, step: Tensor) -> Tuple[Tensor, Tensor]:
        v = torch.lerp(v_old, square, 1.0 - self.beta2)
        return v, v

    def settings(self) -> Dict[str, Any]:
        return {"eps": self.eps, "beta2": self.beta2}


@PRECONDITIONERS.register
class Adam(RMSProp):
    """RMSProp's EMA with bias correction ``v_hat = v / (1 - beta2^t)`` (Kingma & Ba, 2015).

    Each task keeps its own accumulator over the shared parameters,
    ``v_i <- beta2 v_i + (1 - beta2) g_i^2``, and its gradient is rescaled element-wise,
    ``g_hat_i = g_i / (sqrt(v_i / (1 - beta2^t_i)) + eps)`` with ``t_i`` the steps that had
    task ``i``. Multiplying one task's loss by ``c > 0`` leaves ``g_hat_i`` unchanged (up to
    ``eps``): a task whose loss is 1000x larger no longer dominates the shared update. With
    an inner SGD this is per-task Adam (without momentum) on the shared trunk; with an inner
    Adam a global normalisation follows it.

    Paper:
        D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (the
        second moment with its bias correction), applied per task.

    Departures:
        Not from a paper (this library's design): the Adam second-moment rule applied to
        each task's shared gradient separately. ``tests/test_optimizer_inputs.py`` checks
        that multiplying one task's loss by a constant leaves the update unchanged.

    Cost:
        A K x P accumulator over the shared parameters (K times the inner optimizer's second
        moment) and an element-wise rescale of the per-task gradients; it needs each task's
        gradient element by element, so the factored fast path is off.

    When to use:
        Losses whose scales differ by orders of magnitude: one setting removes the imbalance
        (scale suite 87 against 391). Under an inner Adam two normalisations stack and
        MultiDigits gets worse (4.7-5.0); with an inner SGD with momentum it is the only
        configuration that beats the single-task models there (-1.73).
    """

    name = "adam"

    def second_moment(self, v_old: Tensor, square: Tensor, step: Tensor) -> Tuple[Tensor, Tensor]:
        v = torch.lerp(v_old, square, 1.0 - self.beta2)
        with host_stage():  # the step counts are host state (float64 CPU)
            corrections = [1.0 - self.beta2 ** float(t) for t in step.tolist()]
        if len(set(corrections)) == 1:
            return v, v / corrections[0]
        shape = (len(corrections),) + (1,) * (v.dim() - 1)
        return v, v / torch.tensor(corrections, dtype=v.dtype, device=v.device).view(shape)
