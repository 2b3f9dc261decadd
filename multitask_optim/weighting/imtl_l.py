"""IMTL-L: loss balancing of Impartial Multi-Task Learning (Liu et al., 2021)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._per_task import accumulate_grad, check_lr, check_nonnegative_losses, detached_f64, present_names
from .base import WEIGHTINGS, Gram, State, Weighting, WeightingContext

#: Each loss enters the objective clamped at this floor (see "Losses of 0").
LOSS_FLOOR = 1e-8


@WEIGHTINGS.register
class IMTLL(Weighting):
    """IMTL-L: a learnable scale per task that makes every scaled loss equal to 1.

    Each task has a learnable ``s_i`` (initialised to 0) and contributes the term
    ``e^{s_i} L_i - s_i`` to the objective. So the loss weights returned by
    :meth:`weights` are ``w_i = e^{s_i}``, and :meth:`backward` writes

    ``d objective / d s_i = e^{s_i} L_i - 1``

    into ``s.grad``. For a fixed loss the optimum is ``e^{s_i} = 1 / L_i``: every scaled
    loss ``e^{s_i} L_i`` is driven to 1 (the ``- s_i`` term keeps ``s`` from running to
    minus infinity). ``s`` lives in a param group of its own, updated by the inner
    optimizer (as :class:`~multitask_optim.weighting.UncertaintyWeighting`'s
    log-variances); with an Adam-like optimizer it moves about one learning rate per
    step, so give it its own ``lr`` when the losses differ by orders of magnitude.

    The paper's full method, IMTL, combines IMTL-L with IMTL-G (gradient balancing);
    LibMTL's ``IMTL`` class implements only that hybrid. Here IMTL-L is the weighting and
    IMTL-G the surgery: ``weighting="imtl_l", surgery="imtl_g"`` is the hybrid.

    Losses of 0: for ``L_i = 0`` the term ``e^{s_i} L_i - s_i`` has no minimum in
    ``s_i`` (its gradient is -1 for ever, so ``s_i`` grows until ``e^{s_i}`` overflows),
    and a loss does reach exactly 0 in a legitimate run (a separable classification loss
    underflows in float32). The paper has no code and LibMTL's ``IMTL`` no guard; here
    every loss enters the objective clamped at ``1e-8``, ``L~_i = max(L_i, 1e-8)``
    (exactly the method for losses of at least ``1e-8``), so ``s_i`` settles at
    ``log(1e8)`` at most. A *negative* loss still raises a ``ValueError`` naming the
    task(s), before any state changes.

    Paper:
        L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang, "Towards
        Impartial Multi-task Learning", ICLR 2021 (Section 3.2, IMTL-L).

    Departures:
        LibMTL only has the IMTL hybrid; its loss-scale part equals ours to 1e-12 relative
        in the weights (``tests/test_anchor_weighting_wave2.py``). Each loss enters the
        objective clamped at ``1e-8`` (neither the paper nor LibMTL guards a loss of 0, for
        which ``s_i`` would grow until it overflows).

    Cost:
        No Gram matrix or per-task gradient of its own: K learnable scalars in their own
        param group.

    When to use:
        With ``surgery="imtl_g"`` (the paper's IMTL: scale suite 88.5, MultiDigits 1.12).
        Alone its scales move one learning rate per step, too slowly for a 10^6 imbalance in
        a short run (scale suite 412).

    Args:
        lr: learning rate of the weighting's param group (``None``: the first group's).

    Raises:
        ValueError: a learning rate that is not a positive finite number.
    """

    name = "imtl_l"
    learnable = True

    def __init__(self, lr: Optional[float] = None) -> None:
        self.lr = check_lr(lr)
        self.scale: Optional[torch.nn.Parameter] = None

    def build(self, task_names: Tuple[str, ...]) -> None:
        self.scale = torch.nn.Parameter(torch.zeros(len(task_names)))

    def parameters(self) -> List[torch.nn.Parameter]:
        return [] if self.scale is None else [self.scale]

    def _bound(self) -> torch.nn.Parameter:
        if self.scale is None:
            raise RuntimeError("IMTLL is not bound to tasks yet (call bind(task_names))")
        return self.scale

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        check_nonnegative_losses(losses, present_names(ctx), "IMTL-L", "minimises e^{s_i} L_i - s_i over s_i")
        return torch.exp(detached_f64(self._bound())), state

    def backward(
        self, losses: Tensor, weights: Tensor, state: State, ctx: WeightingContext, gram: Gram = None
    ) -> None:
        p = self._bound()
        grad = torch.exp(detached_f64(p)) * _floored(losses) - 1.0
        # a float64 gradient beyond the parameter's range would become inf there and
        # poison s for good; the largest finite value moves it as far
        limit = torch.finfo(p.dtype).max
        accumulate_grad(p, grad.clamp(-limit, limit))

    def objective(self, losses: Tensor, weights: Tensor) -> float:
        """``sum_i (e^{s_i} L_i - s_i)``, with ``s`` read before the inner step moves it."""
        s = detached_f64(self._bound())
        return float((torch.exp(s) * _floored(losses) - s).sum())

    def task_axes(self) -> None:
        """Not defined for steps lacking some tasks (IMTL-L's scales are one parameter vector): such a step is refused."""
        return None

    def settings(self) -> Dict[str, Any]:
        return {"lr": self.lr}


def _floored(losses: Tensor) -> Tensor:
    """The losses as IMTL-L's objective reads them: float64, clamped at :data:`LOSS_FLOOR`."""
    return losses.to(torch.float64).clamp_min(LOSS_FLOOR)
