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

    Each ``s_i`` is its own scalar parameter (:meth:`parameters` lists them in task
    order; :attr:`log_var` stacks their values). A step that lacks some tasks weighs
    the present ones and gives only their ``s_i`` a gradient, so the inner optimizer
    leaves an absent task's ``s_i`` and its moments exactly as they were.

    Paper:
        A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
        Losses for Scene Geometry and Semantics", CVPR 2018 (Equations 7 and 10).

    Departures:
        The classification term is the paper's ``e^{-s} L``; LibMTL's ``UW`` uses the
        regression form for every task and starts from ``s = -0.5`` (ours from 0). No anchor
        test compares it with another library's code; ``tests/test_weighting.py`` checks its
        closed form and that it learns noise levels.

    Cost:
        No Gram matrix or per-task gradient of its own: K learnable scalars in their own
        param group, updated by the inner optimizer.

    When to use:
        Moderate scale differences (MultiDigits 1.18-1.66, the best weighting there). Under
        an Adam-like optimizer ``s`` moves about one learning rate per step, so a 10^6
        imbalance is out of reach in a short run (scale suite ~400-420): give it a larger
        ``lr`` or use per-task preconditioning.

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
        self._log_vars: List[torch.nn.Parameter] = []
        self._kinds: Optional[List[str]] = None

    def build(self, task_names: Tuple[str, ...]) -> None:
        self._kinds = resolve_per_task(
            self._spec, task_names, "kind", default="regression", allow_missing=True
        )
        self._log_vars = [torch.nn.Parameter(torch.zeros(())) for _ in task_names]

    def parameters(self) -> List[torch.nn.Parameter]:
        return list(self._log_vars)

    def task_parameters(self) -> Optional[List[torch.nn.Parameter]]:
        return list(self._log_vars) or None

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        return {}

    @property
    def log_var(self) -> Optional[Tensor]:
        """The log-variances ``s`` stacked into one ``(K,)`` tensor (a detached copy; None before binding)."""
        return torch.stack([p.detach() for p in self._log_vars]) if self._log_vars else None

    def _bound(self) -> List[torch.nn.Parameter]:
        if not self._log_vars:
            raise RuntimeError("UncertaintyWeighting is not bound to tasks yet (call bind(task_names))")
        return self._log_vars

    def _s(self, indices: Sequence[int]) -> Tensor:
        params = self._bound()
        return torch.stack([detached_f64(params[i]) for i in indices])

    def _factors(self, indices: Sequence[int]) -> Tensor:
        assert self._kinds is not None
        return torch.tensor([_FACTOR[self._kinds[i]] for i in indices], dtype=torch.float64)

    @property
    def kinds(self) -> List[str]:
        """The resolved kind of every task (after :meth:`bind`)."""
        self._bound()
        assert self._kinds is not None
        return list(self._kinds)

    @property
    def sigma(self) -> Tensor:
        """Learned standard deviations ``sigma_i = sqrt(exp(s_i))``, float64, detached."""
        return torch.exp(0.5 * self._s(range(len(self._bound()))))

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        s = self._s(ctx.indices)
        self._present = ctx.indices
        return self._factors(ctx.indices) * torch.exp(-s), state

    def backward(
        self, losses: Tensor, weights: Tensor, state: State, ctx: WeightingContext, gram: Gram = None
    ) -> None:
        params = self._bound()
        w = self._factors(ctx.indices) * torch.exp(-self._s(ctx.indices))
        grad = 0.5 - w * losses.to(torch.float64)
        for n, i in enumerate(ctx.indices):
            accumulate_grad(params[i], grad[n])

    def objective(self, losses: Tensor, weights: Tensor) -> float:
        """``sum_i (w_i L_i + s_i / 2)`` over the tasks of the last :meth:`weights` call,
        with ``s`` read before the inner step moves it."""
        indices = getattr(self, "_present", None)
        if indices is None or len(indices) != losses.shape[0]:
            indices = list(range(losses.shape[0]))
        s = self._s(indices)
        w = weights.detach().to(device="cpu", dtype=torch.float64)
        return float((w * losses.to(torch.float64) + 0.5 * s).sum())

    def settings(self) -> Dict[str, Any]:
        return {"kind": self._spec, "lr": self.lr}
