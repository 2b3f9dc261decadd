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

from ._combine import CombinePlan
from ._combine import plan as combine_plan
from ._components import Component, State, check_partial, merge_tasks, select_tasks
from ._gradients import Rows, TaskGradients, all_finite, scaled_grad
from ._gram import GramPart, settle, suspect
from ._host import Transfer, by_device, finite_values, host_stage, peak_magnitudes
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
    """A ``(len(src),)`` vector laid out over ``dst`` (zeros elsewhere; None: ones), on the
    values' device (no host read)."""
    device = values.device if values is not None else torch.device("cpu")
    dtype = values.dtype if values is not None else torch.float64
    position = {t: n for n, t in enumerate(dst)}
    index = torch.tensor([position[t] for t in src], dtype=torch.long, device=device)
    source = torch.ones(len(src), dtype=dtype, device=device) if values is None else values
    return torch.zeros(len(dst), dtype=dtype, device=device).index_copy(0, index, source)


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
) -> Tuple[TaskGradients, State, Optional[Tensor]]:
    """Rows rescaled by each task's accumulator, the new state, and the accumulators'
    largest entries (device; the host refuses a step that would overflow one)."""
    rows, new_state = preconditioner.apply(grads.shared, keys, state)
    touched = [new_state[f"{key}.v"].detach() for key, r in zip(keys, grads.shared) if r is not None]
    peaks = None
    if touched and grads.sharded:  # each rank holds shards of the accumulators: every rank votes
        ok = grads.agree(all_finite(touched))
        peaks = torch.tensor([0.0 if ok else math.inf], dtype=torch.float64)
    elif touched:
        groups = list(by_device(touched).values())
        if len(groups) == 1:  # accumulators live with the rows: one device
            peaks = peak_magnitudes(groups[0])
        else:
            peaks = torch.tensor([0.0 if all_finite(touched) else math.inf], dtype=torch.float64)
    return grads.with_shared(rows), new_state, peaks


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
    combine: bool,
    host: Fetched,
) -> Tuple[Optional[Tensor], Rows, State, Optional[str]]:
    """Aggregate on the host, then combine the rows: ``(coefficients, shared updates, new
    state, why not)``.

    ``weights`` multiply the coefficients when the rows do not carry them (Gram-space
    weighting); ``None`` when they do. ``combine=False``: the coefficients only (no
    updates; weights-only mode, where the caller's backward of ``sum_i c_i w_i L_i``
    forms them). The aggregator is told the precision of each block's rows
    (``ctx.rounding``, :meth:`~._gradients.TaskGradients.gram_rounding`).
    """
    with host_stage():
        ctx = replace(ctx, rounding=grads.gram_rounding(blocks))
        coefs, new_state, why = aggregate(aggregator, gram, state, ctx)
        if why is not None or not combine:
            return coefs, [], (state if why is not None else new_state), why
        mix = coefs if weights is None or all_ones(weights) else coefs * weights.view(1, -1)
        planned = host.plan(grads, blocks, mix)
    updates, finite = source.planned_updates(grads, blocks, planned, partition)
    return coefs, updates, new_state, None if finite else "non-finite aggregation"


@dataclass
class RowResult:
    """A row method's result, computed on the device before the step's host read."""

    coefficients: Optional[Tensor]
    updates: Rows
    state: State
    peaks: Tensor


def aggregate_rows(
    aggregator: RowAggregator,
    state: State,
    grads: TaskGradients,
    parts: Sequence[GramPart],
    blocks: List[List[int]],
    partition: Partition,
    ctx: AggregationContext,
) -> RowResult:
    """A row method (not linear in the rows) on the device, before the step's host read:
    its updates' largest entries go with that read (a non-finite one skips the step).

    It receives the blocks' Gram on the rows' device (the parts summed there)."""
    shared = partition.shared
    rows = grads.block_rows(blocks, shared)  # FSDP2: this rank's shards, ctx.shards says which
    device = rows[0].device if rows else torch.device("cpu")
    k = len(grads.tasks)
    gram = torch.zeros(len(blocks), k, k, dtype=torch.float64, device=device)
    for part in parts:
        gram[part.block] += part.value.to(device)
    ctx = replace(ctx, rounding=grads.gram_rounding(blocks), shards=grads.shards(blocks, shared))
    flat, coefs, new_state = aggregator.aggregate_rows(rows, gram, state, ctx)
    updates = grads.split_updates(blocks, flat, shared)
    present = [u.detach() for u in updates if u is not None and u.numel()]
    if grads.sharded:  # each rank checked its shards: every rank votes (a read and an all-reduce)
        finite = grads.agree(all_finite(present))
        peaks = torch.tensor([0.0 if finite else math.inf], dtype=torch.float64)
    elif present:
        peaks = torch.cat([peak_magnitudes(group).to(device) for group in by_device(present).values()])
    else:
        peaks = torch.zeros(1, dtype=torch.float64, device=device)
    return RowResult(coefs, updates, new_state, peaks)


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


def own_block(weighting: Weighting, params: Sequence[Tensor], structure: Structure) -> List[int]:
    """The shared positions of the parameters whose Gram ``weighting`` reads (its own block)."""
    position = {id(p): i for i, p in enumerate(structure.partition.shared)}
    missing = [p for p in params if id(p) not in position]
    if missing:
        raise ValueError(
            f"weighting {weighting.name!r}: {len(missing)} of its gram parameters are not shared "
            f"parameters (shapes {[tuple(p.shape) for p in missing[:3]]})"
        )
    return [position[id(p)] for p in params]


