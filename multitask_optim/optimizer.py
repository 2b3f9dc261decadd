"""MultiTaskOptimizer: wrap any torch optimizer, hand ``step`` the per-task losses.

This file is the conductor: it holds the torch optimizer contract and runs the stages
of one step (see :mod:`.pipeline`) in order::

    step(losses) -> _gather -> _run: reduce, weigh, precondition, gram, aggregate,
                    combine (_compute) -> _commit -> _take (inner step, stats)
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import checkpoint, groups
from .aggregators import AGGREGATORS, AggregationContext, Aggregator, RowAggregator
from .amp import current_scale
from .amp import update as amp_update
from .arguments import (
    Granularity,
    TaskLR,
    blocks_of,
    check_granularity,
    check_task_lr,
    component_kwargs,
    task_names_from,
    task_rates,
)
from .components import State
from .diagnostics import step_stats
from .distributed import world_size
from .gradients import Rows, TaskGradients, all_finite
from .graph import LossGraph, analyse
from .jacobian import GradientEngine
from .losses import Losses, check_losses, check_passes, check_tensor, loss_values, named_features
from .partition import Partition, TasksArg, check_against_graph, discover, explicit, warn_unused
from .pipeline import (
    Gathered,
    Outcome,
    Structure,
    aggregate,
    non_finite_losses,
    precondition,
    scale_tasks,
    weigh,
    weighted_gram,
    write_grad,
)
from .precondition import PRECONDITIONERS, Preconditioner
from .sources import ParameterRows, RepresentationRows
from .weighting import WEIGHTINGS, Weighting, WeightingContext

Source = Union[ParameterRows, RepresentationRows]


class MultiTaskOptimizer(Optimizer):
    """Multi-task training inside the optimizer.

    Wraps any ``torch.optim.Optimizer``; ``step(losses)`` takes one scalar loss per task,
    computes per-task gradients (task parameters from their own loss, shared parameters
    as a K-row Jacobian), optionally weights the losses, rescales each task's shared
    gradient by its own adaptive accumulator, combines the shared rows with a
    gradient-surgery aggregator (PCGrad by default), writes ``.grad`` and calls the inner
    optimizer's ``step()``. ``param_groups`` and ``state`` are the inner optimizer's, so
    LR schedulers, ``state_dict()`` and optimizer hooks work unchanged.

    Args:
        optimizer: the inner optimizer (SGD, Adam, AdamW, a third-party one, ...).
        shared: shared parameters (explicit partition; needs ``tasks``).
        tasks: per-task parameters, a mapping ``{name: params}`` or a list. When omitted
            the partition is discovered from the autograd graph on the first step.
        surgery: ``None`` (plain sum), a registered name (default ``"pcgrad"``;
            ``"gradvac"``, ``"mgda"``, ...) or an :class:`~multitask_optim.aggregators.Aggregator`.
        precondition: ``None`` (default), ``"adagrad"``, ``"rmsprop"`` or ``"adam"``:
            per-task second-moment accumulators on the shared parameters, or a
            :class:`~multitask_optim.precondition.Preconditioner`.
        granularity: ``"global"`` (default; one Gram over all shared parameters),
            ``"tensor"`` (one per parameter tensor) or a list of parameter lists.
        task_lr: per-task learning rates (mapping by task name, may include
            ``"shared"``, or a list in task order). Splits the param groups into
            ``shared`` + one per task, each with a ``"task"`` key.
        seed: seed of the optimizer's own generator (task orders, random weights).
            Default: drawn from torch's global generator, so ``torch.manual_seed``
            makes runs reproducible.
        weighting: ``None`` (equal weights), a registered name or a
            :class:`~multitask_optim.weighting.Weighting`.
        num_tasks: number of tasks, when the partition is automatic, so that learnable
            weightings can create their parameters at construction (tasks named
            ``"0"``, ``"1"``, ...).
        task_names: the task names, when the partition is automatic and the losses
            come as a mapping (implies ``num_tasks``).
        surgery_kwargs: hyper-parameters of a surgery given by name (e.g. ``beta``,
            ``reduction``).
        weighting_kwargs: hyper-parameters of a weighting given by name.
        precondition_kwargs: hyper-parameters of a preconditioner given by name
            (``eps``, ``beta2``).
        gradient_mode: ``"auto"`` (frontier, falling back to batched then looped),
            ``"frontier"``, ``"lean"``, ``"batched"`` or ``"looped"``.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 training: losses are
            scaled, per-task gradients unscaled before anything reads them, and a step
            with an inf/NaN is skipped and lowers the scale (see :mod:`.amp`). Do not
            call ``scaler.step`` / ``scaler.update`` yourself.
        reduction, beta, eps, beta2: deprecated spellings of ``surgery_kwargs`` /
            ``precondition_kwargs`` entries (a ``DeprecationWarning``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        shared: Optional[Iterable[Tensor]] = None,
        tasks: Optional[TasksArg] = None,
        surgery: Union[None, str, Aggregator] = "pcgrad",
        precondition: Union[None, str, Preconditioner] = None,
        granularity: Granularity = "global",
        task_lr: TaskLR = None,
        seed: Optional[int] = None,
        weighting: Union[None, str, Weighting] = None,
        num_tasks: Optional[int] = None,
        task_names: Optional[Sequence[str]] = None,
        surgery_kwargs: Optional[Mapping[str, Any]] = None,
        weighting_kwargs: Optional[Mapping[str, Any]] = None,
        precondition_kwargs: Optional[Mapping[str, Any]] = None,
        gradient_mode: str = "auto",
        grad_scaler: Optional[Any] = None,
        reduction: Optional[str] = None,
        beta: Optional[float] = None,
        eps: Optional[float] = None,
        beta2: Optional[float] = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError("optimizer is already a MultiTaskOptimizer")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self._init_hooks()
        self._params: List[Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        self._index_of: Dict[int, int] = {id(p): n for n, p in enumerate(self._params)}
        if len(self._index_of) != len(self._params):
            raise ValueError("optimizer: a parameter appears in more than one param group")

        old = {"reduction": reduction, "beta": beta, "eps": eps, "beta2": beta2}
        self.aggregator: Aggregator = AGGREGATORS.build(
            surgery, component_kwargs("surgery", surgery, surgery_kwargs, old)
        )  # type: ignore[assignment]
        self.preconditioner: Optional[Preconditioner] = PRECONDITIONERS.build(
            precondition, component_kwargs("precondition", precondition, precondition_kwargs, old)
        )
        self.weighting: Weighting = WEIGHTINGS.build(weighting, weighting_kwargs)  # type: ignore[assignment]
        self.engine = GradientEngine(
            gradient_mode, factored=self.preconditioner is None and not self.aggregator.needs_jacobian
        )
        self._rows = ParameterRows(self.engine)
        self._granularity = check_granularity(granularity, self._index_of)
        self._task_lr = check_task_lr(task_lr)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.grad_scaler = grad_scaler
        self.last_stats: Dict[str, Any] = {}
        self.skipped = 0
        self._warned_skip = False
        self._accumulated: Optional[Gathered] = None
        # committed state: changed only by a taken step or a load
        self._partition: Optional[Partition] = None
        self._blocks: Optional[List[List[int]]] = None
        self._names: Optional[Tuple[str, ...]] = None
        self._split = False
        self._weighting_ready = False
        self._steps = 0
        self._states: Dict[str, State] = {"surgery": {}, "weighting": {}, "precondition": {}}

        if shared is not None and tasks is None:
            raise ValueError("shared= needs tasks= (the per-task parameters) as well")
        partition = explicit(self._params, shared, tasks) if tasks is not None else None
        names = task_names_from(partition.names if partition else None, task_names, num_tasks)
        if self._task_lr is not None and names is not None:
            task_rates(self._task_lr, names)
        if partition is not None:
            if partition.unused:
                warn_unused(partition.unused, self._index_of, "were not listed in shared= or tasks=")
            self._adopt_partition(partition, warn=False)
        if names is not None:
            self._adopt_weighting(names)

    def _init_hooks(self) -> None:
        self._optimizer_step_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: Dict[int, Callable] = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    # ------------------------------------------------------------------ torch contract
    @property  # type: ignore[override]
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def tasks(self) -> Tuple[str, ...]:
        """Task names (``"0"``, ``"1"``, ... for a sequence of losses); empty until known."""
        return self._names or ()

    @property
    def partition(self) -> Optional[Partition]:
        """The shared / per-task / unused parameters (None until discovered)."""
        return self._partition

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its parameters are left to it (unused role)."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and drop micro-batches accumulated since the last step."""
        self._accumulated = None
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        parts = [
            f"optimizer={type(self.optimizer).__name__}",
            f"surgery={self.aggregator!r}",
            f"precondition={self.preconditioner!r}",
            f"weighting={self.weighting!r}",
            f"granularity={self._granularity if isinstance(self._granularity, str) else 'blocks'}",
            f"tasks={self.tasks}",
        ]
        return f"MultiTaskOptimizer({', '.join(parts)})"

    # ------------------------------------------------------------------ the step
    def step(  # type: ignore[override]
        self,
        losses: Optional[Losses] = None,
        closure: Optional[Callable[[], Any]] = None,
        *,
        representation: Optional[Tensor] = None,
        features: Optional[Union[Tensor, Sequence[Tensor]]] = None,
    ) -> Any:
        """One optimisation step on the per-task ``losses``.

        Without ``losses`` and with nothing accumulated this is exactly the inner
        optimizer's ``step(closure)`` on the gradients the caller put in ``.grad``.
        Without ``losses`` after :meth:`accumulate` calls, it aggregates the accumulated
        per-task gradients once and steps.

        Args:
            losses: one scalar loss per task, as a sequence or a mapping by task name. A
                callable here is taken as the closure (``opt.step(closure)`` as in torch).
            closure: without ``losses`` (and nothing accumulated), passed to the inner
                optimizer. With losses it is called first under grad mode, as torch
                optimizers call theirs (PyTorch Lightning's ``LightningOptimizer.step``
                always passes one), and its value is returned.
            representation: representation mode, **an approximation** of the
                parameter-level method: per-task gradients are taken w.r.t. this shared
                representation ``z``, aggregated there, and one backward runs through the
                trunk with the aggregated feature gradient (MGDA-UB with ``"mgda"``).
            features: as in TorchJD's ``mtl_backward``: the tensor(s) where the heads
                start. A hint only; the step stays exact and parameter-level.

        Returns:
            The inner optimizer's return value, or the closure's (None without one).
        """
        if callable(losses) and not isinstance(losses, (Tensor, Mapping, list, tuple)):
            if closure is not None:
                raise TypeError("step() got two closures (positional and closure=)")
            losses, closure = None, losses  # torch's positional idiom: opt.step(closure)
        if losses is None and self._accumulated is None:
            if representation is not None or features is not None:
                raise ValueError("representation= and features= need losses")
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if self._accumulated is not None and (representation is not None or features is not None):
            raise ValueError("representation= and features= cannot be combined with accumulated losses")
        if losses is not None and self._accumulated is not None:
            raise ValueError(
                "accumulate() was called before: call step() without losses to aggregate the accumulated "
                "gradients, or accumulate() this micro-batch too"
            )
        result = None
        if closure is not None:  # as torch optimizers do: run it first, return its value
            with torch.enable_grad():
                result = closure()
        if losses is None:
            gathered, self._accumulated = self._accumulated, None
            assert gathered is not None
            self._run(gathered, self._rows)
        else:
            self._run(*self._gather_with_source(losses, features, representation))
        return result

    def accumulate(self, losses: Losses) -> None:
        """Add one micro-batch's per-task gradients; the next ``step()`` aggregates them once.

        Task and shared gradients are summed over micro-batches (as ``backward`` would
        sum them: scale the losses by ``1 / micro_batches`` for a mean), and the loss
        values are summed for the weighting. The aggregation (weighting,
        preconditioning, Gram, surgery) then runs once on the sum, so ``M`` micro-batches
        equal one step on their concatenation. Memory is bounded by one Jacobian.
        :meth:`zero_grad` drops what was accumulated.
        """
        self._accumulated = self._gather(losses, self._accumulated, None, None)[0]

    def epoch_end(self) -> None:
        """Mark an epoch boundary for epoch-based weightings (DWA)."""
        self._states["weighting"] = self.weighting.epoch_end(self._states["weighting"])

    # ------------------------------------------------------------------ gather
    def _gather_with_source(
        self,
        losses: Losses,
        features: Optional[Union[Tensor, Sequence[Tensor]]],
        representation: Optional[Tensor],
    ) -> Tuple[Gathered, Source]:
        return self._gather(losses, None, features, representation)

    def _gather(
        self,
        losses: Losses,
        into: Optional[Gathered],
        features: Optional[Union[Tensor, Sequence[Tensor]]],
        representation: Optional[Tensor],
    ) -> Tuple[Gathered, Source]:
        """Check the losses and compute this micro-batch's per-task gradients (no state change).

        Returns the gathered gradients (added to ``into`` when accumulating) and the
        source they came from.
        """
        known = self._names if self._names is not None else (into.names if into is not None else None)
        names, loss_list = check_losses(losses, known)
        if representation is not None:
            check_tensor(representation, "representation")
            if self.preconditioner is not None:
                raise ValueError("precondition is not supported in representation mode (representation=)")
            if self.aggregator.needs_jacobian:
                raise ValueError(
                    f"surgery {self.aggregator.name!r} reads the Jacobian's rows and does not run in "
                    "representation mode (representation=); use a Gram-based surgery or parameter mode"
                )
        values = loss_values(loss_list)
        bad = None if world_size() > 1 else non_finite_losses(names, values)
        if bad is not None:
            out = Gathered(names, values, bad=bad)
            return (out if into is None else into + out), self._rows
        graph = analyse(loss_list)
        for name, tensor in (("representation", representation), *named_features(features)):
            if tensor is not None:
                check_passes(tensor, graph, name)
        structure = self._structure(names, loss_list, graph, into.structure if into is not None else None)
        source: Source = (
            RepresentationRows(representation, graph) if representation is not None else self._rows
        )
        scale = current_scale(self.grad_scaler)
        scaled = [loss * scale for loss in loss_list] if scale != 1.0 else loss_list
        grads = source.gather(scaled, graph, structure.partition)
        if scale != 1.0:
            grads = grads.scaled([1.0 / scale] * len(names))
        out = Gathered(names, values, structure, grads)
        return (out if into is None else into + out), source

    def _structure(
        self, names: Tuple[str, ...], losses: Sequence[Tensor], graph: LossGraph, known: Optional[Structure]
    ) -> Structure:
        """Partition (discovered or checked) and blocks; raises before any change."""
        if known is not None:
            check_against_graph(known.partition, graph, self._params)
            return known
        if self._partition is None and self._task_lr is not None:
            groups.check_can_split(self.optimizer)
        partition = self._partition if self._partition is not None else discover(self._params, graph, names)
        check_against_graph(partition, graph, self._params)
        if self._partition is None and self._task_lr is not None:
            task_rates(self._task_lr, partition.names)  # validate before anything is committed
        blocks = (
            self._blocks
            if self._blocks is not None
            else blocks_of(self._granularity, partition, self._index_of)
        )
        if not self._weighting_ready:
            groups.check_can_add_weighting(self.optimizer, self.weighting)
            self.weighting.bind(names)
        return Structure(partition, blocks)

    # ------------------------------------------------------------------ the stages
    def _run(self, gathered: Gathered, source: Source) -> None:
        """Reduce ... combine (no state change), then commit and take the step, or skip."""
        if gathered.bad is not None or gathered.grads is None or gathered.structure is None:
            return self._skip(gathered.bad or "non-finite loss", gathered.values)
        generator_state = self._generator.get_state()
        try:
            outcome, why, values = self._compute(gathered, source)
        except BaseException:
            self._generator.set_state(generator_state)
            self.engine.forget()
            raise
        if outcome is None:
            self._generator.set_state(generator_state)
            return self._skip(why or "non-finite values", values)
        self._commit(gathered.structure, outcome)
        self._take(gathered.names, values, outcome, source)
        return None

    def _compute(self, gathered: Gathered, source: Source) -> Tuple[Optional[Outcome], Optional[str], Tensor]:
        """Reduce, weigh, precondition, Gram, aggregate, combine: an Outcome, or why to skip."""
        assert gathered.grads is not None and gathered.structure is not None
        names, structure = gathered.names, gathered.structure
        k = len(names)
        grads, values = source.reduce(gathered.grads, gathered.values)
        if not bool(torch.isfinite(values).all()) or not grads.all_finite():
            return None, "non-finite loss or gradient", values
        ctx = WeightingContext(self._generator, self._steps, names)
        weights, weighting_state, why = weigh(self.weighting, values, self._states["weighting"], ctx)
        if why is not None:
            return None, why, values
        states = {"weighting": weighting_state}
        blocks = source.blocks(structure.blocks)
        # Element-wise stages (preconditioning, row methods) need rows that carry their
        # weights; otherwise the weights are applied in Gram space (float64), where tiny
        # weights keep their precision, and to the coefficients.
        carry = self.preconditioner is not None or self.aggregator.needs_jacobian
        if carry:
            grads = grads.scaled(weights.tolist()) if bool((weights != 1.0).any()) else grads
            weighting_gram = self._weighting_gram(grads, structure, source, None, None)
            if self.preconditioner is not None:
                keys = [str(self._index_of[id(p)]) for p in structure.partition.shared]
                grads, states["precondition"], why = precondition(
                    self.preconditioner, grads, keys, self._states["precondition"]
                )
                if why is not None:
                    return None, why, values
            gram = source.grams(grads, blocks, k)
        else:
            gram = weighted_gram(source.grams(grads, blocks, k), weights)
            weighting_gram = self._weighting_gram(grads, structure, source, gram, weights)
        agg_ctx = AggregationContext(self._generator, values * weights, self._steps)
        combined = self._combine(grads, gram, blocks, structure, source, agg_ctx, weights, carry)
        coefs, updates, states["surgery"], why = combined
        if why is not None:
            return None, why, values
        task_grads = grads.tasks if carry else scale_tasks(grads.tasks, weights.tolist())
        stats = source.stats(grads)
        return Outcome(weights, coefs, gram, updates, task_grads, states, weighting_gram, stats), None, values

    def _combine(
        self,
        grads: TaskGradients,
        gram: Tensor,
        blocks: List[List[int]],
        structure: Structure,
        source: Source,
        ctx: AggregationContext,
        weights: Tensor,
        carried: bool,
    ) -> Tuple[Optional[Tensor], Rows, State, Optional[str]]:
        """Aggregate and combine: ``(coefficients, shared updates, new surgery state, why not)``."""
        state = self._states["surgery"]
        shared = structure.partition.shared
        if isinstance(self.aggregator, RowAggregator):
            rows = grads.block_rows(blocks, shared)
            flat, coefs, new_state = self.aggregator.aggregate_rows(rows, gram, state, ctx)
            updates = grads.split_updates(blocks, flat, shared)
            finite = all_finite([u for u in updates if u is not None])
            return coefs, updates, new_state, None if finite else "non-finite aggregation"
        coefs, new_state, why = aggregate(self.aggregator, gram, state, ctx)
        if why is not None:
            return coefs, [], state, why
        mix = coefs if carried else coefs * weights.view(1, -1)
        updates, finite = source.updates(grads, blocks, mix, structure.partition)
        return coefs, updates, new_state, None if finite else "non-finite aggregation"

    def _weighting_gram(
        self,
        grads: TaskGradients,
        structure: Structure,
        source: Source,
        gram: Optional[Tensor],
        weights: Optional[Tensor],
    ) -> Optional[Tensor]:
        """The Gram a weighting declared it needs (``needs_gram``): every block, or its own."""
        if not self.weighting.needs_gram:
            return None
        params = self.weighting.gram_params()
        k = len(grads.tasks)
        if params is None or isinstance(source, RepresentationRows):
            raw = gram if gram is not None else source.grams(grads, source.blocks(structure.blocks), k)
            return raw
        position = {id(p): i for i, p in enumerate(structure.partition.shared)}
        missing = [p for p in params if id(p) not in position]
        if missing:
            raise ValueError(
                f"weighting {self.weighting.name!r}: {len(missing)} of its gram parameters are not shared "
                f"parameters (shapes {[tuple(p.shape) for p in missing[:3]]})"
            )
        raw = grads.grams([[position[id(p)] for p in params]], k)
        return raw if weights is None else weighted_gram(raw, weights)

    def _commit(self, structure: Structure, outcome: Outcome) -> None:
        """Nothing before this changed any state; from here the step is taken."""
        partition = structure.partition
        if self._partition is None:
            self._adopt_partition(partition, warn=True, blocks=structure.blocks)
        if not self._weighting_ready:
            self._adopt_weighting(partition.names)
        for params, task_grads in zip(partition.tasks, outcome.task_grads):
            for p, g in zip(params, task_grads):
                write_grad(p, g)
        for p, u in zip(partition.shared, outcome.shared_updates):
            write_grad(p, u)
        self._states.update(outcome.states)
        self.engine.commit()

    def _take(self, names: Tuple[str, ...], values: Tensor, outcome: Outcome, source: Source) -> None:
        """The weighting's own gradients, the inner step, and the step's statistics."""
        weights = outcome.weights
        if self.weighting.parameters():
            ctx = WeightingContext(self._generator, self._steps, names)
            self.weighting.backward(
                values, weights, self._states["weighting"], ctx, gram=outcome.weighting_gram
            )
        objective = self.weighting.objective(values, weights)
        self._steps += 1
        self.optimizer.step()
        self.weighting.after_step()
        amp_update(self.grad_scaler, self, False, self._device())
        coefs = outcome.coefficients
        self.last_stats = step_stats(
            outcome.gram.sum(dim=0), None, weights.tolist(), values.tolist(), self.skipped
        )
        self.last_stats["coefficients"] = None if coefs is None else coefs.mean(dim=0).tolist()
        self.last_stats["block_coefficients"] = None if coefs is None else coefs.tolist()
        self.last_stats["objective"] = objective
        self.last_stats["gradient_mode"] = source.path()
        self.last_stats.update(outcome.stats)

    def _skip(self, why: str, values: Tensor) -> None:
        self.engine.forget()
        amp_update(self.grad_scaler, self, True, self._device())
        self.skipped += 1
        if not self._warned_skip:
            warnings.warn(
                f"MultiTaskOptimizer skipped a step: {why} (warned once; see last_stats['skipped'])",
                stacklevel=4,
            )
            self._warned_skip = True
        self.last_stats = {"skipped": self.skipped, "losses": values.tolist(), "skipped_step": True}
        return None

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    # ------------------------------------------------------------------ committed structure
    def _adopt_partition(
        self, partition: Partition, warn: bool, blocks: Optional[List[List[int]]] = None
    ) -> None:
        self._partition = partition
        self._names = partition.names
        self._blocks = (
            blocks if blocks is not None else blocks_of(self._granularity, partition, self._index_of)
        )
        if not self._states["surgery"]:
            self._states["surgery"] = self.aggregator.init_state(len(partition.names), len(self._blocks))
        if warn and partition.unused:
            warn_unused(partition.unused, self._index_of, "are reached by no loss")
        if self._task_lr is not None and not self._split:
            groups.split_groups(self.optimizer, partition, task_rates(self._task_lr, partition.names))
            self._split = True

    def _adopt_weighting(self, names: Sequence[str]) -> None:
        """Bind the weighting to ``names`` and give its parameters their own group."""
        self.weighting.bind(names)
        groups.add_weighting_group(self.optimizer, self.weighting)
        if not self._states["weighting"]:
            self._states["weighting"] = self.weighting.init_state(len(names))
        self._names = tuple(names)
        self._weighting_ready = True

    # ------------------------------------------------------------------ state
    def _config(self) -> Dict[str, Any]:
        granularity = self._granularity if isinstance(self._granularity, str) else repr(self._granularity)
        return {
            "surgery": checkpoint.record(self.aggregator),
            "weighting": checkpoint.record(self.weighting),
            "precondition": checkpoint.record(self.preconditioner),
            "granularity": granularity,
        }

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus a ``"multitask"`` entry (see :mod:`.checkpoint`).

        The entry holds the configuration (components' names and settings), the task
        names, the partition (as parameter indices in the order of the wrapped
        optimizer's groups at construction), every component's state, the learnable
        weighting parameters' values, the generator state and the step counter. It
        loads with ``torch.load(..., weights_only=True)``.
        """
        out = self.optimizer.state_dict()
        out["multitask"] = {
            "version": checkpoint.VERSION,
            "config": self._config(),
            "names": list(self._names) if self._names is not None else None,
            "partition": self._partition.to_indices(self._index_of) if self._partition is not None else None,
            "split": self._split,
            "steps": self._steps,
            "generator": self._generator.get_state(),
            "states": {key: dict(state) for key, state in self._states.items()},
            "weighting_params": [p.detach().clone() for p in self._weighting_params()],
            "gradient_mode": self.engine.remembered(),
        }
        return out

    def _weighting_params(self) -> List[torch.nn.Parameter]:
        return self.weighting.parameters() if self._weighting_ready else []

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict` into an optimizer built over the same model and configuration."""
        sd = dict(state_dict)
        mt = sd.pop("multitask", None)
        if mt is None:
            self.optimizer.load_state_dict(sd)
            return
        if mt.get("version") != checkpoint.VERSION:
            raise ValueError(f"unsupported multitask state version {mt.get('version')!r}")
        checkpoint.check_config(mt["config"], self._config())
        names = tuple(mt["names"]) if mt["names"] is not None else None
        if self._names is not None and names is not None and names != self._names:
            raise ValueError(f"state_dict is for tasks {list(names)}, this optimizer has {list(self._names)}")
        partition = checkpoint.saved_partition(mt["partition"], self._params, self._partition, self._index_of)
        if names is not None and not self._weighting_ready:
            self.weighting.bind(names)
        params = self.weighting.parameters() if names is not None else []
        if len(params) != len(mt["weighting_params"]):
            raise ValueError("state_dict's weighting parameters do not match this optimizer's weighting")
        if partition is not None and self._partition is None:
            self._adopt_partition(partition, warn=False)
            if mt["split"] and not self._split:
                groups.split_groups(self.optimizer, partition, task_rates(self._task_lr, partition.names))
                self._split = True
        if names is not None and not self._weighting_ready:
            self._adopt_weighting(names)
        self.optimizer.load_state_dict(sd)
        with torch.no_grad():
            for p, value in zip(params, mt["weighting_params"]):
                p.copy_(value)
        self._states = {key: checkpoint.clone_state(state) for key, state in mt["states"].items()}
        checkpoint.place_precondition_state(self._states.get("precondition", {}), self._params)
        self._generator.set_state(mt["generator"].clone())
        self._steps = int(mt["steps"])
        self.engine.restore(mt["gradient_mode"])
