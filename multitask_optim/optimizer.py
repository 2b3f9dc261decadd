"""MultiTaskOptimizer: wrap any torch optimizer, hand ``step`` the per-task losses."""

from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .aggregators import AggregationContext, Aggregator, get_aggregator
from .amp import current_scale
from .amp import update as amp_update
from .diagnostics import step_stats
from .distributed import all_average, world_size
from .gram import block_grams
from .graph import LossGraph, analyse
from .jacobian import GradientEngine, LinearFactor, TaskGradients, feature_gradients
from .partition import Partition, TasksArg, check_against_graph, check_names, describe, discover, explicit
from .precondition import Preconditioner
from .weighting import Weighting, WeightingContext, get_weighting

Losses = Union[Sequence[Tensor], Mapping[str, Tensor]]
Granularity = Union[str, Sequence[Iterable[Tensor]]]
_STATE_VERSION = 1


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
        surgery: ``None`` (plain sum), a registered name (``"pcgrad"``, ``"gradvac"``,
            ...) or an :class:`~multitask_optim.aggregators.Aggregator`.
        precondition: ``None``, ``"adagrad"``, ``"rmsprop"`` or ``"adam"``: per-task
            second-moment accumulators on the shared parameters.
        granularity: ``"global"`` (one Gram over all shared parameters), ``"tensor"``
            (one per parameter tensor) or a list of parameter lists (e.g. per layer).
        task_lr: per-task learning rates (mapping by task name, may include
            ``"shared"``, or a list in task order). Splits the param groups into
            ``shared`` + one per task, each with a ``"task"`` key.
        reduction: ``"sum"`` or ``"mean"`` of the modified task gradients (surgeries
            that accept it).
        seed: seed of the optimizer's own generator (task orders, random weights).
            Default: drawn from torch's global generator, so ``torch.manual_seed``
            makes runs reproducible.
        beta: GradVac's EMA rate (surgeries that accept it).
        eps: preconditioning epsilon.
        beta2: preconditioning EMA rate (``rmsprop`` / ``adam``).
        weighting: ``None`` (equal weights), a registered name or a
            :class:`~multitask_optim.weighting.Weighting`.
        num_tasks: number of tasks, when the partition is automatic, so that learnable
            weightings can create their parameters at construction (tasks named
            ``"0"``, ``"1"``, ...).
        task_names: the task names, when the partition is automatic and the losses
            come as a mapping (implies ``num_tasks``).
        surgery_kwargs: extra keyword arguments for a surgery given by name.
        weighting_kwargs: keyword arguments for a weighting given by name.
        gradient_mode: ``"auto"`` (frontier, falling back to batched then looped),
            ``"frontier"``, ``"lean"``, ``"batched"`` or ``"looped"``.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 training: losses are
            scaled, per-task gradients unscaled before anything reads them, and a step
            with an inf/NaN is skipped and lowers the scale (see :mod:`.amp`). Do not
            call ``scaler.step`` / ``scaler.update`` yourself.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        shared: Optional[Iterable[Tensor]] = None,
        tasks: Optional[TasksArg] = None,
        surgery: Union[None, str, Aggregator] = "pcgrad",
        precondition: Optional[str] = None,
        granularity: Granularity = "global",
        task_lr: Union[None, Mapping[str, float], Sequence[float]] = None,
        reduction: str = "sum",
        seed: Optional[int] = None,
        beta: Optional[float] = None,
        eps: float = 1e-8,
        beta2: float = 0.999,
        weighting: Union[None, str, Weighting] = None,
        num_tasks: Optional[int] = None,
        task_names: Optional[Sequence[str]] = None,
        surgery_kwargs: Optional[Mapping[str, Any]] = None,
        weighting_kwargs: Optional[Mapping[str, Any]] = None,
        gradient_mode: str = "auto",
        grad_scaler: Optional[Any] = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError("optimizer is already a MultiTaskOptimizer")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: Dict[int, Callable] = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

        self._params: List[Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        self._index_of: Dict[int, int] = {id(p): n for n, p in enumerate(self._params)}
        if len(self._index_of) != len(self._params):
            raise ValueError("optimizer: a parameter appears in more than one param group")

        self.aggregator = _build_aggregator(surgery, reduction, beta, surgery_kwargs)
        self.preconditioner = Preconditioner(precondition, eps, beta2) if precondition is not None else None
        self.weighting = get_weighting(weighting, **dict(weighting_kwargs or {}))
        self.engine = GradientEngine(
            gradient_mode, factored=self.preconditioner is None and not self.aggregator.needs_jacobian
        )
        self._granularity = _check_granularity(granularity, self._index_of)
        self._task_lr = _check_task_lr(task_lr)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self._generator = torch.Generator().manual_seed(int(seed))
        self.seed = int(seed)

        if shared is not None and tasks is None:
            raise ValueError("shared= needs tasks= (the per-task parameters) as well")
        self._partition: Optional[Partition] = None
        self._names: Optional[Tuple[str, ...]] = None
        if tasks is not None:
            self._partition = explicit(self._params, shared, tasks)
            self._names = self._partition.names
            if self._partition.unused:
                _warn_unused(self._partition.unused, self._index_of, "were not listed in shared= or tasks=")
        if task_names is not None:
            if isinstance(task_names, str):
                raise TypeError("task_names must be a sequence of names, not one string")
            given = check_names(list(task_names))
            if not given:
                raise ValueError("task_names is empty")
            if self._names is not None and given != self._names:
                raise ValueError(
                    f"task_names {list(given)} differ from the names in tasks= {list(self._names)}"
                )
            self._names = given
        if num_tasks is not None:
            if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
                raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
            if self._names is not None and len(self._names) != num_tasks:
                raise ValueError(f"num_tasks={num_tasks} but {len(self._names)} task names are given")
            if self._names is None:
                self._names = tuple(str(i) for i in range(num_tasks))
        if (
            isinstance(self._task_lr, list)
            and self._names is not None
            and len(self._task_lr) != len(self._names)
        ):
            raise ValueError(f"task_lr lists {len(self._task_lr)} rates for {len(self._names)} tasks")
        if isinstance(self._task_lr, dict) and self._names is not None:
            _check_task_lr_names(self._task_lr, self._names)

        self._split = False
        self._blocks: Optional[List[List[int]]] = None
        self._weighting_ready = False
        self._weighting_setup = False
        self._precond_state: Dict[int, Dict[str, Tensor]] = {}
        self._agg_state: Dict[str, Tensor] = {}
        self._weight_state: Dict[str, Tensor] = {}
        self._steps = 0
        self._skipped = 0
        self._warned_skip = False
        self.last_stats: Dict[str, Any] = {}
        self.grad_scaler = grad_scaler
        self._pending: Optional[_Pending] = None

        if self._partition is not None:
            self._blocks = _blocks(self._granularity, self._partition, self._index_of)
            self._agg_state = self.aggregator.init_state(len(self._partition.names), len(self._blocks))
            if self._task_lr is not None:
                self._split_groups(self._partition)
        if self._names is not None:
            self._setup_weighting(self._names)

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
        features: Optional[Tensor] = None,
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
            features: representation mode: the shared trunk's output. Per-task gradients
                are taken w.r.t. it, aggregated there, and one backward runs through the
                trunk with the aggregated feature gradient (MGDA-UB with ``"mgda"``). The
                batch dimension is flattened into the gradient vector (as the MGDA-UB
                paper's code does); shared parameters receive gradient only through
                ``features``.

        Returns:
            The inner optimizer's return value, or the closure's (None without one).
        """
        if callable(losses) and not isinstance(losses, (Tensor, Mapping, list, tuple)):
            if closure is not None:
                raise TypeError("step() got two closures (positional and closure=)")
            losses, closure = None, losses  # torch's positional idiom: opt.step(closure)
        if losses is None and self._pending is None:
            if features is not None:
                raise ValueError("features= needs losses")
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if features is not None and self._pending is not None:
            raise ValueError("features= cannot be combined with accumulated losses; call step() first")
        if losses is not None and self._pending is not None:
            raise ValueError(
                "accumulate() was called before: call step() without losses to aggregate the accumulated "
                "gradients, or accumulate() this micro-batch too"
            )
        result = None
        if closure is not None:  # as torch optimizers do: run it first, return its value
            with torch.enable_grad():
                result = closure()
        if losses is None:
            self._finish(self._take_pending())
        elif features is not None:
            self._representation_step(losses, features)
        else:
            self._pending = self._prepare(losses)
            self._finish(self._take_pending())
        return result

    def accumulate(self, losses: Losses) -> None:
        """Add one micro-batch's per-task gradients; the next ``step()`` aggregates them once.

        Task and shared gradients are summed over micro-batches (as ``backward`` would
        sum them: scale the losses by ``1 / micro_batches`` for a mean), and the loss
        values are summed for the weighting. The aggregation (weighting,
        preconditioning, Gram, surgery) then runs once on the sum, so ``M`` micro-batches
        equal one step on their concatenation. Memory is bounded by one Jacobian.
        """
        pending = self._prepare(losses, self._pending)
        self._pending = pending

    def epoch_end(self) -> None:
        """Mark an epoch boundary for epoch-based weightings (DWA)."""
        self._weight_state = self.weighting.epoch_end(self._weight_state)

    # ------------------------------------------------------------------ one step, in stages
    def _prepare(self, losses: Losses, pending: Optional[_Pending] = None) -> _Pending:
        """Check the losses and compute this micro-batch's raw per-task gradients.

        Changes no state of the optimizer: the result is held until :meth:`_finish`.
        """
        names, loss_list = self._check_losses(losses, pending.names if pending is not None else None)
        values = torch.stack([loss.detach().reshape(()).to(torch.float64).cpu() for loss in loss_list])
        distributed = world_size() > 1
        if not distributed and not bool(torch.isfinite(values).all()):
            bad = [n for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
            out = (
                pending
                if pending is not None
                else _Pending(names, None, None, torch.zeros_like(values), None, micro=0)
            )
            out.values = out.values + values
            out.bad = out.bad or f"non-finite loss for task(s) {bad}"
            out.micro += 1
            return out
        partition = pending.partition if pending is not None else None
        graph, partition, blocks = self._structure(names, loss_list, partition)
        scale = current_scale(self.grad_scaler)
        scaled = [loss * scale for loss in loss_list] if scale != 1.0 else loss_list
        grads = self.engine.compute(scaled, graph, partition.shared, partition.tasks)
        if scale != 1.0:
            _scale_gradients(grads, [1.0 / scale] * len(names))
        if pending is None or pending.grads is None:
            bad = pending.bad if pending is not None else None
            micro = pending.micro if pending is not None else 0
            out = _Pending(names, partition, blocks, values, grads, bad, micro + 1)
            if pending is not None:
                out.values = out.values + pending.values
            return out
        pending.grads = _add_gradients(pending.grads, grads, partition.shared)
        pending.values = pending.values + values
        pending.micro += 1
        return pending

    def _structure(
        self, names: Tuple[str, ...], loss_list: Sequence[Tensor], partition: Optional[Partition]
    ) -> Tuple[LossGraph, Partition, List[List[int]]]:
        """Graph, partition (discovered or checked) and blocks; raises before any change."""
        if self._partition is None and self._task_lr is not None and _scheduler_attached(self.param_groups):
            raise RuntimeError(
                "task_lr with an automatic partition splits the param groups at the first step, but a "
                "learning-rate scheduler is already attached (a group has 'initial_lr'). Pass shared= and "
                "tasks= to partition explicitly, or build the scheduler after the first step."
            )
        graph = analyse(loss_list)
        if partition is None:
            partition = (
                self._partition if self._partition is not None else discover(self._params, graph, names)
            )
        check_against_graph(partition, graph, self._params)
        if self._partition is None and self._task_lr is not None:
            self._task_rates(partition.names)  # validate before anything is committed
        blocks = (
            self._blocks
            if self._blocks is not None
            else _blocks(self._granularity, partition, self._index_of)
        )
        if not self._weighting_ready:
            if _scheduler_attached(self.param_groups) and _weighting_is_learnable(self.weighting):
                raise RuntimeError(
                    f"weighting {self.weighting.name!r} adds a param group at the first step, but a "
                    "learning-rate scheduler is already attached. Pass tasks= or num_tasks= so it is "
                    "created at construction, or build the scheduler after the first step."
                )
            self._setup_weighting_once(names)
        return graph, partition, blocks

    def _take_pending(self) -> _Pending:
        pending = self._pending
        assert pending is not None
        self._pending = None
        return pending

    def _finish(self, pending: _Pending) -> None:
        """Weighting, preconditioning, Gram, aggregation; then commit and step."""
        names, values = pending.names, pending.values
        if pending.bad is not None or pending.grads is None or pending.partition is None:
            return self._skip(pending.bad or "non-finite loss", values)
        grads, partition = pending.grads, pending.partition
        blocks = pending.blocks
        assert blocks is not None
        k = len(names)
        if world_size() > 1:
            grads = _materialize(grads, partition.shared)
            values = self._average(grads, values)
        if not bool(torch.isfinite(values).all()) or not _all_finite(grads.tensors()):
            return self._skip("non-finite loss or gradient", values)

        gen_state = self._generator.get_state()
        wctx = WeightingContext(self._generator, self._steps, names)
        weights, new_wstate = self.weighting.weights(values, self._weight_state, wctx)
        weights = weights.detach().to(torch.float64).cpu().reshape(k)
        weight_list = weights.tolist()
        if any(w != 1.0 for w in weight_list):
            _scale_gradients(grads, weight_list)
        jac = grads.shared
        raw_gram = (
            self._weighting_gram(jac, blocks, partition, k, grads.factors)
            if self.weighting.needs_gram
            else None
        )
        new_pstates = None
        if self.preconditioner is not None:
            old = [self._precond_state.get(self._index_of[id(p)]) for p in partition.shared]
            jac, new_pstates = self.preconditioner.apply(jac, old)
        gram = block_grams(jac, blocks, k, grads.factors)
        agg_ctx = AggregationContext(self._generator, values * weights, self._steps)
        coefs, new_astate = self.aggregator(gram, self._agg_state, agg_ctx)
        finite = bool(torch.isfinite(coefs).all())
        if finite:
            updates, finite = _combine(jac, blocks, coefs, grads.factors)
        if not finite:
            self._generator.set_state(gen_state)
            return self._skip("non-finite aggregation", values)
        self._commit(partition, blocks, grads.tasks, updates, new_pstates, new_astate)
        self._apply(values, weights, new_wstate, wctx, raw_gram, gram, coefs, self.engine.mode)
        # which shared parameter tensors went through a factored linear rule, which through a Jacobian
        factored = {pos for f in grads.factors for pos in (f.weight, f.bias) if pos is not None}
        self.last_stats["factored_params"] = len(factored)
        self.last_stats["jacobian_params"] = sum(1 for j in jac if j is not None)
        return None

    def _representation_step(self, losses: Losses, features: Tensor) -> None:
        """Representation mode: aggregate the per-task gradients w.r.t. ``features``."""
        _check_features(features)
        if self.preconditioner is not None:
            raise ValueError("precondition is not supported in representation mode (features=)")
        names, loss_list = self._check_losses(losses, None)
        values = torch.stack([loss.detach().reshape(()).to(torch.float64).cpu() for loss in loss_list])
        distributed = world_size() > 1
        if not distributed and not bool(torch.isfinite(values).all()):
            bad = [n for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
            return self._skip(f"non-finite loss for task(s) {bad}", values)
        graph, partition, blocks = self._structure(names, loss_list, None)
        k = len(names)
        scale = current_scale(self.grad_scaler)
        scaled = [loss * scale for loss in loss_list] if scale != 1.0 else loss_list
        z_rows, task_grads = feature_gradients(scaled, features, partition.tasks, graph)
        if scale != 1.0:
            z_rows = z_rows / scale
            task_grads = [[None if g is None else g / scale for g in t] for t in task_grads]
        gram = block_grams([z_rows], [[0]], k)
        size = world_size()
        if distributed:
            # the global batch concatenates the ranks' rows: Gram = sum of local Grams / size^2
            reduced = all_average(
                [gram.to(z_rows.device, z_rows.dtype), values.to(z_rows.device, z_rows.dtype)]
            )
            gram = reduced[0].double().cpu() / size
            values = reduced[1].double().cpu()
        if not bool(torch.isfinite(values).all()) or not _all_finite([z_rows, gram]):
            return self._skip("non-finite loss or gradient", values)
        gen_state = self._generator.get_state()
        wctx = WeightingContext(self._generator, self._steps, names)
        weights, new_wstate = self.weighting.weights(values, self._weight_state, wctx)
        weights = weights.detach().to(torch.float64).cpu().reshape(k)
        w = weights.to(gram.dtype)
        gram = gram * w.view(1, k, 1) * w.view(1, 1, k)
        agg_ctx = AggregationContext(self._generator, values * weights, self._steps)
        coefs, new_astate = self.aggregator(gram, self._agg_state, agg_ctx)
        if not bool(torch.isfinite(coefs).all()):
            self._generator.set_state(gen_state)
            return self._skip("non-finite aggregation", values)
        mix = (coefs[0] * weights).to(device=z_rows.device, dtype=z_rows.dtype)
        feature_grad = torch.tensordot(mix, z_rows, dims=1)
        trunk = [p for p in partition.shared if graph.reached_by(p)]
        trunk_grads = torch.autograd.grad(features, trunk, feature_grad, allow_unused=True) if trunk else ()
        got = {id(p): g for p, g in zip(trunk, trunk_grads)}
        updates: List[Optional[Tensor]] = [got.get(id(p)) for p in partition.shared]
        task_grads = [
            [None if g is None else g * wi for g in t] for t, wi in zip(task_grads, weights.tolist())
        ]
        if distributed:
            updates, task_grads = _average_updates(updates, task_grads)
        if not _all_finite([u for u in updates if u is not None]):
            self._generator.set_state(gen_state)
            return self._skip("non-finite gradient", values)
        self._commit(partition, blocks, task_grads, updates, None, new_astate)
        return self._apply(values, weights, new_wstate, wctx, gram, gram, coefs, "representation")

    def _average(self, grads: TaskGradients, values: Tensor) -> Tensor:
        """Average gradients and loss values across ranks (one bucketed collective)."""
        like = next((t for t in grads.tensors()), None)
        tensors: List[Tensor] = [values if like is None else values.to(like.device, like.dtype)]
        slots: List[Tuple[str, int, int]] = []
        for n, j in enumerate(grads.shared):
            if j is not None:
                tensors.append(j)
                slots.append(("shared", n, 0))
        for i, task in enumerate(grads.tasks):
            for n, g in enumerate(task):
                if g is not None:
                    tensors.append(g)
                    slots.append(("task", i, n))
        reduced = all_average(tensors)
        for (kind, a, b), t in zip(slots, reduced[1:]):
            if kind == "shared":
                grads.shared[a] = t
            else:
                grads.tasks[a][b] = t
        return reduced[0].to(torch.float64).cpu()

    def _commit(
        self,
        partition: Partition,
        blocks: List[List[int]],
        task_grads: Sequence[Sequence[Optional[Tensor]]],
        updates: Sequence[Optional[Tensor]],
        new_pstates: Optional[List[Any]],
        new_astate: Dict[str, Tensor],
    ) -> None:
        """Nothing before this changed any state; from here the step is taken."""
        if self._partition is None:
            self._commit_partition(partition, blocks)
        if not self._weighting_ready:
            self._setup_weighting(partition.names)
        for params, g_list in zip(partition.tasks, task_grads):
            for p, g in zip(params, g_list):
                _accumulate(p, g)
        for p, u in zip(partition.shared, updates):
            _accumulate(p, u)
        if new_pstates is not None:
            for p, st in zip(partition.shared, new_pstates):
                if st is not None:
                    self._precond_state[self._index_of[id(p)]] = st
        self._agg_state = new_astate

    def _apply(
        self,
        values: Tensor,
        weights: Tensor,
        new_wstate: Dict[str, Tensor],
        wctx: WeightingContext,
        raw_gram: Optional[Tensor],
        gram: Tensor,
        coefs: Tensor,
        mode: Optional[str],
    ) -> None:
        if self.weighting.parameters():
            wctx.gram = raw_gram
            self.weighting.backward(values, weights, new_wstate, wctx)
        self._weight_state = new_wstate
        self._steps += 1
        self.optimizer.step()
        self.weighting.after_step()
        amp_update(self.grad_scaler, self, False, self._device())
        self.last_stats = step_stats(gram.sum(dim=0), None, weights.tolist(), values.tolist(), self._skipped)
        self.last_stats["coefficients"] = coefs.mean(dim=0).tolist()
        self.last_stats["block_coefficients"] = coefs.tolist()
        self.last_stats["objective"] = self.weighting.objective(values, weights)
        self.last_stats["gradient_mode"] = mode
        return None

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    # ------------------------------------------------------------------ internals
    def _check_losses(
        self, losses: Losses, expected: Optional[Tuple[str, ...]] = None
    ) -> Tuple[Tuple[str, ...], List[Tensor]]:
        known = self._names if self._names is not None else expected
        if isinstance(losses, Tensor):
            raise TypeError(
                "losses must be a sequence or a mapping of scalar tensors, one per task, not one tensor"
            )
        if isinstance(losses, Mapping):
            keys = tuple(str(k) for k in losses.keys())
            if known is not None:
                if set(keys) != set(known) or len(keys) != len(known):
                    missing = [n for n in known if n not in keys]
                    extra = [n for n in keys if n not in known]
                    raise ValueError(
                        f"losses do not match the tasks {list(known)}: missing {missing}, unknown {extra}"
                        " (name the tasks with tasks= or task_names= to use other keys)"
                    )
                by_name = {str(k): v for k, v in losses.items()}
                names = known
                items = [by_name[n] for n in names]
            else:
                names = check_names(keys)
                items = list(losses.values())
        elif isinstance(losses, (list, tuple)):
            items = list(losses)
            if known is not None:
                if len(items) != len(known):
                    raise ValueError(f"expected {len(known)} losses (tasks {list(known)}), got {len(items)}")
                names = known
            else:
                names = tuple(str(i) for i in range(len(items)))
        else:
            raise TypeError(f"losses must be a sequence or a mapping of tensors, got {type(losses).__name__}")
        if not items:
            raise ValueError("losses is empty: give one loss per task")
        for name, loss in zip(names, items):
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss of task {name!r} must be a tensor, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(f"loss of task {name!r} must be a scalar, got shape {tuple(loss.shape)}")
            if not loss.is_floating_point():
                raise TypeError(
                    f"loss of task {name!r} must be a real floating-point tensor, got {loss.dtype}"
                )
            if not loss.requires_grad or loss.grad_fn is None:
                raise ValueError(f"loss of task {name!r} does not require grad (is it detached?)")
        return names, [loss.reshape(()) for loss in items]

    def _skip(self, why: str, values: Tensor) -> None:
        amp_update(self.grad_scaler, self, True, self._device())
        self._skipped += 1
        if not self._warned_skip:
            warnings.warn(
                f"MultiTaskOptimizer skipped a step: {why} (warned once; see last_stats['skipped'])",
                stacklevel=3,
            )
            self._warned_skip = True
        self.last_stats = {"skipped": self._skipped, "losses": values.tolist(), "skipped_step": True}
        return None

    def _weighting_gram(
        self,
        jac: Sequence[Optional[Tensor]],
        blocks: List[List[int]],
        partition: Partition,
        k: int,
        factors: Sequence[LinearFactor],
    ) -> Tensor:
        """Gram matrices for the weighting: every block, or its own block last."""
        params = self.weighting.gram_params()
        if params is None:
            return block_grams(jac, blocks, k, factors)
        position = {id(p): i for i, p in enumerate(partition.shared)}
        missing = [p for p in params if id(p) not in position]
        if missing:
            raise ValueError(
                f"weighting {self.weighting.name!r}: {len(missing)} of its gram parameters are not shared "
                f"parameters (shapes {[tuple(p.shape) for p in missing[:3]]})"
            )
        return block_grams(jac, [[position[id(p)] for p in params]], k, factors)

    def _setup_weighting_once(self, names: Sequence[str]) -> None:
        if not self._weighting_setup:
            self.weighting.setup(len(names), names)
            self._weighting_setup = True

    def _setup_weighting(self, names: Sequence[str]) -> None:
        """Set the weighting up for ``names`` and give its parameters their own group."""
        if self._weighting_ready:
            return
        self._setup_weighting_once(names)
        params = self.weighting.parameters()
        if params:
            group: Dict[str, Any] = {"params": params, "task": "weighting"}
            group["lr"] = self.weighting.lr if self.weighting.lr is not None else self.param_groups[0]["lr"]
            if "weight_decay" in self.defaults:
                group["weight_decay"] = 0.0
            self.optimizer.add_param_group(group)
        if not self._weight_state:
            self._weight_state = self.weighting.init_state(len(names))
        self._weighting_ready = True

    def _commit_partition(self, partition: Partition, blocks: List[List[int]]) -> None:
        self._partition = partition
        self._names = partition.names
        self._blocks = blocks
        if not self._agg_state:
            self._agg_state = self.aggregator.init_state(len(partition.names), len(blocks))
        if partition.unused:
            _warn_unused(partition.unused, self._index_of, "are reached by no loss")
        if self._task_lr is not None:
            self._split_groups(partition)

    def _task_rates(self, names: Sequence[str]) -> Dict[str, float]:
        """``task_lr`` as ``{role: lr}`` for these task names (ValueError on a mismatch)."""
        if isinstance(self._task_lr, list):
            if len(self._task_lr) != len(names):
                raise ValueError(f"task_lr lists {len(self._task_lr)} rates for {len(names)} tasks")
            return dict(zip(names, self._task_lr))
        rates = dict(self._task_lr or {})
        _check_task_lr_names(rates, names)
        return rates

    def _split_groups(self, partition: Partition) -> None:
        if self._split:
            return
        names = partition.names
        rates = self._task_rates(names)
        roles = partition.role_of()
        new_groups: List[Dict[str, Any]] = []
        for group in self.optimizer.param_groups:
            if group.get("task") == "weighting":
                new_groups.append(group)
                continue
            buckets: Dict[str, List[Tensor]] = {}
            for p in group["params"]:
                buckets.setdefault(roles.get(id(p), "unused"), []).append(p)
            for role in ("shared", *names, "unused"):
                if not buckets.get(role):
                    continue
                new = {key: value for key, value in group.items() if key != "params"}
                new["params"] = buckets[role]
                new["task"] = role
                if role in rates:
                    new["lr"] = float(rates[role])
                new_groups.append(new)
        self.optimizer.param_groups[:] = new_groups
        self._split = True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus a ``"multitask"`` entry.

        The entry holds the task names, the partition (as parameter indices in the
        order of the wrapped optimizer's groups at construction), the per-task
        accumulators, the aggregator's and weighting's state, the learnable weighting
        parameters' values, the generator state and the step counters. Everything is
        tensors, numbers, strings and lists: it loads with ``torch.load(...,
        weights_only=True)``.
        """
        out = self.optimizer.state_dict()
        mt: Dict[str, Any] = {
            "version": _STATE_VERSION,
            "names": list(self._names) if self._names is not None else None,
            "partition": self._partition.to_indices(self._index_of) if self._partition is not None else None,
            "split": self._split,
            "steps": self._steps,
            "skipped": self._skipped,
            "generator": self._generator.get_state(),
            "precondition": {n: dict(st) for n, st in self._precond_state.items()},
            "aggregator": dict(self._agg_state),
            "weighting": dict(self._weight_state),
            "weighting_params": [p.detach().clone() for p in self.weighting.parameters()],
            "gradient_mode": self.engine.mode if self.engine.confirmed else None,
        }
        out["multitask"] = mt
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict` into an optimizer built over the same model."""
        sd = dict(state_dict)
        mt = sd.pop("multitask", None)
        if mt is None:
            self.optimizer.load_state_dict(sd)
            return
        if mt.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported multitask state version {mt.get('version')!r}")
        names = tuple(mt["names"]) if mt["names"] is not None else None
        if self._names is not None and names is not None and names != self._names:
            raise ValueError(f"state_dict is for tasks {list(names)}, this optimizer has {list(self._names)}")
        partition = None
        if mt["partition"] is not None:
            data = mt["partition"]
            every = [n for key in ("shared", "unused") for n in data[key]] + [
                n for t in data["tasks"] for n in t
            ]
            if every and max(every) >= len(self._params):
                raise ValueError("state_dict's partition refers to more parameters than this optimizer has")
            partition = Partition.from_indices(data, self._params)
            if self._partition is not None and self._partition.to_indices(self._index_of) != data:
                raise ValueError("state_dict's partition differs from this optimizer's explicit partition")
        if partition is not None and self._partition is None:
            blocks = _blocks(self._granularity, partition, self._index_of)
            self._partition, self._names, self._blocks = partition, partition.names, blocks
            if mt["split"]:
                self._split_groups(partition)
        if names is not None and not self._weighting_ready:
            self._names = names
            self._setup_weighting(names)
        params = self.weighting.parameters()
        if len(params) != len(mt["weighting_params"]):
            raise ValueError("state_dict's weighting parameters do not match this optimizer's weighting")
        self.optimizer.load_state_dict(sd)
        with torch.no_grad():
            for p, value in zip(params, mt["weighting_params"]):
                p.copy_(value)
        self._precond_state = {}
        for n, st in mt["precondition"].items():
            p = self._params[int(n)]
            self._precond_state[int(n)] = {
                "v": st["v"].to(device=p.device, dtype=p.dtype),
                "step": st["step"].to(torch.float64),
            }
        self._agg_state = {key: value.clone() for key, value in mt["aggregator"].items()}
        self._weight_state = {key: value.clone() for key, value in mt["weighting"].items()}
        self._generator.set_state(mt["generator"].clone())
        self._steps = int(mt["steps"])
        self._skipped = int(mt["skipped"])
        if mt["gradient_mode"] is not None:
            self.engine.mode = mt["gradient_mode"]
            self.engine.confirmed = True


# ---------------------------------------------------------------------- helpers
@dataclass
class _Pending:
    """Per-task gradients computed but not yet aggregated (one or more micro-batches)."""

    names: Tuple[str, ...]
    partition: Optional[Partition]
    blocks: Optional[List[List[int]]]
    values: Tensor
    grads: Optional[TaskGradients]
    bad: Optional[str] = None
    micro: int = 1


def _scale_gradients(grads: TaskGradients, factors: Sequence[float]) -> None:
    """Multiply task ``i``'s gradients by ``factors[i]`` (Jacobian rows, deltas, task grads)."""
    k = len(factors)
    for n, j in enumerate(grads.shared):
        if j is not None:
            grads.shared[n] = j * torch.tensor(factors, dtype=j.dtype, device=j.device).view(
                k, *([1] * (j.dim() - 1))
            )
    for f in grads.factors:
        f.deltas = f.deltas * torch.tensor(factors, dtype=f.deltas.dtype, device=f.deltas.device).view(
            k, 1, 1
        )
    for i, task in enumerate(grads.tasks):
        if factors[i] != 1.0:
            grads.tasks[i] = [None if g is None else g * factors[i] for g in task]


def _materialize(grads: TaskGradients, shared: Sequence[Tensor]) -> TaskGradients:
    """Turn factored linear layers into explicit Jacobian rows."""
    if not grads.factors:
        return grads
    rows = list(grads.shared)
    for f in grads.factors:
        x = f.inputs.to(f.deltas.dtype)
        weight = torch.einsum("kno,ni->koi", f.deltas, x)
        rows[f.weight] = weight if rows[f.weight] is None else rows[f.weight] + weight
        if f.bias is not None:
            bias = f.deltas.sum(dim=1)
            rows[f.bias] = bias if rows[f.bias] is None else rows[f.bias] + bias
    return TaskGradients(rows, grads.tasks, [])


def _add_gradients(a: TaskGradients, b: TaskGradients, shared: Sequence[Tensor]) -> TaskGradients:
    """Sum of two micro-batches' gradients (factors are materialised: bounded memory)."""
    a, b = _materialize(a, shared), _materialize(b, shared)
    rows = [x if y is None else (y if x is None else x + y) for x, y in zip(a.shared, b.shared)]
    tasks = [
        [x if y is None else (y if x is None else x + y) for x, y in zip(ta, tb)]
        for ta, tb in zip(a.tasks, b.tasks)
    ]
    return TaskGradients(rows, tasks, [])


def _average_updates(
    updates: List[Optional[Tensor]], task_grads: List[List[Optional[Tensor]]]
) -> Tuple[List[Optional[Tensor]], List[List[Optional[Tensor]]]]:
    flat = [u for u in updates if u is not None] + [g for t in task_grads for g in t if g is not None]
    it = iter(all_average(flat))
    new_updates = [None if u is None else next(it) for u in updates]
    new_tasks = [[None if g is None else next(it) for g in t] for t in task_grads]
    return new_updates, new_tasks


def _build_aggregator(
    surgery: Union[None, str, Aggregator],
    reduction: str,
    beta: Optional[float],
    extra: Optional[Mapping[str, Any]],
) -> Aggregator:
    kwargs = dict(extra or {})
    if isinstance(surgery, Aggregator):
        if kwargs:
            raise TypeError("surgery_kwargs are only accepted with a surgery given by name")
        return surgery
    if surgery is not None and not isinstance(surgery, str):
        raise TypeError(f"surgery must be None, a name or an Aggregator, got {type(surgery).__name__}")
    probe = get_aggregator(surgery) if surgery is None or surgery.lower() != "" else None
    accepted = inspect.signature(type(probe).__init__).parameters if probe is not None else {}
    if "reduction" in accepted:
        kwargs.setdefault("reduction", reduction)
    elif reduction != "sum":
        raise TypeError(f"surgery {surgery!r} does not take a reduction")
    if beta is not None:
        if "beta" not in accepted:
            raise TypeError(f"surgery {surgery!r} does not take beta")
        kwargs.setdefault("beta", beta)
    return get_aggregator(surgery, **kwargs)


def _check_granularity(granularity: Granularity, index_of: Mapping[int, int]) -> Union[str, List[List[int]]]:
    if isinstance(granularity, str):
        if granularity not in ("global", "tensor"):
            raise ValueError(
                f"granularity must be 'global', 'tensor' or a list of parameter lists, got {granularity!r}"
            )
        return granularity
    blocks: List[List[int]] = []
    seen: Dict[int, int] = {}
    for b, block in enumerate(granularity):
        if isinstance(block, Tensor):
            raise TypeError("granularity: each block must be a list of parameters, not a single tensor")
        indices = []
        for p in block:
            if id(p) not in index_of:
                raise ValueError(
                    f"granularity: block {b} holds a parameter that is not in the inner optimizer"
                )
            n = index_of[id(p)]
            if n in seen:
                raise ValueError(f"granularity: parameter #{n} is in blocks {seen[n]} and {b}")
            seen[n] = b
            indices.append(n)
        blocks.append(indices)
    if not blocks:
        raise ValueError("granularity: the list of blocks is empty")
    return blocks


def _blocks(
    granularity: Union[str, List[List[int]]], partition: Partition, index_of: Mapping[int, int]
) -> List[List[int]]:
    """Blocks as lists of positions in ``partition.shared``."""
    n = len(partition.shared)
    if granularity == "global":
        return [list(range(n))]
    if granularity == "tensor":
        return [[i] for i in range(n)] or [[]]
    position = {index_of[id(p)]: i for i, p in enumerate(partition.shared)}
    blocks = [[position[idx] for idx in block if idx in position] for block in granularity]
    covered = {i for block in blocks for i in block}
    missing = [i for i in range(n) if i not in covered]
    if missing:
        shown = ", ".join(
            describe(index_of[id(partition.shared[i])], partition.shared[i]) for i in missing[:5]
        )
        raise ValueError(f"granularity: shared {shown} is in no block")
    return [block for block in blocks if block] or [[]]


def _check_task_lr(
    task_lr: Union[None, Mapping[str, float], Sequence[float]],
) -> Union[None, Dict[str, float], List[float]]:
    if task_lr is None:
        return None
    if isinstance(task_lr, Mapping):
        out = {str(k): float(v) for k, v in task_lr.items()}
        values = out.values()
    elif isinstance(task_lr, (list, tuple)):
        out = [float(v) for v in task_lr]  # type: ignore[assignment]
        values = out  # type: ignore[assignment]
    else:
        raise TypeError(f"task_lr must be a mapping or a list of floats, got {type(task_lr).__name__}")
    for v in values:
        if not v >= 0.0:
            raise ValueError(f"task_lr: learning rates must be >= 0, got {v!r}")
    return out


def _check_task_lr_names(rates: Mapping[str, float], names: Sequence[str]) -> None:
    unknown = [k for k in rates if k != "shared" and k not in names]
    if unknown:
        raise ValueError(f"task_lr names unknown task(s) {unknown}; tasks are {list(names)} (and 'shared')")


def _scheduler_attached(groups: Sequence[Mapping[str, Any]]) -> bool:
    return any("initial_lr" in g for g in groups)


def _weighting_is_learnable(weighting: Weighting) -> bool:
    return type(weighting).parameters is not Weighting.parameters


def _check_features(features: Any) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a tensor, got {type(features).__name__}")
    if not features.requires_grad:
        raise ValueError(
            "features does not require grad: pass the shared trunk's output, not a detached copy"
        )


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite: one min/max pass per tensor
    (NaN and inf propagate through both) and one host sync per device."""
    extremes: Dict[torch.device, List[Tensor]] = {}
    for t in tensors:
        if t.numel():
            low, high = torch.aminmax(t.detach())
            extremes.setdefault(t.device, []).extend((low.float(), high.float()))
    return all(bool(torch.isfinite(torch.stack(v)).all()) for v in extremes.values())


def _combine(
    jac: Sequence[Optional[Tensor]],
    blocks: Sequence[Sequence[int]],
    coefs: Tensor,
    factors: Sequence[LinearFactor] = (),
) -> Tuple[List[Optional[Tensor]], bool]:
    """Shared updates ``J_b^T c_b`` per parameter, and whether they are all finite.

    Recomputed in float64 when the parameters' dtype overflows.
    """
    out = _combine_in(jac, blocks, coefs, factors, None)
    if _all_finite([u for u in out if u is not None]):
        return out, True
    out = _combine_in(jac, blocks, coefs, factors, torch.float64)
    return out, _all_finite([u for u in out if u is not None])


def _combine_in(
    jac: Sequence[Optional[Tensor]],
    blocks: Sequence[Sequence[int]],
    coefs: Tensor,
    factors: Sequence[LinearFactor],
    dtype: Optional[torch.dtype],
) -> List[Optional[Tensor]]:
    out: List[Optional[Tensor]] = [None] * len(jac)
    block_of = {p: b for b, block in enumerate(blocks) for p in block}
    for i, rows in enumerate(jac):
        if rows is None or i not in block_of:
            continue
        work = rows if dtype is None else rows.to(dtype)
        c = coefs[block_of[i]].to(device=rows.device, dtype=work.dtype)
        out[i] = torch.tensordot(c, work, dims=1).to(rows.dtype)
    for f in factors:
        d = f.deltas if dtype is None else f.deltas.to(dtype)
        x = f.inputs.to(d.dtype)
        for pos in (f.weight, f.bias):
            if pos is None or pos not in block_of:
                continue
            c = coefs[block_of[pos]].to(device=d.device, dtype=d.dtype)
            mixed = torch.tensordot(c, d, dims=1)  # (N, out)
            update = mixed.T @ x if pos == f.weight else mixed.sum(dim=0)
            out[pos] = update.to(f.deltas.dtype)
    return out


def _accumulate(param: Tensor, grad: Optional[Tensor]) -> None:
    if grad is None:
        return
    if param.grad is None:
        param.grad = grad.detach().to(param.dtype).clone() if grad.dtype != param.dtype else grad.detach()
    else:
        param.grad.add_(grad.detach())


def _warn_unused(params: Sequence[Tensor], index_of: Mapping[int, int], why: str) -> None:
    shown = ", ".join(describe(index_of[id(p)], p) for p in params[:8])
    more = f" and {len(params) - 8} more" if len(params) > 8 else ""
    warnings.warn(
        f"MultiTaskOptimizer: {shown}{more} {why}; they are left to the inner optimizer unchanged",
        stacklevel=4,
    )