def weighting_parts(
    weighting: Weighting, grads: TaskGradients, structure: Structure, source: Any
) -> Optional[List[GramPart]]:
    """The Gram parts a weighting that reads its own block's Gram needs (``needs_gram`` with
    :meth:`~multitask_optim.weighting.Weighting.gram_params`), formed on the device; None
    when the weighting reads no Gram or the step's own (parameter blocks, representation)."""
    if not weighting.needs_gram:
        return None
    params = weighting.gram_params()
    if params is None or source.mode == "representation":
        return None
    return grads.gram_parts([own_block(weighting, params, structure)])


def assemble(parts: Sequence[GramPart], values: Sequence[Tensor], num_blocks: int, k: int) -> Tensor:
    """The ``(B, K, K)`` host Gram from fetched parts; a suspect part (a float32 product that
    overflowed or lost a tiny row) is settled first, at the cost of one more host read."""
    with host_stage():
        out = torch.zeros(num_blocks, k, k, dtype=torch.float64)
        bad = [suspect(v, part.dtype) for part, v in zip(parts, values)]
    for part, value, redo in zip(parts, values, bad):
        if redo:
            value = settle(part, value)  # rare: outside the host stage, it reads the device
        with host_stage():
            out[part.block] += value
    return out


@dataclass
class First:
    """The weights of a step whose rows must carry them (preconditioning, row methods).

    ``later``: the weights are the constant 1, known without the losses: the weighting
    runs after the step's read as usual (``states`` then holds only what the stages
    before the read computed, e.g. the preconditioner's)."""

    values: Tensor
    weights: Optional[Tensor]
    factors: List[float]
    states: Dict[str, State]
    why: Optional[str]
    later: bool = False


@dataclass
class Fetched:
    """What the step's one host read brought back (:func:`fetch_step`), and the host-side
    questions asked of it. Every method reads host values only."""

    values: Tensor
    gram: Tensor
    own_gram: Optional[Tensor]
    probes: Dict[str, Tensor]
    grads: TaskGradients
    blocks: int

    def problem(self, names: Sequence[str], present: Sequence[int], preconditioned: bool) -> Optional[str]:
        """Why the step must be skipped (None: it can go on): a non-finite loss, gradient or
        accumulator."""
        bad = non_finite_losses([names[i] for i in present], self.values)
        if bad is not None:
            return bad
        checked = [t for name, t in self.probes.items() if name not in ("precondition", "updates")]
        if not (all(finite_values(t) for t in checked) and finite_values(self.gram)):
            return "non-finite loss or gradient"
        if self.own_gram is not None and not finite_values(self.own_gram):
            return "non-finite loss or gradient"
        accumulators = self.probes.get("precondition")
        if preconditioned and accumulators is not None and not finite_values(accumulators):
            return "a per-task accumulator would overflow"
        if "updates" in self.probes and not finite_values(self.probes["updates"]):
            return "non-finite aggregation"
        return None

    def weighting_gram(
        self, weighting: Weighting, weights: Tensor, carry: bool, gram: Tensor
    ) -> Optional[Tensor]:
        """The Gram a weighting declared it needs (``needs_gram``): the step's own (weighted),
        or its block's; in weights applied in Gram space unless the rows carry them."""
        if not weighting.needs_gram:
            return None
        if self.own_gram is None:
            return gram
        return self.own_gram if carry else weighted_gram(self.own_gram, weights)

    def plan(self, grads: TaskGradients, blocks: Sequence[Sequence[int]], mix: Tensor) -> CombinePlan:
        """How to combine ``grads`` with the ``(B, K)`` host coefficients ``mix``."""
        bounds = grads.bounds(self.gram, blocks, self.probes)
        return combine_plan(mix, bounds, grads.like())

    def weights_fit(self, grads: TaskGradients, weights: Sequence[float]) -> bool:
        """Whether every weighted own-parameter gradient ``w_i g_i`` stays finite (|w| <= 1
        keeps finite finite; above, the gradients' largest entries bound it)."""
        if all(abs(w) <= 1.0 for w in weights):
            return True
        dtype = grads.like() or next((g.dtype for t in grads.tasks for g in t if g is not None), None)
        if dtype is None:
            return True
        limit = torch.finfo(dtype).max / 2
        return all(abs(w) * p <= limit for w, p in zip(weights, grads.task_peaks(self.probes)))


def fetch_step(
    transfer: Transfer,
    values: Tensor,
    parts: Sequence[GramPart],
    weighting: Tuple[Optional[Sequence[GramPart]], int],
    grads: TaskGradients,
    num_blocks: int,
) -> Fetched:
    """The step's one device-to-host read: the loss values, every Gram part, the parts of
    the Gram the weighting reads (``(parts or None, their number of blocks)``), the probes
    of what the Grams do not cover (:meth:`~._gradients.TaskGradients.probes`)."""
    own, own_blocks = weighting
    transfer.add("values", values)
    for n, part in enumerate(parts):
        transfer.add(f"gram{n}", part.value)
    for n, part in enumerate(own or []):
        transfer.add(f"own{n}", part.value)
    for name, t in grads.probes():
        transfer.add(name, t)
    host = transfer.fetch()
    k = len(grads.tasks)
    gram = assemble(parts, [host[f"gram{n}"] for n in range(len(parts))], num_blocks, k)
    own_gram = (
        None if own is None else assemble(own, [host[f"own{n}"] for n in range(len(own))], own_blocks, k)
    )
    probes = {n: t for n, t in host.items() if not n.startswith(("gram", "own")) and n != "values"}
    return Fetched(host["values"], gram, own_gram, probes, grads, num_blocks)


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
