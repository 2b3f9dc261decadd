"""Where the per-task rows come from, and how the combined update goes back.

The step pipeline runs the same stages in both modes; a *source* is the part that
differs:

- :class:`ParameterRows` (the default, exact): rows are the Jacobian of the losses with
  respect to the shared parameters (:mod:`._jacobian`); the update of a block is
  ``J_b^T c_b``. Under ``torch.distributed`` the rows are averaged across ranks.
- :class:`RepresentationRows` (``step(losses, representation=z)``, an approximation):
  rows are the gradients with respect to the shared representation ``z`` (head
  backwards only, factored for linear heads where measured faster: :mod:`._representation`,
  :class:`~._engine.HeadPaths`; the batch
  flattened into the row as in the MGDA-UB paper's code); the
  combined feature gradient ``Z^T c`` runs one backward through the trunk. A shared
  parameter outside the trunk (used by several heads after ``z``, not upstream of it)
  gets the gradient of the same combination, ``grad(sum_i c_i w_i L_i)``: the update
  every shared parameter gets in parameter mode for one block, and on a step the
  schedule leaves out (``surgery_every``, ``c = 1``) the gradient of the weighted sum,
  so it trains the same way on every step. Under ``torch.distributed`` the global Gram
  is the sum of the ranks' Grams over the global batch size squared, and the trunk
  updates are averaged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._combine import CombinePlan
from ._distributed import all_average, world_size
from ._engine import GradientEngine, HeadPaths
from ._factors import GramFactor
from ._gradients import Rows, TaskGradients, all_finite, reduce_tasks
from ._gram import GramPart
from ._graph import LossGraph
from ._host import host_stage
from ._losses import check_tensor
from .partition import Partition


def check_representation(features: Tensor, preconditioner: Any, aggregator: Any, partial: bool) -> None:
    """What representation mode cannot run, refused before anything changes.

    Raises:
        TypeError, ValueError: ``features`` is not a tensor that requires grad; a
            preconditioner or a row method (they need the parameters' rows); absent tasks
            under ``torch.distributed``.
    """
    check_tensor(features, "representation")
    if preconditioner is not None:
        raise ValueError("precondition is not supported in representation mode (representation=)")
    if aggregator.needs_jacobian:
        raise ValueError(
            f"surgery {aggregator.name!r} reads the Jacobian's rows and does not run in "
            "representation mode (representation=); use a Gram-based surgery or parameter mode"
        )
    if partial and world_size() > 1:
        raise ValueError("representation mode (representation=) needs every task on every rank")


class ParameterRows:
    """Per-task rows over the shared parameters (exact, parameter level)."""

    mode = "parameters"

    def __init__(self, engine: GradientEngine) -> None:
        self.engine = engine

    def map_graph(
        self, graph: LossGraph, params: Sequence[Tensor], representation: Optional[Tensor]
    ) -> LossGraph:
        """The graph as the partition reads it (FSDP2 maps unsharded leaves to sharded parameters)."""
        return graph

    def gather(
        self,
        losses: Sequence[Tensor],
        graph: LossGraph,
        partition: Partition,
        once: bool = False,
        keep: bool = False,
    ) -> TaskGradients:
        """``once``: these gradients are combined with one set of coefficients and nothing
        else (one step, one block, not accumulated): on one process the engine may then
        keep only the Gram of large factored layers (:class:`~._factors.GramFactor`).
        ``keep``: the graph stays usable for a backward of the caller's (weights-only mode)."""
        defer = once and world_size() == 1
        return self.engine.compute(losses, graph, partition.shared, partition.tasks, defer, keep)

    def blocks(self, blocks: List[List[int]]) -> List[List[int]]:
        return blocks

    #: each task's gradients and loss averaged over the ranks that had it (FSDP2
    #: reduce-scatters instead: :meth:`.fsdp.FSDPRows.reduce_tasks`)
    reduce_tasks = staticmethod(reduce_tasks)

    def grams(self, grads: TaskGradients, blocks: Sequence[Sequence[int]], num_tasks: int) -> Tensor:
        return grads.grams(blocks, num_tasks)

    def gram_parts(self, grads: TaskGradients, blocks: Sequence[Sequence[int]]) -> List[GramPart]:
        """Every block's Gram contributions, on the device (read with the step's one transfer)."""
        return grads.gram_parts(blocks)

    def updates(
        self, grads: TaskGradients, blocks: Sequence[Sequence[int]], mix: Tensor, partition: Partition
    ) -> Tuple[Rows, bool]:
        return grads.combine(blocks, mix)

    def planned_updates(
        self, grads: TaskGradients, blocks: Sequence[Sequence[int]], plan: CombinePlan, partition: Partition
    ) -> Tuple[Rows, bool]:
        """``J_b^T c_b`` as the host planned it (no host read unless the plan says so)."""
        return grads.combine_planned(blocks, plan)

    def path(self) -> Optional[str]:
        return self.engine.mode

    def stats(self, grads: TaskGradients) -> Dict[str, Any]:
        """Which shared tensors went through a factored linear rule, which through Jacobian rows."""
        factored = {pos for f in grads.factors for pos in f.positions()}
        out: Dict[str, Any] = {
            "factored_params": len(factored),
            "jacobian_params": sum(1 for j in grads.shared if j is not None),
            # of the factored: rows reduced to their Gram during the walk (many tasks)
            "gram_only_params": sum(len(f.positions()) for f in grads.factors if isinstance(f, GramFactor)),
        }
        if self.engine.timings:  # gradient_mode="auto" measured the paths on this step
            out["gradient_timings_ms"] = dict(self.engine.timings)
        return out


class RepresentationRows:
    """Per-task rows with respect to a shared representation ``z`` (an approximation)."""

    mode = "representation"

    def __init__(
        self,
        features: Tensor,
        graph: LossGraph,
        engine: Optional[GradientEngine] = None,
        loss_scale: float = 1.0,
    ) -> None:
        self.features = features
        self.graph = graph
        #: the head path's chooser: the engine's (measured, committed with its steps), else the rule
        self.heads = engine.heads if engine is not None else HeadPaths()
        self.loss_scale = loss_scale  # the losses :meth:`gather` gets are scaled by it (AMP)
        self.losses: Sequence[Tensor] = ()

    def gather(
        self,
        losses: Sequence[Tensor],
        graph: LossGraph,
        partition: Partition,
        once: bool = False,
        keep: bool = False,
    ) -> TaskGradients:
        self.losses = losses  # for the shared parameters outside the trunk (:meth:`updates`)
        return self.heads.rows(losses, self.features, partition.tasks, graph)

    def blocks(self, blocks: List[List[int]]) -> List[List[int]]:
        return [[0]]

    def reduce(self, grads: TaskGradients, values: Tensor) -> Tuple[TaskGradients, Tensor]:
        if world_size() == 1:
            return grads, values
        tasks = [g for task in grads.tasks for g in task if g is not None]
        reduced = iter(all_average([values, *tasks]))
        values = next(reduced)
        new_tasks = [[None if g is None else next(reduced) for g in task] for task in grads.tasks]
        return replace(grads, tasks=new_tasks), values  # the rows (and HeadFactor) are per rank

    def grams(self, grads: TaskGradients, blocks: Sequence[Sequence[int]], num_tasks: int) -> Tensor:
        gram = grads.grams(blocks, num_tasks)
        size = world_size()
        if size > 1:  # the global batch concatenates the ranks' rows
            gram = all_average([gram])[0] / size
        return gram

    def gram_parts(self, grads: TaskGradients, blocks: Sequence[Sequence[int]]) -> List[GramPart]:
        """The rows' Gram on the device; under torch.distributed, the ranks' average (read there)."""
        if world_size() == 1:
            return grads.gram_parts(blocks)
        return [GramPart(b, g) for b, g in enumerate(self.grams(grads, blocks, len(grads.tasks)))]

    def planned_updates(
        self, grads: TaskGradients, blocks: Sequence[Sequence[int]], plan: CombinePlan, partition: Partition
    ) -> Tuple[Rows, bool]:
        """``Z^T c`` as the host planned it, then one backward through the trunk.

        The trunk's update is read once to check it: the per-task gradients inside the
        trunk are never formed in this mode, so nothing bounds it beforehand."""
        combined, finite = TaskGradients(grads.shared[:1], [], grads.factors).combine_planned([[0]], plan)
        return self._through_trunk(combined[0], finite, plan.coefficients, partition)

    def updates(
        self, grads: TaskGradients, blocks: Sequence[Sequence[int]], mix: Tensor, partition: Partition
    ) -> Tuple[Rows, bool]:
        # Z^T c with the same float64 fallback and coefficient rescaling as parameter mode:
        # a coefficient beyond the rows' dtype (a tiny task scaled up) must not overflow
        combined, finite = TaskGradients(grads.shared[:1], [], grads.factors).combine([[0]], mix)
        return self._through_trunk(combined[0], finite, mix, partition)

    def _through_trunk(
        self, feature_grad: Optional[Tensor], finite: bool, mix: Tensor, partition: Partition
    ) -> Tuple[Rows, bool]:
        """The shared parameters' updates from the combined feature gradient."""
        if not finite or feature_grad is None:
            return [None] * len(partition.shared), False
        reached = [p for p in partition.shared if self.graph.reached_by(p)]
        got: Dict[int, Optional[Tensor]] = {}
        if reached:
            grads_ = torch.autograd.grad(self.features, reached, feature_grad, allow_unused=True)
            got = {id(p): g for p, g in zip(reached, grads_)}
        got.update(self._outside(mix, [p for p in reached if got.get(id(p)) is None]))
        updates: Rows = [got.get(id(p)) for p in partition.shared]
        if world_size() > 1:
            present = [u for u in updates if u is not None]
            averaged = iter(all_average(present))
            updates = [None if u is None else next(averaged) for u in updates]
        finite = all_finite([u for u in updates if u is not None])
        return updates, finite

    def _outside(self, mix: Tensor, params: Sequence[Tensor]) -> Dict[int, Optional[Tensor]]:
        """``grad(sum_i mix_i L_i)`` of the shared parameters the losses reach but not through
        ``z`` (one backward through the heads, which never enters the trunk)."""
        if not params:
            return {}
        with host_stage():  # the coefficients are the host stage's
            factors = (mix.reshape(-1) / self.loss_scale).tolist()
        total = sum(loss * f for loss, f in zip(self.losses, factors))
        grads = torch.autograd.grad(total, list(params), allow_unused=True)  # type: ignore[arg-type]
        return {id(p): g for p, g in zip(params, grads)}

    def path(self) -> Optional[str]:
        return "representation"

    def stats(self, grads: TaskGradients) -> Dict[str, Any]:
        """Which head path computed the rows (and, on a measuring step, each path's ms)."""
        out: Dict[str, Any] = {"representation_path": self.heads.path}
        if self.heads.timings:
            out["representation_timings_ms"] = dict(self.heads.timings)
        return out
