"""The stages of one step, as functions with one job each.

``optimizer.py`` conducts them in this order::

    gather      per-task rows (parameter Jacobian or representation), summed over
                micro-batches                                   -> Gathered
    reduce      average across ranks (Source.reduce)
    weigh       losses -> task weights w (Weighting)            -> Weighed
    precondition  per-task accumulators rescale the rows (Preconditioner)
    gram        G_b = J_b J_b^T per block, the weights applied as W G W
    aggregate   G -> coefficients c (Aggregator)
    combine     update J_b^T (c * w) (Source.updates)           -> Outcome
    commit      write .grad, component states (optimizer)
    inner step, stats

Nothing before ``commit`` changes any state: a stage that finds a problem returns a
reason to skip, and the conductor drops every new state computed so far.

A step may lack some tasks: the stages then run on the ``K'`` present tasks (their
rows, their Gram, their coefficients), each component on the present tasks' slices of
its state (:func:`sub_states`), written back after the step (:func:`merged_states`),
and with its per-task settings restricted to them (:func:`sub_components`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._components import Component, State, check_partial, merge_tasks, select_tasks
from ._gradients import Rows, TaskGradients, all_finite, scaled_grad
from ._sources import ParameterRows, RepresentationRows
from .aggregators import AggregationContext, Aggregator, RowAggregator
from .fsdp import as_param_grad
from .partition import Partition
from .precondition import Preconditioner
from .weighting import Weighting, WeightingContext

Source = Union[ParameterRows, RepresentationRows]


@dataclass
class Structure:
    """What the losses of a step reach: the partition and the blocks of shared parameters."""

    partition: Partition
    blocks: List[List[int]]
    whole: Optional[Partition] = None

    @property
    def full(self) -> Partition:
        """The partition over every task (``partition`` covers the present tasks only)."""
        return self.whole if self.whole is not None else self.partition

    def restricted(self, present: Sequence[int]) -> Structure:
        """The structure of a step with only the ``present`` tasks (shared params unchanged)."""
        full = self.full
        sub = Partition(
            tuple(full.names[i] for i in present), full.shared, [full.tasks[i] for i in present], full.unused
        )
        return Structure(sub, self.blocks, full)


@dataclass
class Gathered:
    """The gather stage's result: one or more micro-batches' per-task gradients.

    ``grads`` is None when a micro-batch was already known to be bad (``bad`` says why).
    ``names`` are every task's, ``present`` the indices of the tasks the gradients and
    values are for; ``samples`` their sample counts on this process when the user gave
    them (weights of the average across ranks).
    """

    names: Tuple[str, ...]
    values: Tensor
    structure: Optional[Structure] = None
    grads: Optional[TaskGradients] = None
    bad: Optional[str] = None
    micro_batches: int = 1
    present: Tuple[int, ...] = ()
    samples: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if not self.present:
            self.present = tuple(range(len(self.names)))

    def __add__(self, other: Gathered) -> Gathered:
        """Sum of two micro-batches: each task's gradients and loss value summed over the
        micro-batches that had it (a task present in either is present in the sum)."""
        union = tuple(sorted(set(self.present) | set(other.present)))
        structure = self.structure or other.structure
        if structure is not None and union != self.present:
            structure = structure.restricted(union)
        sizes = [len(t) for t in structure.full.tasks] if structure is not None else []
        if self.grads is None or other.grads is None:
            grads = None
        else:
            grads = self.grads.reindex(self.present, union, sizes) + other.grads.reindex(
                other.present, union, sizes
            )
        samples = None
        if self.samples is not None or other.samples is not None:
            samples = _spread(self.samples, self.present, union) + _spread(
                other.samples, other.present, union
            )
        return Gathered(
            self.names,
            _spread(self.values, self.present, union) + _spread(other.values, other.present, union),
            structure,
            grads,
            self.bad or other.bad,
            self.micro_batches + other.micro_batches,
            union,
            samples,
        )


def _spread(values: Optional[Tensor], src: Sequence[int], dst: Sequence[int]) -> Tensor:
    """A ``(len(src),)`` vector laid out over ``dst`` (zeros elsewhere; None: ones)."""
    out = torch.zeros(len(dst), dtype=torch.float64)
    position = {t: n for n, t in enumerate(dst)}
    for n, t in enumerate(src):
        out[position[t]] = 1.0 if values is None else float(values[n])
    return out if values is None or values.dtype == torch.float64 else out.to(values.dtype)


@dataclass
class Outcome:
    """Everything a taken step writes, computed before anything is written."""

    weights: Tensor
    coefficients: Optional[Tensor]
    gram: Optional[Tensor]
    shared_updates: Rows
    task_grads: List[List[Optional[Tensor]]]
    states: Dict[str, State] = field(default_factory=dict)
    weighting_gram: Optional[Tensor] = None
    stats: Dict[str, Any] = field(default_factory=dict)


def non_finite_losses(names: Sequence[str], values: Tensor) -> Optional[str]:
    listed = values.tolist()
    if all(math.isfinite(v) for v in listed):
        return None
    bad = [n for n, v in zip(names, listed) if not math.isfinite(v)]
    return f"non-finite loss for task(s) {bad}"


def weigh(
    weighting: Weighting, values: Tensor, state: State, ctx: WeightingContext
) -> Tuple[Tensor, State, Optional[str]]:
    """Task weights ``(K,)`` float64 and the weighting's new state (or a reason to skip)."""
    weights, new_state = weighting.compute(values, state, ctx)
    weights = weights.detach().to(torch.float64).cpu().reshape(values.shape[0])
    if not finite_values(weights):
        return weights, new_state, "non-finite task weights"
    return weights, new_state, None


