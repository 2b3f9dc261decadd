"""Weighting contract: task losses in, task weights out.

A weighting maps the current loss values (and its own state) to weights ``w`` of
shape ``(K,)``; the optimizer then scales task ``i``'s gradients by ``w_i``. Like every
component (:mod:`multitask_optim._components`), a weighting is functional in its
*state*: :meth:`Weighting.weights` returns a new state dict, which the optimizer
commits only when the step is taken.

Lifecycle (owned by this base class, as torchmetrics' ``Metric`` owns a metric's):
the optimizer calls :meth:`Weighting.bind` with the task names once they are known
(at construction when given, else at the first step). ``bind`` resolves per-task
arguments and creates learnable parameters through the subclass hook
:meth:`Weighting.build`; no subclass sets itself up lazily.

Learnable weightings (``learnable = True``: uncertainty, GradNorm) own
``torch.nn.Parameter`` s. The optimizer puts them in a param group of their own
(``group["task"] == "weighting"``, learning rate ``lr`` if the weighting has one) so the
inner optimizer updates them, and calls :meth:`Weighting.backward` to fill their
``.grad`` each step. What ``backward`` needs from the step is declared: with
``needs_gram = True`` it receives ``gram=``, the Gram matrices of the weighted per-task
gradients over :meth:`Weighting.gram_params` (or over every block).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._components import Component, Registry, State

#: The Gram matrices a weighting with ``needs_gram`` receives (``None`` for the others).
Gram = Optional[Tensor]


@dataclass
class WeightingContext:
    """What a weighting may read besides the loss values.

    Attributes:
        generator: the optimizer's own seeded CPU generator (checkpointed with it).
        step: index of the step being computed (0 for the first taken step).
        task_names: every task's name, in order.
        present: indices of the tasks this step has (None: all). The losses, the
            state (sliced along the axes :meth:`Weighting.task_axes` declares) and the
            returned weights are the present tasks'.
    """

    generator: torch.Generator
    step: int
    task_names: Sequence[str]
    present: Optional[Sequence[int]] = None

    @property
    def indices(self) -> List[int]:
        """The present tasks' indices (every task's when ``present`` is None)."""
        return list(range(len(self.task_names))) if self.present is None else list(self.present)


class Weighting(Component):
    """Maps loss values to per-task weights.

    Subclasses set ``name`` (registry key), validate their arguments in ``__init__``,
    resolve per-task arguments and create parameters in :meth:`build`, and implement
    :meth:`weights`.

    Steps with absent tasks: the weighting is bound to all ``K`` tasks and asked for the
    weights of the present ones (``ctx.present``); per-task arguments (static weights,
    start steps, kinds; resolved for all ``K`` tasks by :meth:`build`) and parameters
    are read at ``ctx.indices``, so a weighting declares no
    :attr:`~multitask_optim._components.Component.per_task` settings. A weighting declares its state's task axes
    (:meth:`~multitask_optim._components.Component.task_axes`, ``{}`` when it has no
    per-task state or reads ``ctx.present`` itself); without a declaration it is refused
    such steps. A learnable weighting keeps one scalar parameter per task, so an absent
    task's parameter gets no gradient and the inner optimizer leaves it and its moments
    alone.

    :meth:`weights` runs on the host: the loss values (and, for :attr:`needs_gram`, the
    Grams) are float64 CPU copies taken in the step's one device-to-host transfer, and
    the learnable parameters are created on the CPU; reading them never waits for an
    accelerator.
    """

    #: Whether the weighting owns learnable parameters (it then adds a param group).
    learnable: ClassVar[bool] = False
    #: Whether :meth:`backward` needs the Gram matrices of the weighted task gradients.
    needs_gram: ClassVar[bool] = False
    #: Learning rate of the weighting's own param group (None: the first group's).
    lr: Optional[float] = None

    task_names: Optional[Tuple[str, ...]] = None

    def bind(self, task_names: Sequence[str]) -> None:
        """Fix the tasks (once) and call :meth:`build`; binding the same names again is a no-op.

        Args:
            task_names: every task's name, in order.
        """
        names = tuple(task_names)
        if self.task_names == names:
            return
        self.build(names)
        self.task_names = names

    @property
    def num_tasks(self) -> int:
        if self.task_names is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to tasks yet (call bind(task_names))")
        return len(self.task_names)

    def build(self, task_names: Tuple[str, ...]) -> None:  # noqa: B027
        """Hook: resolve per-task arguments and create parameters for these tasks.

        Args:
            task_names: every task's name, in order.
        """

    def parameters(self) -> List[torch.nn.Parameter]:
        """Learnable parameters, updated by the inner optimizer.

        Returns:
            The parameters (empty for a weighting that learns nothing).
        """
        return []

    def task_parameters(self) -> Optional[List[torch.nn.Parameter]]:
        """The learnable parameters that belong to one task each, in task order.

        An absent task's parameter gets no ``.grad`` in that step.

        Returns:
            One parameter per task, or None when the weighting has no such parameters.
        """
        return None

    def gram_params(self) -> Optional[List[torch.Tensor]]:
        """Shared parameters whose Gram :meth:`backward` reads (``needs_gram``).

        Returns:
            ``None`` (default): the Gram of every block, the last block last. A list: one
            block over exactly these parameters.
        """
        return None

    def init_state(self, num_tasks: int, num_blocks: int = 1) -> State:
        """Fresh state for ``num_tasks`` tasks."""
        return {}

    def compute(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        """Bind to ``ctx.task_names`` if needed, check the losses, return :meth:`weights`.

        Args:
            losses: ``(K',)`` float64 loss values of the present tasks.
            state: the weighting's state (never mutated).
            ctx: generator, step, task names, present tasks.

        Returns:
            ``(weights, new_state)`` as :meth:`weights`.

        Raises:
            ValueError: ``losses`` is not a vector of one value per present task.
        """
        self.bind(ctx.task_names)
        expected = self.num_tasks if ctx.present is None else len(ctx.present)
        if losses.dim() != 1 or losses.shape[0] != expected:
            raise ValueError(
                f"{type(self).__name__}: expected {expected} losses, got shape {tuple(losses.shape)}"
            )
        return self.weights(losses, state, ctx)

    @abstractmethod
    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        """The task weights for the current loss values.

        Args:
            losses: ``(K,)`` detached float64 CPU loss values (the present tasks' on a step
                that lacks some).
            state: the weighting's state (never mutated).
            ctx: generator, step, task names, present tasks.

        Returns:
            ``(weights, new_state)``: ``(K,)`` detached float64 CPU weights (the optimizer
            moves them where the losses live) and the new state.
        """

    def backward(  # noqa: B027
        self, losses: Tensor, weights: Tensor, state: State, ctx: WeightingContext, gram: Gram = None
    ) -> None:
        """Fill ``.grad`` of :meth:`parameters` (accumulating, like ``Tensor.backward``).

        Args:
            losses: ``(K,)`` float64 loss values of the step.
            weights: the weights :meth:`weights` returned for them.
            state: the weighting's state.
            ctx: generator, step, task names, present tasks.
            gram: for weightings with ``needs_gram``: ``(B, K, K)`` float64 Gram matrices of
                the *weighted* per-task gradients ``grad(w_i L_i)`` on the shared blocks,
                before any preconditioning (one block over :meth:`gram_params` when set).
        """

    def is_constant_one(self) -> bool:
        """Whether every weight is always 1 (the plain sum of the losses).

        Returns:
            True only for the equal weighting.
        """
        return False

    def objective(self, losses: Tensor, weights: Tensor) -> float:
        """The scalar objective this weighting optimises (read before the inner step).

        Args:
            losses: ``(K,)`` loss values of the step.
            weights: the weights applied to them.

        Returns:
            The objective (``sum_i w_i L_i`` unless the method says otherwise).
        """
        return float((weights * losses).sum())

    def after_step(self) -> None:  # noqa: B027
        """Called after the inner optimizer stepped (e.g. to renormalise parameters)."""

    def epoch_end(self, state: State) -> State:
        """Epoch boundary (``opt.epoch_end()``).

        Args:
            state: the weighting's state (never mutated).

        Returns:
            The new state (``state`` itself for weightings that do not count epochs).
        """
        return state

    def observe(self, losses: Tensor, state: State) -> State:
        """Learn from losses recomputed on the same batch after a step (``opt.update_weighting``).

        Only weightings that learn from the change of the losses across a step (FAMO)
        override this.

        Args:
            losses: float64 CPU vector ``(K,)`` of the losses after the step.
            state: the weighting's state (never mutated).

        Returns:
            The new state.

        Raises:
            NotImplementedError: this weighting does not use such losses.
        """
        raise NotImplementedError(
            f"weighting {self.name!r} does not use losses recomputed after a step (update_weighting)"
        )


WEIGHTINGS: Registry[Weighting] = Registry("weighting", Weighting)
"""Weightings by name (``weighting=``); ``None`` builds :class:`Equal`.

Register a new one with ``@WEIGHTINGS.register`` (or :func:`register_weighting`).
"""


@WEIGHTINGS.register
class Equal(Weighting):
    """All weights 1: the plain sum of the losses.

    Paper:
        None: every weight is 1 (the plain sum of the losses).

    Departures:
        None.

    Cost:
        No Gram matrix or per-task gradient of its own: the weights are constant.

    When to use:
        The default (``weighting=None``).
    """

    name = "equal"

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        return {}

    def is_constant_one(self) -> bool:
        return True

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        return torch.ones_like(losses), state


WEIGHTINGS.default = Equal
