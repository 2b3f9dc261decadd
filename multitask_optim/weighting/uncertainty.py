"""Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, 2018)."""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ._per_task import (
    accumulate_grad,
    check_lr,
    check_num_losses,
    check_per_task,
    detached_f64,
    resolve_per_task,
)
from .base import State, Weighting, WeightingContext

_KINDS = ("regression", "classification")
#: Factor c in w = c * exp(-s): 1/2 for a Gaussian likelihood, 1 for a softmax one.
_FACTOR = {"regression": 0.5, "classification": 1.0}


def _check_kind(value: object, where: str) -> str:
    if value not in _KINDS:
        raise ValueError(f"{where} must be one of {_KINDS}, got {value!r}")
    return str(value)


class UncertaintyWeighting(Weighting):
    """Learned task weights from homoscedastic (task) uncertainty.

    Reference: A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty
    to Weigh Losses for Scene Geometry and Semantics", CVPR 2018 (eqs. 7 and 10).

    Each task has a learnable log-variance ``s_i = log sigma_i^2`` (initialised to 0)
    and contributes to the objective::

        regression:      1/(2 sigma_i^2) L_i + log sigma_i  =  1/2 e^{-s_i} L_i + 1/2 s_i
        classification:  1/sigma_i^2     L_i + log sigma_i  =      e^{-s_i} L_i + 1/2 s_i

    so the loss weights returned by :meth:`weights` are ``w_i = c_i e^{-s_i}`` with
    ``c_i = 1/2`` (regression) or ``1`` (classification), and :meth:`backward` writes

    ``d objective / d s_i = -w_i L_i + 1/2``

    into ``s.grad``. For a fixed loss the optimum is ``e^{s_i} = 2 c_i L_i``: a
    regression task's learned ``sigma_i^2`` tracks its mean squared error.

    We follow the paper: the classification term is ``e^{-s} L``, not the regression
    form. Some reference implementations (e.g. LibMTL's ``UW``) use the regression form
    ``1/2 e^{-s} L + 1/2 s`` for every task and start from ``s = -0.5``.

    Note:
        ``s`` lives in a param group of its own, updated by the inner optimizer. With an
        Adam-like optimizer each ``s_i`` moves by about one learning rate per step,
        whatever the loss scale, so balancing losses that differ by a factor 1e5
        (``s ~ 11.5``) takes thousands of steps at ``lr=1e-3``. Give the weighting its
        own, larger ``lr`` (e.g. 1e-2 to 5e-2). A magnitude imbalance of that size is
        what per-task preconditioning (``precondition=...``) removes at once.

    Args:
        kind: ``"regression"`` (default) or ``"classification"``, for every task, or
            one per task as a sequence in task order or a mapping ``{task name: kind}``
            (tasks a mapping leaves out are regression tasks).
        lr: learning rate of the weighting's param group (``None``: the first group's).

    Raises:
        ValueError: an unknown kind, a wrong number of kinds, unknown task names, or a
            learning rate that is not a positive finite number.
    """

    name = "uncertainty"

    def __init__(
        self,
        kind: Union[str, Sequence[str], Mapping[str, str]] = "regression",
        lr: Optional[float] = None,
    ) -> None:
        self._spec = check_per_task(kind, "kind", _check_kind, allow_scalar=True)
        self.lr = check_lr(lr)
        self.log_var: Optional[torch.nn.Parameter] = None
        self._kinds: Optional[List[str]] = None
        self._names: Optional[List[str]] = None

    def setup(self, num_tasks: int, task_names: Sequence[str]) -> None:
        kinds = resolve_per_task(self._spec, task_names, "kind", default="regression", allow_missing=True)
        same = self.log_var is not None and self._names == list(task_names)
        self._kinds = kinds
        self._names = list(task_names)
        if not same:
            self.log_var = torch.nn.Parameter(torch.zeros(num_tasks))

    def parameters(self) -> List[torch.nn.Parameter]:
        return [] if self.log_var is None else [self.log_var]

    def _ready(self, losses: Tensor, ctx: Optional[WeightingContext]) -> torch.nn.Parameter:
        if self.log_var is None:
            if ctx is None:
                raise RuntimeError("UncertaintyWeighting.setup() has not been called")
            self.setup(losses.shape[0], ctx.task_names)
        assert self.log_var is not None
        check_num_losses(losses, self.log_var.shape[0], "UncertaintyWeighting")
        return self.log_var

    def _factors(self) -> Tensor:
        assert self._kinds is not None
        return torch.tensor([_FACTOR[k] for k in self._kinds], dtype=torch.float64)

    @property
    def kinds(self) -> List[str]:
        """The resolved kind of every task (after :meth:`setup`)."""
        if self._kinds is None:
            raise RuntimeError("UncertaintyWeighting.setup() has not been called")
        return list(self._kinds)

    @property
    def sigma(self) -> Tensor:
        """Learned standard deviations ``sigma_i = sqrt(exp(s_i))``, float64, detached."""
        if self.log_var is None:
            raise RuntimeError("UncertaintyWeighting.setup() has not been called")
        return torch.exp(0.5 * detached_f64(self.log_var))

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        s = detached_f64(self._ready(losses, ctx))
        return self._factors() * torch.exp(-s), state

    def backward(self, losses: Tensor, weights: Tensor, state: State, ctx: WeightingContext) -> None:
        p = self._ready(losses, ctx)
        s = detached_f64(p)
        w = self._factors() * torch.exp(-s)
        accumulate_grad(p, 0.5 - w * losses.to(torch.float64))

    def objective(self, losses: Tensor, weights: Tensor) -> float:
        """``sum_i (w_i L_i + s_i / 2)`` for the weights of the step.

        ``s_i = log(c_i / w_i)`` is recovered from the weights themselves, so the value
        is that of the step the weights were used in, even after the inner optimizer
        has moved ``s``.
        """
        self._ready(losses, None)
        w = weights.detach().to(device="cpu", dtype=torch.float64)
        s = torch.log(self._factors()) - torch.log(w)
        return float((w * losses.to(torch.float64) + 0.5 * s).sum())

    def extra_repr(self) -> str:
        return f"kind={self._spec!r}, lr={self.lr}"