def precondition(
    preconditioner: Preconditioner, grads: TaskGradients, keys: Sequence[str], state: State
) -> Tuple[TaskGradients, State, Optional[str]]:
    """Rows rescaled by each task's accumulator; a step that would overflow one is refused."""
    rows, new_state = preconditioner.apply(grads.shared, keys, state)
    touched = [new_state[f"{key}.v"] for key, r in zip(keys, grads.shared) if r is not None]
    if not grads.agree(all_finite(touched)):
        return grads, state, "a per-task accumulator would overflow"
    return grads.with_shared(rows), new_state, None


def finite_values(values: Tensor) -> bool:
    """Whether a small CPU float64 tensor (losses, weights, coefficients) is all finite."""
    if values.numel() <= 4096 and values.device.type == "cpu":
        return all(math.isfinite(v) for v in values.reshape(-1).tolist())  # no tensor ops
    return bool(torch.isfinite(values).all())


def all_ones(weights: Tensor) -> bool:
    return all(w == 1.0 for w in weights.tolist())


def weighted_gram(gram: Tensor, weights: Tensor) -> Tensor:
    """``W G W`` in float64: the Gram of the rows ``w_i g_i`` without forming them."""
    if all_ones(weights):
        return gram
    k = weights.shape[0]
    w = weights.to(gram.dtype)
    return gram * w.view(1, k, 1) * w.view(1, 1, k)


def aggregate(
    aggregator: Aggregator, gram: Tensor, state: State, ctx: AggregationContext
) -> Tuple[Tensor, State, Optional[str]]:
    coefs, new_state = aggregator(gram, state, ctx)
    if not finite_values(coefs):
        return coefs, state, "non-finite aggregation"
    return coefs, new_state, None


def scale_tasks(
    task_grads: List[List[Optional[Tensor]]], weights: Sequence[float]
) -> List[List[Optional[Tensor]]]:
    """Task parameters' gradients ``grad(w_i L_i)``.

    A weight below the gradient dtype's smallest normal number (``1e-42`` in float32) is
    not representable there: such a product is taken in float64 and rounded once.
    """
    return [
        task if w == 1.0 else [None if g is None else scaled_grad(g, w) for g in task]
        for task, w in zip(task_grads, weights)
    ]


def write_grad(param: Tensor, grad: Optional[Tensor]) -> None:
    """Add ``grad`` to ``param.grad`` (as ``backward`` would), creating it if absent."""
    if grad is None:
        return
    grad = as_param_grad(param, grad)  # FSDP2: a local shard becomes a DTensor gradient
    if param.grad is None:
        param.grad = grad.detach().to(param.dtype).clone() if grad.dtype != param.dtype else grad.detach()
    else:
        param.grad.add_(grad.detach())


