"""The optimizer's committed bookkeeping: what a taken step (or a load) changes.

:class:`Bookkeeping` is the part of :class:`~multitask_optim.optimizer.MultiTaskOptimizer`
that owns the committed structure -- the partition and its blocks, the task names,
the param-group split, every component's state, the step counter -- and the rules for
changing it: adopt a partition or the tasks once, hand the first step fresh component
states, restrict states to the tasks present, commit a taken step, skip a step with
nothing written. ``optimizer.py`` conducts the stages and calls these.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _checkpoint, _groups
from ._amp import update as amp_update
from ._arguments import (
    blocks_of,
    component_kwargs,
    task_names_from,
    task_rates,
)
from ._clipping import clip_
from ._components import State
from ._graph import LossGraph
from ._host import LazyStats, host_stage, to_host
from ._losses import (
    Parsed,
)
from ._pipeline import (
    First,
    Outcome,
    Structure,
    merged_states,
    non_finite_losses,
    sub_states,
    weigh,
    write_grad,
)
from ._sources import ParameterRows, RepresentationRows
from .aggregators import AGGREGATORS, Aggregator, GramianCallable
from .diagnostics import step_stats
from .partition import Partition, TasksArg, check_against_graph, discover, explicit, warn_unused
from .precondition import PRECONDITIONERS, Preconditioner
from .weighting import WEIGHTINGS, Weighting, WeightingContext

Source = Union[ParameterRows, RepresentationRows]


class Bookkeeping:
    """Committed state of a multi-task optimizer and the rules that change it."""

    #: Why the last skipped step was skipped (None before any; :meth:`_skip` sets it).
    last_skip_reason: Optional[str] = None
    #: Whether the one-task warning was given (:meth:`_note_task_count`).
    _warned_single: bool = False

    #: True while weights-only mode runs: the engine that runs the backward owns the loss scaler
    _engine_owns_scaler = False

    def _build_components(
        self,
        surgery: Any,
        precondition: Any,
        weighting: Any,
        surgery_kwargs: Optional[Mapping[str, Any]],
        precondition_kwargs: Optional[Mapping[str, Any]],
        weighting_kwargs: Optional[Mapping[str, Any]],
        old: Mapping[str, Any],
    ) -> None:
        """Each component from its name (+ kwargs, + deprecated spellings) or instance."""
        if surgery is not None and not isinstance(surgery, (str, Aggregator)) and callable(surgery):
            surgery = GramianCallable(surgery)  # e.g. a TorchJD Gramian weighting
        self.aggregator: Aggregator = AGGREGATORS.build(
            surgery, component_kwargs("surgery", surgery, surgery_kwargs, old)
        )  # type: ignore[assignment]
        self.preconditioner: Optional[Preconditioner] = PRECONDITIONERS.build(
            precondition, component_kwargs("precondition", precondition, precondition_kwargs, old)
        )
        self.weighting: Weighting = WEIGHTINGS.build(weighting, weighting_kwargs)  # type: ignore[assignment]

    def _adopt_known_tasks(
        self,
        shared: Optional[Iterable[Tensor]],
        tasks: Optional[TasksArg],
        task_names: Optional[Sequence[str]],
        num_tasks: Optional[int],
    ) -> None:
        """An explicit partition, and task names known at construction, are committed now."""
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

    def _structure(self, parsed: Parsed, graph: LossGraph, known: Optional[Structure]) -> Structure:
        """Partition (discovered or checked) and blocks, restricted to the present tasks;
        raises before any change."""
        names = parsed.names
        whole = (
            self._partition if self._partition is not None else (known.full if known is not None else None)
        )
        if parsed.partial:
            if whole is None:
                raise ValueError(
                    f"tasks {[n for i, n in enumerate(names) if i not in parsed.present]} are absent from this "
                    "step, but the partition is not known yet: give every task's loss in the first step, or "
                    "pass shared= and tasks="
                )
            blocks = (
                self._blocks
                if self._blocks is not None
                else blocks_of(self._granularity, whole, self._index_of)
            )
            sub = Structure(whole, blocks).restricted(parsed.present)
            check_against_graph(sub.partition, graph, self._params)
            if not self._weighting_ready:
                _groups.check_can_add_weighting(self.optimizer, self.weighting)
                self.weighting.bind(names)
            return sub
        if known is not None:
            check_against_graph(known.full, graph, self._params)
            return known.restricted(parsed.present) if known.whole is not None else known
        if self._partition is None and self._task_lr is not None:
            _groups.check_can_split(self.optimizer)
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
            _groups.check_can_add_weighting(self.optimizer, self.weighting)
            self.weighting.bind(names)
        return Structure(partition, blocks)

    def _note_task_count(self, names: Sequence[str]) -> None:
        """Warn once when the losses are one task's: nothing multi-task applies then."""
        if len(names) == 1 and not self._warned_single:
            self._warned_single = True
            warnings.warn(
                "MultiTaskOptimizer: step() got the loss of a single task, so nothing multi-task applies "
                f"(surgery={self.aggregator.name!r} and the weighting see one task); pass one loss per task, "
                "e.g. opt.step([loss_a, loss_b]), not their sum (warned once)",
                stacklevel=5,  # the caller of opt.step (through torch's step wrapper)
            )

    def _components(self) -> Dict[str, Any]:
        return {"surgery": self.aggregator, "weighting": self.weighting, "precondition": self.preconditioner}

    def _current_states(self, num_tasks: int, num_blocks: int) -> Dict[str, State]:
        """The committed states; a component not yet committed starts from its ``init_state``."""
        current = dict(self._states)
        if not self._weighting_ready:
            current["weighting"] = self.weighting.init_state(num_tasks)
        if self._partition is None:
            current["surgery"] = self.aggregator.init_state(num_tasks, num_blocks)
        return current

    def _weigh(
        self,
        names: Tuple[str, ...],
        present: Tuple[int, ...],
        values: Tensor,
        old: Dict[str, State],
        current: Dict[str, State],
    ) -> Tuple[Tensor, Dict[str, State], Optional[str]]:
        """The present tasks' weights, and the weighting's new (full) state."""
        k = len(names)
        comps = {"weighting": self.weighting}
        state = (
            old["weighting"] if "weighting" in old else sub_states(comps, current, present, k)["weighting"]
        )
        ctx = WeightingContext(self._generator, self._steps, names, present)
        weights, new_state, why = weigh(self.weighting, values, state, ctx)
        merged = merged_states(comps, current, {"weighting": new_state}, present, k, 1)
        return weights, merged, why

    def _weigh_first(
        self,
        names: Tuple[str, ...],
        present: Tuple[int, ...],
        values: Tensor,
        old: Dict[str, State],
        current: Dict[str, State],
        need_losses: bool = False,
    ) -> First:
        """The weights before the rows are formed into anything (preconditioning and row
        methods need rows that carry them). Weights that depend on this step's losses
        (anything but the constant 1), or a row method (``need_losses``: it reads the
        losses on the host), cost one host read of the losses of their own."""
        k = len(present)
        if self.weighting.is_constant_one() and not need_losses:
            return First(values, torch.ones(k, dtype=torch.float64), [1.0] * k, {}, None, later=True)
        host = to_host(values.detach().to(torch.float64))  # a read of its own (see above)
        with host_stage():
            bad = non_finite_losses([names[i] for i in present], host)
            if bad is not None:
                return First(host, None, [], {}, bad)
            weights, states, why = self._weigh(names, present, host, old, current)
            return First(host, weights, weights.tolist(), states, why)

    def _commit(self, structure: Structure, outcome: Outcome, own_grads: bool = True) -> None:
        """Nothing before this changed any state; from here the step is taken.

        ``own_grads``: the step owns ``.grad`` (False in weights-only mode, where the
        caller's backward writes it and an absent task's gradients are left alone)."""
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
        if own_grads:
            self._drop_absent(partition.names)
        self._states.update(outcome.states)
        self.engine.commit()

    def _drop_absent(self, present: Sequence[str]) -> None:
        """An absent task's own parameters take no part in the step: no ``.grad`` at all
        (also not a zero one), so the inner optimizer leaves them and their moments alone."""
        names = self._names or ()
        if len(present) == len(names):
            return
        own = self._partition.tasks if self._partition is not None else [[] for _ in names]
        weighting = (self.weighting.task_parameters() if self._weighting_ready else None) or [None] * len(
            names
        )
        for name, params, extra in zip(names, own, weighting):
            if name not in present:
                for p in [*params, *([extra] if extra is not None else [])]:
                    p.grad = None

    def _skip(self, why: str, values: Tensor, weights: Optional[Tensor] = None) -> None:
        """Nothing written; the skip counted, with its reason (``skipped``, ``last_skip_reason``)."""
        self.engine.forget()
        if not self._engine_owns_scaler:  # weights-only mode: the caller steps and updates the scaler
            amp_update(self.grad_scaler, self, True, self._device())
        self.skipped += 1
        self.last_skip_reason = why
        if not self._warned_skip:
            warnings.warn(
                f"MultiTaskOptimizer skipped a step: {why} (warned once; see opt.skipped and "
                "opt.last_skip_reason)",
                stacklevel=4,
            )
            self._warned_skip = True
        stats = LazyStats(skipped=self.skipped, skip_reason=why, skipped_step=True)
        stats.defer(lambda: {"losses": values.tolist()})
        if weights is not None:  # the weights were computed: say what they were
            stats.defer(lambda: {"weights": weights.tolist()})
        self.last_stats = stats
        return None

    def _take(
        self,
        names: Tuple[str, ...],
        present: Tuple[int, ...],
        values: Tensor,
        outcome: Outcome,
        source: Optional[Source],
    ) -> None:
        """The weighting's own gradients, clipping, the inner step, and the step's statistics."""
        with host_stage():  # a learnable weighting's parameters live on the host
            self._weighting_backward(names, present, values, outcome)
        norm = None if self.max_grad_norm is None else clip_(self._params, self.max_grad_norm)
        weighting, weights = self.weighting, outcome.weights
        self._steps += 1
        self.optimizer.step()
        self.weighting.after_step()
        amp_update(self.grad_scaler, self, False, self._device())
        self._record(names, present, values, outcome, source)
        self.last_stats.defer(lambda: {"objective": weighting.objective(values, weights)})
        if norm is not None:
            self.last_stats.defer(lambda: {"grad_norm": float(norm)})

    def _weighting_backward(
        self, names: Tuple[str, ...], present: Tuple[int, ...], values: Tensor, outcome: Outcome
    ) -> None:
        """A learnable weighting's own gradients, into the ``.grad`` of its parameters (after
        the commit: its state is the step's). A weighting that reads the Gram gets none on a
        plain step."""
        ran = outcome.coefficients is not None or outcome.gram is not None
        if self.weighting.parameters() and (ran or not self.weighting.needs_gram):
            comps = {"weighting": self.weighting}
            state = sub_states(comps, self._states, present, len(names))["weighting"]
            ctx = WeightingContext(self._generator, self._steps, names, present)
            self.weighting.backward(values, outcome.weights, state, ctx, gram=outcome.weighting_gram)

    def _record(
        self,
        names: Tuple[str, ...],
        present: Tuple[int, ...],
        values: Tensor,
        outcome: Outcome,
        source: Optional[Source],
    ) -> None:
        """``last_stats`` of a taken step: built from the step's tensors when first read."""
        ran = outcome.coefficients is not None or outcome.gram is not None
        stats = LazyStats(
            path="full" if ran else "plain",
            gradient_mode=source.path() if ran and source is not None else "plain",
            tasks=[names[i] for i in present],
            **outcome.stats,
        )
        blocks, skipped, k = len(self._blocks or [[]]), self.skipped, len(present)
        gram, weights, coefs = outcome.gram, outcome.weights, outcome.coefficients  # not the gradients
        stats.defer(lambda: _step_statistics(gram, weights, coefs, values, skipped, ran, blocks, k))
        self.last_stats = stats

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _adopt_partition(
        self, partition: Partition, warn: bool, blocks: Optional[List[List[int]]] = None, split: bool = False
    ) -> None:
        """Commit the partition (and split the groups for ``task_lr`` or a loaded split)."""
        self._partition = partition
        self._names = partition.names
        self._blocks = (
            blocks if blocks is not None else blocks_of(self._granularity, partition, self._index_of)
        )
        if not self._states["surgery"]:
            self._states["surgery"] = self.aggregator.init_state(len(partition.names), len(self._blocks))
        if warn and partition.unused:
            warn_unused(partition.unused, self._index_of, "are reached by no loss")
        if warn and not partition.shared and len(partition.names) > 1:
            warnings.warn(
                "MultiTaskOptimizer: no parameter is shared between the tasks (each is reached by one loss "
                f"only), so surgery={self.aggregator.name!r} has nothing to act on; every task trains on its "
                "own gradient",
                stacklevel=5,
            )
        if (self._task_lr is not None or split) and not self._split:
            _groups.split_groups(self.optimizer, partition, task_rates(self._task_lr, partition.names))
            self._split = True

    def _adopt_weighting(self, names: Sequence[str]) -> None:
        """Bind the weighting to ``names`` and give its parameters their own group."""
        self.weighting.bind(names)
        _groups.add_weighting_group(self.optimizer, self.weighting)
        if not self._states["weighting"]:
            self._states["weighting"] = self.weighting.init_state(len(names))
        self._names = tuple(names)
        self._weighting_ready = True

    def _config(self) -> Dict[str, Any]:
        """What a checkpoint must match: each component's name and settings, the granularity."""
        granularity = self._granularity if isinstance(self._granularity, str) else repr(self._granularity)
        return {
            "surgery": _checkpoint.record(self.aggregator),
            "weighting": _checkpoint.record(self.weighting),
            "precondition": _checkpoint.record(self.preconditioner),
            "granularity": granularity,
        }


def _step_statistics(
    gram: Optional[Tensor],
    weights: Tensor,
    coefs: Optional[Tensor],
    values: Tensor,
    skipped: int,
    ran: bool,
    blocks: int,
    k: int,
) -> Dict[str, Any]:
    """The statistics of a taken step that come from its tensors (read when asked for)."""
    if gram is not None:
        gram = gram[0] if gram.shape[0] == 1 else gram.sum(dim=0)
    out = step_stats(gram, None, weights.tolist(), values.tolist(), skipped)
    if not ran:  # the plain path: every coefficient is 1
        coefs = torch.ones(blocks, k, dtype=torch.float64)
    listed = None if coefs is None else coefs.tolist()  # (B, K) -> one transfer, then Python
    out["coefficients"] = None if listed is None else [sum(c) / len(c) for c in zip(*listed)]
    out["block_coefficients"] = listed
    return out
