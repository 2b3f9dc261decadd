"""Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, 2018)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._per_task import accumulate_grad, check_lr, check_per_task, detached_f64, resolve_per_task
from .base import WEIGHTINGS, Gram, State, Weighting, WeightingContext

_KINDS = ("regression", "classification")
#: Factor c in w = c * exp(-s): 1/2 for a Gaussian likelihood, 1 for a softmax one.
_FACTOR = {"regression": 0.5, "classification": 1.0}


def _check_kind(value: object, where: str) -> str:
    if value not in _KINDS:
        raise ValueError(f"{where} must be one of {_KINDS}, got {value!r}")
    return str(value)


@WEIGHTINGS.register
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
    learnable = True

    def __init__(
        self,
        kind: Union[str, Sequence[str], Mapping[str, str]] = "regression",
        lr: Optional[float] = None,
    ) -> None:
        self._spec = check_per_task(kind, "kind", _check_kind, allow_scalar=True)
        self.lr = check_lr(lr)
        self.log_var: Optional[torch.nn.Parameter] = None
        self._kinds: Optional[List[str]] = None

    def build(self, task_names: Tuple[str, ...]) -> None:
        self._kinds = resolve_per_task(
            self._spec, task_names, "kind", default="regression", allow_missing=True
        )
        self.log_var = torch.nn.Parameter(torch.zeros(len(task_names)))

    def parameters(self) -> List[torch.nn.Parameter]:
        return [] if self.log_var is None else [self.log_var]

    def _bound(self) -> torch.nn.Parameter:
        if self.log_var is None:
            raise RuntimeError("UncertaintyWeighting is not bound to tasks yet (call bind(task_names))")
        return self.log_var

    def _factors(self) -> Tensor:
        assert self._kinds is not None
        return torch.tensor([_FACTOR[k] for k in self._kinds], dtype=torch.float64)

    @property
    def kinds(self) -> List[str]:
        """The resolved kind of every task (after :meth:`bind`)."""
        self._bound()
        assert self._kinds is not None
        return list(self._kinds)

    @property
    def sigma(self) -> Tensor:
        """Learned standard deviations ``sigma_i = sqrt(exp(s_i))``, float64, detached."""
        return torch.exp(0.5 * detached_f64(self._bound()))

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        s = detached_f64(self._bound())
        return self._factors() * torch.exp(-s), state

    def backward(
        self, losses: Tensor, weights: Tensor, state: State, ctx: WeightingContext, gram: Gram = None
    ) -> None:
        p = self._bound()
        w = self._factors() * torch.exp(-detached_f64(p))
        accumulate_grad(p, 0.5 - w * losses.to(torch.float64))

    def objective(self, losses: Tensor, weights: Tensor) -> float:
        """``sum_i (w_i L_i + s_i / 2)``, with ``s`` read before the inner step moves it."""
        s = detached_f64(self._bound())
        w = weights.detach().to(device="cpu", dtype=torch.float64)
        return float((w * losses.to(torch.float64) + 0.5 * s).sum())

    def settings(self) -> Dict[str, Any]:
        return {"kind": self._spec, "lr": self.lr}
