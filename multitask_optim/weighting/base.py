"""Weighting contract: task losses in, task weights out.

A weighting maps the current loss values (and its own state) to weights ``w`` of
shape ``(K,)``; the optimizer then differentiates ``w_i * L_i`` per task (task
parameters receive ``grad(w_i L_i)``; the shared rows of the Jacobian are scaled by
``w_i``). Like aggregators, weightings are functional in their *state*: they return a
new state dict, which the optimizer commits only when the step is not skipped.

Learnable weightings (uncertainty, GradNorm) own ``torch.nn.Parameter`` s, created by
:meth:`Weighting.setup` once the number of tasks is known. The optimizer puts them in a
param group of their own (``group["task"] == "weighting"``, learning rate ``lr`` if the
weighting has one) so the inner optimizer updates them, and calls
:meth:`Weighting.backward` to fill their ``.grad`` each step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence

import torch
from torch import Tensor

State = Dict[str, Tensor]


@dataclass
class WeightingContext:
    """What a weighting may read besides the loss values.

    Attributes:
        generator: the optimizer's own seeded CPU generator (checkpointed with it).
        step: index of the step being computed (0 for the first non-skipped step).
        task_names: the task names, in order.
        gram: only in :meth:`Weighting.backward` of weightings with ``needs_gram``:
            ``(B, K, K)`` float64 Gram matrices of the *weighted* per-task gradients
            ``grad(w_i L_i)`` on the shared blocks, before any preconditioning; the
            last block is the one over :meth:`Weighting.gram_params` when it is set.
    """

    generator: torch.Generator
    step: int
    task_names: Sequence[str]
    gram: Optional[Tensor] = None


class Weighting(ABC):
    """Maps loss values to per-task weights.

    Subclasses set ``name`` (registry key) and implement :meth:`weights`.
    """

    name: ClassVar[str] = ""
    #: True if :meth:`backward` needs the Gram matrices of the weighted task gradients.
    needs_gram: ClassVar[bool] = False
    #: Learning rate of the weighting's own param group (None: the first group's lr).
    lr: Optional[float] = None

    def setup(self, num_tasks: int, task_names: Sequence[str]) -> None:  # noqa: B027
        """Called once when the number of tasks is known; create parameters here."""

    def parameters(self) -> List[torch.nn.Parameter]:
        """Learnable parameters, updated by the inner optimizer."""
        return []

    def gram_params(self) -> Optional[List[torch.Tensor]]:
        """Shared parameters whose Gram ``backward`` reads (``needs_gram``).

        ``None`` (default): the optimizer passes the Gram of every block, the last
        block last. A list: the optimizer passes one extra block, over exactly these
        parameters, as the last block of ``ctx.gram``.
        """
        return None

    def init_state(self, num_tasks: int) -> State:
        """Fresh state for ``num_tasks`` tasks."""
        return {}

    @abstractmethod
    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        """Return ``(weights (K,), new_state)`` for loss values ``losses (K,)``.

        ``losses`` is a detached float64 CPU tensor. Weights are returned detached
        (float64, CPU); the optimizer moves them where the losses live.
        """

    def backward(self, losses: Tensor, weights: Tensor, state: State, ctx: WeightingContext) -> None:  # noqa: B027
        """Fill ``.grad`` of :meth:`parameters` (accumulating, like ``Tensor.backward``)."""

    def objective(self, losses: Tensor, weights: Tensor) -> float:
        """The scalar objective this weighting optimises, reported in diagnostics."""
        return float((weights * losses).sum())

    def after_step(self) -> None:  # noqa: B027
        """Called after the inner optimizer stepped (e.g. to renormalise parameters)."""

    def epoch_end(self, state: State) -> State:
        """Epoch boundary (``opt.epoch_end()``); returns the new state."""
        return state

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class Equal(Weighting):
    """All weights 1: the plain sum of the losses."""

    name = "equal"

    def weights(self, losses: Tensor, state: State, ctx: WeightingContext) -> tuple[Tensor, State]:
        return torch.ones_like(losses), state