def aggregate_and_combine(
    aggregator: Aggregator,
    state: State,
    grads: TaskGradients,
    gram: Tensor,
    blocks: List[List[int]],
    partition: Partition,
    source: Any,
    ctx: AggregationContext,
    weights: Optional[Tensor],
    combine: bool = True,
) -> Tuple[Optional[Tensor], Rows, State, Optional[str]]:
    """Aggregate, then combine the rows: ``(coefficients, shared updates, new state, why not)``.

    ``weights`` multiply the coefficients when the rows do not carry them (Gram-space
    weighting); ``None`` when they do. ``combine=False``: the coefficients only (no
    updates; weights-only mode, where the caller's backward of ``sum_i c_i w_i L_i``
    forms them). The aggregator is told the precision of each block's rows
    (``ctx.rounding``, :meth:`~._gradients.TaskGradients.gram_rounding`).
    """
    shared = partition.shared
    ctx = replace(ctx, rounding=grads.gram_rounding(blocks))
    if isinstance(aggregator, RowAggregator):
        rows = grads.block_rows(blocks, shared)  # FSDP2: this rank's shards, ctx.shards says which
        ctx = replace(ctx, shards=grads.shards(blocks, shared))
        flat, coefs, new_state = aggregator.aggregate_rows(rows, gram, state, ctx)
        updates = grads.split_updates(blocks, flat, shared)
        finite = grads.agree(all_finite([u for u in updates if u is not None]))  # sharded: every rank's
        return coefs, updates, new_state, None if finite else "non-finite aggregation"
    coefs, new_state, why = aggregate(aggregator, gram, state, ctx)
    if why is not None or not combine:
        return coefs, [], (state if why is not None else new_state), why
    mix = coefs if weights is None or all_ones(weights) else coefs * weights.view(1, -1)
    updates, finite = source.updates(grads, blocks, mix, partition)
    return coefs, updates, new_state, None if finite else "non-finite aggregation"


def sub_states(
    components: Dict[str, Optional[Component]],
    states: Dict[str, State],
    present: Sequence[int],
    num_tasks: int,
) -> Dict[str, State]:
    """Every component's state restricted to the ``present`` tasks (all tasks: as it is).

    Raises:
        ValueError: a component that cannot be sliced by task (:func:`check_partial`).
    """
    if len(present) == num_tasks:
        return dict(states)
    out = {}
    for kind, component in components.items():
        state = states.get(kind, {})
        check_partial(component, kind, state, always=kind == "weighting")
        out[kind] = state if component is None else select_tasks(state, component.task_axes() or {}, present)
    return out


def sub_components(
    components: Dict[str, Optional[Component]], present: Sequence[int], num_tasks: int
) -> Dict[str, Optional[Component]]:
    """Every component as a step with only the ``present`` tasks runs it: its per-task
    settings restricted to those tasks (:meth:`~._components.Component.for_tasks`)."""
    return {
        kind: None if component is None else component.for_tasks(present, num_tasks)
        for kind, component in components.items()
    }


def merged_states(
    components: Dict[str, Optional[Component]],
    old: Dict[str, State],
    new: Dict[str, State],
    present: Sequence[int],
    num_tasks: int,
    num_blocks: int,
) -> Dict[str, State]:
    """The new sub-states written back into the full states (absent tasks' slices unchanged)."""
    if len(present) == num_tasks:
        return new
    out = {}
    for kind, state in new.items():
        component = components.get(kind)
        if component is None:
            out[kind] = state
            continue
        fresh = component.init_state(num_tasks, num_blocks)
        out[kind] = merge_tasks(
            old.get(kind, {}), state, component.task_axes() or {}, present, num_tasks, fresh
        )
    return out


def weighting_gram(
    weighting: Weighting,
    grads: TaskGradients,
    structure: Structure,
    source: Any,
    gram: Optional[Tensor],
    weights: Optional[Tensor],
) -> Optional[Tensor]:
    """The Gram a weighting declared it needs (``needs_gram``): every block, or its own block.

    ``gram`` is the step's (weighted) Gram when it is already the right one; ``weights``
    are applied in Gram space when the rows do not carry them.
    """
    if not weighting.needs_gram:
        return None
    params = weighting.gram_params()
    k = len(grads.tasks)
    if params is None or source.mode == "representation":
        return gram if gram is not None else source.grams(grads, source.blocks(structure.blocks), k)
    position = {id(p): i for i, p in enumerate(structure.partition.shared)}
    missing = [p for p in params if id(p) not in position]
    if missing:
        raise ValueError(
            f"weighting {weighting.name!r}: {len(missing)} of its gram parameters are not shared "
            f"parameters (shapes {[tuple(p.shape) for p in missing[:3]]})"
        )
    raw = grads.grams([[position[id(p)] for p in params]], k)
    return raw if weights is None else weighted_gram(raw, weights)


def reduced(gathered: Gathered, source: ParameterRows) -> Gathered:
    """Each task's rows and value averaged over the ranks that had it (parameter mode):
    one all-reduce (replicated) or reduce-scatter (FSDP2) by ``source``."""
    assert gathered.grads is not None and gathered.structure is not None
    full = gathered.structure.full
    weights = [1.0] * len(gathered.present) if gathered.samples is None else gathered.samples.tolist()
    grads, values, union = source.reduce_tasks(
        gathered.grads, gathered.values, gathered.present, weights, full.shared, full.tasks
    )
    structure = Structure(full, gathered.structure.blocks).restricted(union)
    return Gathered(gathered.names, values, structure, grads, None, gathered.micro_batches, union, None)
