"""MultiTaskOptimizer: wrap any torch optimizer, hand ``step`` the per-task losses.

This file is the conductor: it holds the torch optimizer contract and runs the stages
of one step (see :mod:`._pipeline`) in order::

    step(losses) -> _gather -> _run: reduce, weigh, precondition, gram, aggregate,
                    combine (_compute) -> _commit -> _take (inner step, stats)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _checkpoint, fsdp
from . import _weights_only as weights_only
from ._amp import current_scale
from ._arguments import (
    Granularity,
    TaskLR,
    check_granularity,
    check_task_lr,
)
from ._bookkeeping import Bookkeeping
from ._clipping import check_max_grad_norm
from ._components import State
from ._distributed import all_average, world_size
from ._engine import GradientEngine
from ._gradients import TaskGradients, all_finite
from ._graph import analyse
from ._host import Transfer, host_stage
from ._losses import (
    Losses,
    Samples,
    check_passes,
    explained_errors,
    loss_values,
    named_features,
    observed_values,
    parse_losses,
    task_samples,
)
from ._pipeline import (
    Fetched,
    Gathered,
    Outcome,
    RowResult,
    aggregate_and_combine,
    aggregate_rows,
    fetch_step,
    merged_states,
    non_finite_losses,
    precondition,
    reduced,
    scale_tasks,
    sub_components,
    sub_states,
    weighted_gram,
    weighting_parts,
)
from ._plain import PlainPath
from ._schedule import Schedule
from ._sources import ParameterRows, RepresentationRows, check_representation
from .aggregators import AggregationContext, Aggregator
from .partition import Partition, TasksArg
from .precondition import Preconditioner
from .weighting import Weighting

Source = Union[ParameterRows, RepresentationRows]


class MultiTaskOptimizer(Bookkeeping, PlainPath, Optimizer):
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
            ``"gradvac"``, ``"mgda"``, ...), an :class:`~multitask_optim.aggregators.Aggregator`,
            or a callable mapping a ``(K, K)`` Gram matrix to ``K`` weights (e.g. TorchJD's
            ``UPGradWeighting()``; see :mod:`~multitask_optim.aggregators.external`).
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
        gradient_mode: ``"auto"`` (frontier, falling back to batched then looped; with
            no surgery, weighting or preconditioning, one plain backward of the sum: the
            inner optimizer bitwise, without per-task statistics), ``"frontier"``,
            ``"lean"``, ``"batched"`` or ``"looped"``.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 training: losses are
            scaled, per-task gradients unscaled before anything reads them, and a step
            with an inf/NaN is skipped and lowers the scale (see :mod:`._amp`). Do not
            call ``scaler.step`` / ``scaler.update`` yourself.
        surgery_every: run the full method (per-task gradients, preconditioning, Gram,
            surgery) every ``k``-th step only; the other steps are one backward of the
            weighted sum of the losses (see :mod:`._schedule`). Default 1.
        surgery_start: the first step on which the full method runs (earlier steps are
            plain). Default 0.
        max_grad_norm: clip the final update of the model parameters (after
            aggregation, before the inner step) to this global 2-norm, as
            ``torch.nn.utils.clip_grad_norm_`` does; the unclipped norm is
            ``last_stats["grad_norm"]`` (see :mod:`._clipping`). Default None (no clipping).
        reduction: deprecated: use ``surgery_kwargs={"reduction": ...}`` (a ``DeprecationWarning``).
        beta: deprecated: use ``surgery_kwargs={"beta": ...}`` (a ``DeprecationWarning``).
        eps: deprecated: use ``precondition_kwargs={"eps": ...}`` (a ``DeprecationWarning``).
        beta2: deprecated: use ``precondition_kwargs={"beta2": ...}`` (a ``DeprecationWarning``).

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` (or is already a
            ``MultiTaskOptimizer``), or a component of the wrong type.
        ValueError: a bad argument, named in the message (an unknown method, a
            hyper-parameter out of range, a parameter in two param groups or two roles).

    Attributes:
        skipped: how many steps were skipped (nothing written on them; ``last_stats``).
        last_skip_reason: why the last one was (None before any); both in :meth:`state_dict`.
        last_stats: the last step's statistics, plain Python values (:mod:`.diagnostics`).
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
        surgery_every: int = 1,
        surgery_start: int = 0,
        max_grad_norm: Optional[float] = None,
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
        self._build_components(
            surgery, precondition, weighting, surgery_kwargs, precondition_kwargs, weighting_kwargs, old
        )
        self.engine = GradientEngine(
            gradient_mode, factored=self.preconditioner is None and not self.aggregator.needs_jacobian
        )
        self._rows = ParameterRows(self.engine)
        sharded = fsdp.source_for(self._params, self.engine)  # FSDP2: DTensor parameters
        self._sharded = sharded is not None
        if sharded is not None:
            self._rows = sharded
        self._granularity = check_granularity(granularity, self._index_of)
        self._task_lr = check_task_lr(task_lr)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.grad_scaler = grad_scaler
        self.schedule = Schedule.of(surgery_every, surgery_start)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.last_stats: Dict[str, Any] = {}
        self.skipped = 0
        self._warned_skip = False
        self._accumulated: Optional[Gathered] = None
        self._pending: Optional[weights_only.Pending] = None  # weighted_loss() calls since the last step()
        # committed state: changed only by a taken step or a load
        self._partition: Optional[Partition] = None
        self._blocks: Optional[List[List[int]]] = None
        self._names: Optional[Tuple[str, ...]] = None
        self._split = False
        self._weighting_ready = False
        self._steps = 0
        self._states: Dict[str, State] = {"surgery": {}, "weighting": {}, "precondition": {}}

        self._adopt_known_tasks(shared, tasks, task_names, num_tasks)

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
        samples: Samples = None,
    ) -> Any:
        """One optimisation step on the per-task ``losses``.

        Without ``losses`` and with nothing accumulated this is exactly the inner
        optimizer's ``step(closure)`` on the gradients the caller put in ``.grad``.
        Without ``losses`` after :meth:`accumulate` calls, it aggregates the accumulated
        per-task gradients once and steps.

        Args:
            losses: one scalar loss per task, as a sequence or a mapping by task name. A
                callable here is taken as the closure (``opt.step(closure)`` as in torch).
                A task absent from this batch is left out of the mapping or given as
                ``None``: the step is then the method on the present tasks, and the
                absent task's parameters and state are left as they are. On a model
                sharded with FSDP2 every rank must pass the same tasks (a rank without
                samples of one gives a zero loss through its head and ``samples=`` 0).
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
            samples: under ``torch.distributed``, this rank's sample count per task
                (sequence or mapping): each task's gradient is then the average over
                the ranks that had it weighted by these counts (default: unweighted).

        Returns:
            The inner optimizer's return value, or the closure's (None without one).

        Raises:
            ValueError: bad losses (count, names, a non-scalar or a loss that does not
                require grad), naming the task; ``representation=`` or ``features=``
                without losses or with accumulated micro-batches; losses while
                micro-batches are pending. Nothing changes.
            TypeError: a loss of the wrong type, or two closures.
        """
        if callable(losses) and not isinstance(losses, (Tensor, Mapping, list, tuple)):
            if closure is not None:
                raise TypeError("step() got two closures (positional and closure=)")
            losses, closure = None, losses  # torch's positional idiom: opt.step(closure)
        if losses is None and self._accumulated is None:
            if representation is not None or features is not None:
                raise ValueError("representation= and features= need losses")
            return weights_only.inner_step(self, closure)  # the inner step (finishing weighted_loss() calls)
        weights_only.check_not_pending(self)
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
        elif (representation is None and self._plain()) or not self.schedule.runs(self._steps):
            self._plain_step(losses, features, representation, samples)
        else:
            self._run(*self._gather(losses, None, features, representation, samples, once=True))
        return result

    def accumulate(self, losses: Losses, samples: Samples = None) -> None:
        """Add one micro-batch's per-task gradients; the next ``step()`` aggregates them once.

        Task and shared gradients are summed over micro-batches (as ``backward`` would
        sum them: scale the losses by ``1 / micro_batches`` for a mean), and the loss
        values are summed for the weighting. The aggregation (weighting,
        preconditioning, Gram, surgery) then runs once on the sum, so ``M`` micro-batches
        equal one step on their concatenation. Memory is bounded by one Jacobian.
        :meth:`zero_grad` drops what was accumulated.

        Micro-batches may carry different tasks: each task's gradient and loss value are
        summed over the micro-batches that had it (scale a task's loss by ``1 / M_i``,
        ``M_i`` the number of micro-batches carrying it, for its mean), and the step is
        over the tasks some micro-batch had. ``samples`` (under ``torch.distributed``)
        are summed likewise. A step the schedule leaves out still gathers per-task
        gradients here (the weights need the summed losses first), but neither the
        surgery nor the preconditioner runs on it.

        Args:
            losses: the micro-batch's per-task losses, as for :meth:`step`.
            samples: under ``torch.distributed``, this rank's sample count per task.
        """
        weights_only.check_not_pending(self)
        self._accumulated = self._gather(losses, self._accumulated, None, None, samples)[0]

    def weighted_loss(
        self,
        losses: Losses,
        *,
        features: Optional[Union[Tensor, Sequence[Tensor]]] = None,
        representation: Optional[Tensor] = None,
        samples: Samples = None,
    ) -> Tensor:
        """Weights-only mode: the method as one scalar loss, for an engine that runs the backward.

        Runs the step up to the coefficients (Gram of the shared parameters, weights
        ``w``, coefficients ``c``), commits their state as a taken step does and returns
        ``sum_i c_i w_i L_i`` with ``c`` and ``w`` detached: its backward puts the
        method's update on the shared parameters, and ``step()`` (no losses) then clips,
        skips a non-finite gradient and runs the inner optimizer. Task parameters receive
        ``c_i w_i grad L_i``; the documentation's weights-only guide lists every difference.

        Args:
            losses: as for :meth:`step` (absent tasks left out or ``None``).
            features: as for :meth:`step` (a hint, never changes the result).
            representation: refused (representation mode needs :meth:`step`).
            samples: as for :meth:`step`, under ``torch.distributed``.

        Returns:
            The scalar; on a skipped step (counted in ``last_stats["skipped"]``) the plain
            sum of the present losses, and the next ``step()`` skips.

        Raises:
            ValueError: a row method, per-task preconditioning, representation mode,
                several Gram blocks, FSDP2, pending ``accumulate()``, or bad losses.
        """
        return weights_only.weighted_loss(self, losses, features, representation, samples)

    def epoch_end(self) -> None:
        """Mark an epoch boundary for the weightings that count epochs (DWA, STCH)."""
        self._states["weighting"] = self.weighting.epoch_end(self._states["weighting"])

    def update_weighting(self, losses: Any) -> None:
        """Update the weighting's state from the losses recomputed on the same batch after ``step``.

        For weightings that learn from how a step changed the losses (FAMO's same-batch
        variant): ``opt.step(losses)``, then recompute the losses on the same batch (e.g.
        under ``torch.no_grad()``) and pass them here, on the same footing as those given
        to ``step``. Under torch.distributed they are averaged across ranks (call it on
        every rank). Call it once per step; see the weighting for what a call with no
        step pending does.

        Args:
            losses: one real scalar per task (tensors or numbers), as a sequence or a
                mapping by task name, or a 1-D tensor of ``K`` values.

        Raises:
            RuntimeError: before the tasks are known (no step taken, no ``task_names=``).
            ValueError, TypeError: a wrong count, name or type, or a non-finite value (or
                a value the weighting refuses), naming the task; nothing changes.
            NotImplementedError: the weighting does not use such losses.
        """
        if self._names is None or not self._weighting_ready:
            raise RuntimeError("update_weighting() needs the tasks: take a step first")
        values = all_average([observed_values(losses, self._names)])[0]
        bad = non_finite_losses(self._names, values)
        if bad is not None:
            raise ValueError(f"update_weighting: {bad}")
        self._states["weighting"] = self.weighting.observe(values, self._states["weighting"])

    # ------------------------------------------------------------------ gather
    def _gather(
        self,
        losses: Losses,
        into: Optional[Gathered],
        features: Optional[Union[Tensor, Sequence[Tensor]]],
        representation: Optional[Tensor],
        samples: Samples = None,
        once: bool = False,
        keep: bool = False,
    ) -> Tuple[Gathered, Source]:
        """Check the losses and compute this micro-batch's per-task gradients (no state change).

        Returns the gathered gradients (added to ``into`` when accumulating) and their
        source. ``once``: a whole step, not a micro-batch. ``keep``: the graph stays usable."""
        known = self._names if self._names is not None else (into.names if into is not None else None)
        parsed = parse_losses(losses, known)
        self._note_task_count(parsed.names)
        names, loss_list, counts = parsed.names, parsed.losses, task_samples(samples, parsed)
        if self._sharded:  # FSDP2: before any backward, every rank must have the same tasks
            assert isinstance(self._rows, fsdp.FSDPRows)
            self._rows.agree_on_tasks(names, parsed.present, first=into is None)
        if representation is not None:
            check_representation(representation, self.preconditioner, self.aggregator, parsed.partial)
        values = loss_values(loss_list)  # checked on the host with the rest of the step (see _compute)
        weights = None if counts is None else torch.tensor(counts, dtype=torch.float64)
        graph = self._rows.map_graph(analyse(loss_list), self._params, representation)
        for name, tensor in (("representation", representation), *named_features(features)):
            if tensor is not None:
                check_passes(tensor, graph, name)
        structure = self._structure(parsed, graph, into.structure if into is not None else None)
        scale = current_scale(self.grad_scaler)
        source: Source = (
            RepresentationRows(representation, graph, self.engine, scale)
            if representation is not None
            else self._rows
        )
        scaled = [loss * scale for loss in loss_list] if scale != 1.0 else loss_list
        with explained_errors():  # e.g. losses whose graph the caller's own backward() freed
            grads = source.gather(
                scaled, graph, structure.partition, once and len(structure.blocks) == 1, keep
            )
        if scale != 1.0:
            grads = grads.scaled([1.0 / scale] * len(loss_list))
        out = Gathered(names, values, structure, grads, present=parsed.present, samples=weights)
        return (out if into is None else into + out), source

    # ------------------------------------------------------------------ the stages
    def _run(
        self, gathered: Gathered, source: Source, combine: bool = True
    ) -> Optional[Tuple[Outcome, Tensor, Tuple[int, ...]]]:
        """Reduce ... combine (no state change), then commit and take the step, or skip.

        ``combine=False`` (weights-only mode): stop after the coefficients, commit the
        states without writing any ``.grad`` and leave the rest to the caller. Returns
        the outcome, the loss values and the present tasks of a taken step (None: skipped)."""
        if gathered.bad is not None or gathered.grads is None or gathered.structure is None:
            return self._skip(gathered.bad or "non-finite loss", gathered.values)
        generator_state = self._generator.get_state()
        try:
            if source.mode == "parameters" and (world_size() > 1 or self._sharded):
                assert isinstance(source, ParameterRows)
                gathered = reduced(gathered, source)  # each task averaged over the ranks that had it
            outcome, why, values, weights = self._compute(gathered, source, combine)
        except BaseException:
            self._generator.set_state(generator_state)
            self.engine.forget()
            raise
        if outcome is None:
            self._generator.set_state(generator_state)
            return self._skip(why or "non-finite values", values, weights)
        self._commit(gathered.structure, outcome, own_grads=combine)
        if combine:
            self._take(gathered.names, gathered.present, values, outcome, source)
        return outcome, values, gathered.present

    def _compute(
        self, gathered: Gathered, source: Source, combine: bool = True
    ) -> Tuple[Optional[Outcome], Optional[str], Tensor, Optional[Tensor]]:
        """Reduce, weigh, precondition, Gram, aggregate, combine: an Outcome, or why to skip.

        What the host decides on (the losses, the Grams, whether the gradients are
        finite) is formed on the device and read in **one** transfer (:mod:`._host`);
        the weights, the coefficients and how to combine are then decided on the host.
        ``combine=False``: no update is formed (the Outcome has coefficients, no gradients)."""
        assert gathered.grads is not None and gathered.structure is not None
        names, structure, present = gathered.names, gathered.structure, gathered.present
        full = self.schedule.runs(self._steps)  # else only the weighting runs (accumulated plain step)
        if source.mode == "parameters":  # reduced across ranks in _run
            grads, values = gathered.grads, gathered.values
        else:
            grads, values = source.reduce(gathered.grads, gathered.values)
        current = self._current_states(len(names), len(structure.blocks))
        old = sub_states(self._components(), current, present, len(names)) if full else {}
        blocks = source.blocks(structure.blocks)
        # Element-wise stages (preconditioning, row methods) need rows that carry their
        # weights: the weights come first (one read of the losses, when they depend on
        # them); otherwise they are applied in Gram space (float64), where tiny weights
        # keep their precision, and to the coefficients.
        rowwise = full and self.aggregator.needs_jacobian  # a row method also reads the losses first
        carry = rowwise or (full and self.preconditioner is not None)
        transfer = Transfer()
        first = self._weigh_first(names, present, values, old, current, rowwise) if carry else None
        if first is not None and first.why is not None:
            return None, first.why, first.values, first.weights
        wparts, wblocks = weighting_parts(self.weighting, grads, structure, source), 1
        if first is not None:
            grads = grads if all(f == 1.0 for f in first.factors) else grads.scaled(first.factors)
            if not wparts and self.weighting.needs_gram:  # every block's Gram, before preconditioning
                wparts, wblocks = source.gram_parts(grads, blocks), len(blocks)
            if self.preconditioner is not None:
                keys = [str(self._index_of[id(p)]) for p in structure.partition.shared]
                grads, first.states["precondition"], peaks = precondition(
                    self.preconditioner, grads, keys, old["precondition"]
                )
                if peaks is not None:
                    transfer.add("precondition", peaks)
        parts = source.gram_parts(grads, blocks)
        rows = None
        if rowwise:  # not linear in the rows: runs on the device, its updates read with the rest
            assert first is not None and first.weights is not None
            aggregator = sub_components(self._components(), present, len(names))["surgery"]
            ctx = AggregationContext(self._generator, first.values * first.weights, self._steps)
            rows = aggregate_rows(aggregator, old["surgery"], grads, parts, blocks, structure.partition, ctx)
            transfer.add("updates", rows.peaks)
        host = fetch_step(transfer, values, parts, (wparts, wblocks), grads, len(blocks))  # one host read
        with host_stage():
            values = host.values
            why = host.problem(names, present, self.preconditioner is not None)
            if why is not None:
                return None, why, values, None if first is None else first.weights
            if first is None or first.later:  # the weighting runs on the losses just read
                weights, states, why = self._weigh(names, present, values, old, current)
                if why is not None:
                    return None, why, values, weights
                states.update({} if first is None else first.states)
            else:
                assert first.weights is not None
                weights, states = first.weights, first.states
        return self._finish(
            host, grads, weights, states, old, current, full, carry, source, gathered, combine, rows
        )

    def _finish(
        self,
        host: Fetched,
        grads: TaskGradients,
        weights: Tensor,
        states: Dict[str, State],
        old: Dict[str, State],
        current: Dict[str, State],
        full: bool,
        carry: bool,
        source: Source,
        gathered: Gathered,
        combine: bool,
        rows: Optional[RowResult],
    ) -> Tuple[Optional[Outcome], Optional[str], Tensor, Optional[Tensor]]:
        """Aggregate on the host (a row method already ran, ``rows``), combine, scale the
        task gradients: the Outcome of a step whose checks passed."""
        names, structure, present, values = gathered.names, gathered.structure, gathered.present, host.values
        assert structure is not None
        k, blocks = len(present), source.blocks(structure.blocks)
        with host_stage():
            gram = host.gram if carry else weighted_gram(host.gram, weights)
            wgram = host.weighting_gram(self.weighting, weights, carry, gram)
            w = weights.tolist()
        if not full:
            mix = weights.view(1, -1).expand(len(blocks), k)
            updates, finite = source.planned_updates(
                grads, blocks, host.plan(grads, blocks, mix), structure.partition
            )
            task_grads = scale_tasks(grads.tasks, w)
            outcome = Outcome(weights, None, None, updates, task_grads, states)
            return (
                (outcome, None, values, weights) if finite else (None, "non-finite update", values, weights)
            )
        if rows is not None:
            coefs, updates, states["surgery"] = rows.coefficients, rows.updates, rows.state
        else:
            aggregator = sub_components(self._components(), present, len(names))["surgery"]
            agg_ctx = AggregationContext(self._generator, values * weights, self._steps)
            combined = aggregate_and_combine(
                aggregator,  # type: ignore[arg-type]
                old["surgery"],
                grads,
                gram,
                blocks,
                structure.partition,
                source,
                agg_ctx,
                weights if not carry else None,
                combine,
                host,
            )
            coefs, updates, states["surgery"], why = combined
            if why is not None:
                return None, why, values, weights
        task_grads = [] if not combine else grads.tasks if carry else scale_tasks(grads.tasks, w)
        if combine and not carry and not host.weights_fit(grads, w):  # e.g. w_i * g_i > float32 max
            if not all_finite([g for task in task_grads for g in task if g is not None]):  # (rare: a read)
                return None, "a weighted task gradient overflows", values, weights
        stats = source.stats(grads)
        rest = {kind: state for kind, state in states.items() if kind != "weighting"}
        states = {
            **merged_states(self._components(), current, rest, present, len(names), len(structure.blocks)),
            "weighting": states["weighting"],
        }
        return Outcome(weights, coefs, gram, updates, task_grads, states, wgram, stats), None, values, weights

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus a ``"multitask"`` entry (see :mod:`._checkpoint`).

        The entry holds the configuration (components' names and settings), the task
        names, the partition (as parameter indices in the order of the wrapped
        optimizer's groups at construction), every component's state, the learnable
        weighting parameters' values, the generator state and the step counter. It
        loads with ``torch.load(..., weights_only=True)``.
        """
        out = self.optimizer.state_dict()
        out["multitask"] = _checkpoint.entry(self)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict` into an optimizer built over the same model and configuration.

        A checkpoint of another configuration (surgery, weighting, preconditioning,
        granularity, tasks or partition) raises a ``ValueError`` naming what differs.
        """
        sd = dict(state_dict)
        mt = sd.pop("multitask", None)
        if mt is None:
            self.optimizer.load_state_dict(sd)
            return
        _checkpoint.restore(self, mt, sd)
