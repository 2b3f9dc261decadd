"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., 2018)."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ._per_task import (
    LossRatio,
    accumulate_grad,
    check_loss_ratio_inputs,
    check_lr,
    detached_f64,
    present_names,
)
from .base import WEIGHTINGS, Gram, State, Weighting, WeightingContext


@WEIGHTINGS.register
class GradNorm(Weighting):
    """GradNorm: learn weights that equalise the tasks' gradient norms and training rates.

    Learnable weights ``w_i`` (initialised to 1). On the shared weights ``W`` — the
    parameters given as ``layer`` (the paper's choice: the last shared layer), or else
    the optimizer's last block (with ``granularity="global"``, the whole shared trunk)
    — read from the Gram of the *weighted* task gradients (no second backward)::

        G_i     = ||grad_W (w_i L_i)|| = sqrt(gram[-1][i, i])
        Lt_i    = L_i(t) / L_i(0)               (L_i(0): first observed loss, in the state)
        r_i     = Lt_i / mean_j(Lt_j)           (relative inverse training rate)
        target_i = mean_j(G_j) * r_i ** alpha   (held constant)
        L_grad  = sum_i |G_i - target_i|

    and, because ``G_i`` is linear in ``w_i``,
    ``d L_grad / d w_i = sign(G_i - target_i) * G_i / w_i``, which :meth:`backward`
    adds to ``w.grad``. The inner optimizer then updates ``w``, and :meth:`after_step`
    renormalises it in place so that ``sum_i w_i = K`` (after clamping each weight to at
    least ``min_weight`` so it stays positive).

    Each ``w_i`` is its own scalar parameter (:meth:`parameters` lists them in task
    order; :attr:`task_weights` stacks their values).

    A step that lacks some tasks (which the paper does not define): the training rates
    ``r_i`` and the mean gradient norm are over the present tasks only, only their
    weights get a gradient, and the renormalisation rescales the present weights so
    that all ``K`` still sum to ``K`` (an absent task's weight keeps its value; if the
    absent weights alone reach ``K``, the present ones are only clamped). ``L_i(0)`` is
    a task's loss in the first step that had it.

    Losses of 0: a first loss of exactly 0 (a task that starts solved, or a float32
    classification loss that underflowed) gives no usable ``L_i(0)``; the task's
    ``L_i(0)`` is then its first *positive* loss, and until one is seen its ratio
    ``Lt_i`` is 1 (as on the step that records it), so the run goes on. LibMTL divides
    by its first-epoch mean without a guard. A negative loss raises a ``ValueError``
    naming the task. On a step where the surgery does not
    run (``surgery_every``), there is no Gram, and the weights are not updated.

    We follow the paper: ``w`` is used directly and renormalised after every step, and
    ``L_i(0)`` is the loss of the first step. LibMTL's ``GradNorm`` differs: it
    parametrises ``w = K softmax(theta)``, trains with equal weights during the first
    epoch and takes ``L_i(0)`` as the first epoch's mean loss.

    Paper:
        Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient
        Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018
        (Algorithm 1).

    Departures:
        The gradient norms come from the Gram matrix of the weighted task gradients (no
        second backward). LibMTL's ``GradNorm`` parametrises ``w = K softmax(theta)``,
        trains with equal weights during the first epoch and takes ``L_i(0)`` from it; we
        follow the paper. Its weights through the optimizer equal a plain-loop reference of
        the paper's Algorithm 1 (autograd on a small model) to float32 rounding over six
        steps (``tests/test_gradnorm_reference.py``), and ``tests/test_gradnorm_synthetic.py``
        checks that it equalises the gradient norms of the chosen layer. A first loss of 0
        gives no usable ``L_i(0)``: the first positive loss is taken instead.

    Cost:
        No Gram matrix or per-task gradient of its own: K learnable scalars (own param
        group); it reads the Gram matrix of the chosen layer, which a full step forms
        anyway.

    When to use:
        Tasks whose gradient norms and training rates differ moderately. Its weights move by
        one learning rate per step, so a 10^6 imbalance is out of reach in a short run
        (scale suite 418); on MultiDigits it is within the seed spread of the plain sum
        (2.73).

    Args:
        alpha: strength of the restoring force towards equal training rates
            (``>= 0``; the paper's default 1.5; 0 equalises gradient norms only).
        lr: learning rate of the weights' param group (``None``: the first group's).
        layer: the shared parameters ``W`` whose gradient norms are balanced, e.g.
            ``list(trunk[-1].parameters())``. ``None``: the optimizer's last block.

    Raises:
        ValueError: a negative or non-finite ``alpha``, a bad ``lr``, or (at run time) a
            negative loss, which makes the loss ratio meaningless.
    """

    name = "gradnorm"
    learnable = True
    needs_gram = True
    #: Weights are clamped to at least this value before renormalising.
    min_weight: float = 1e-6

    def __init__(
        self, alpha: float = 1.5, lr: Optional[float] = None, layer: Optional[Iterable[Tensor]] = None
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.lr = check_lr(lr)
        self.layer: Optional[List[Tensor]] = None if layer is None else list(layer)
        if self.layer is not None and not self.layer:
            raise ValueError("layer must hold at least one parameter (or be None)")
        self._weights: List[torch.nn.Parameter] = []
        self._moved: List[int] = []

    def build(self, task_names: Tuple[str, ...]) -> None:
        self._weights = [torch.nn.Parameter(torch.ones(())) for _ in task_names]

    def parameters(self) -> List[torch.nn.Parameter]:
        return list(self._weights)

    def task_parameters(self) -> Optional[List[torch.nn.Parameter]]:
        return list(self._weights) or None

    @property
    def task_weights(self) -> Optional[Tensor]:
        """The weights ``w`` stacked into one ``(K,)`` tensor (a detached copy; None before binding)."""
        return torch.stack([p.detach() for p in self._weights]) if self._weights else None

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        return dict(LossRatio.AXES)

    def gram_params(self) -> Optional[List[Tensor]]:
        return self.layer

    def init_state(self, num_tasks: int, num_blocks: int = 1) -> State:
        return LossRatio.init_state(num_tasks)

    def _bound(self) -> List[torch.nn.Parameter]:
        if not self._weights:
            raise RuntimeError("GradNorm is not bound to tasks yet (call bind(task_names))")
        return self._weights

    def _values(self, ctx: WeightingContext) -> Tensor:
        params = self._bound()
        return torch.stack([detached_f64(params[i]) for i in ctx.indices])

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        w = self._values(ctx)
        initial, new_state = LossRatio.initial(losses, state)
        check_loss_ratio_inputs(losses, present_names(ctx), "GradNorm")
        return w, new_state

    def weight_gradient(self, losses: Tensor, weights: Tensor, gram: Tensor, initial: Tensor) -> Tensor:
        """``d L_grad / d w`` (float64, ``(K,)``), the closed form described above.

        Args:
            losses: ``(K,)`` loss values ``L_i(t)``.
            weights: ``(K,)`` weights the Gram was computed with.
            gram: ``(B, K, K)`` or ``(K, K)`` Gram of the weighted task gradients; the
                last block is the last shared layer.
            initial: ``(K,)`` first losses ``L_i(0)``.

        Returns:
            ``(K,)`` float64 gradient of ``L_grad`` with respect to the weights.
        """
        g = gram[-1] if gram.dim() == 3 else gram
        g = g.detach().to(device="cpu", dtype=torch.float64)
        w = weights.detach().to(device="cpu", dtype=torch.float64)
        norms = torch.diagonal(g).clamp_min(0.0).sqrt()  # G_i = ||grad_W (w_i L_i)||
        ratio = LossRatio.ratio(losses, initial)
        mean_ratio = ratio.mean()
        rel = ratio / mean_ratio if mean_ratio > 0 else torch.ones_like(ratio)
        target = norms.mean() * rel.pow(self.alpha)
        unweighted = torch.where(w > 0, norms / torch.where(w > 0, w, 1.0), 0.0)  # ||grad_W L_i||
        return torch.sign(norms - target) * unweighted

    def backward(
        self, losses: Tensor, weights: Tensor, state: State, ctx: WeightingContext, gram: Gram = None
    ) -> None:
        """Add ``d L_grad / d w`` to ``w.grad``.

        ``state`` may be the state before or after this step's :meth:`weights`: on the
        first step, when ``L_i(0)`` is not stored yet, ``L_i(0) = L_i(t)`` is used, which
        is what :meth:`weights` stores.

        Raises:
            ValueError: no ``gram=``, or a negative loss (it makes the loss ratio
                meaningless), naming the task.
            RuntimeError: the weighting is not bound to its tasks yet.
        """
        params = self._bound()
        if gram is None:
            raise ValueError("GradNorm.backward needs gram= (the Gram of the weighted task gradients)")
        initial, _ = LossRatio.initial(losses, state)
        check_loss_ratio_inputs(losses, present_names(ctx), "GradNorm")
        grad = self.weight_gradient(losses, weights, gram, initial)
        for n, i in enumerate(ctx.indices):
            accumulate_grad(params[i], grad[n])
        self._moved = ctx.indices

    def after_step(self) -> None:
        """Clamp the weights the step moved to ``>= min_weight`` and rescale them so that all
        ``K`` weights sum to ``K``."""
        moved, self._moved = self._moved, []
        if not self._weights or not moved:
            return
        k = len(self._weights)
        with torch.no_grad():
            for i in moved:
                self._weights[i].clamp_(min=self.min_weight)
            if len(moved) == k:
                factor = k / torch.stack(self._weights).sum()
            else:
                rest = sum(float(self._weights[i]) for i in range(k) if i not in moved)
                total = float(sum(float(self._weights[i]) for i in moved))
                if k - rest <= 0 or total <= 0:
                    return
                factor = torch.tensor((k - rest) / total)
            for i in moved:
                self._weights[i].mul_(factor)

    def settings(self) -> Dict[str, Any]:
        layer = None if self.layer is None else [tuple(p.shape) for p in self.layer]
        return {"alpha": self.alpha, "lr": self.lr, "layer": layer}
