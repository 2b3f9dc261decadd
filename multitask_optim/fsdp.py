"""Sharded models (FSDP2, ``torch.distributed.fsdp.fully_shard``).

The optimizer holds the *sharded* parameters (``DTensor`` with ``Shard(dim)`` on a 1-D
mesh); the autograd graph of a forward pass holds FSDP's *unsharded* parameters (one
``nn.Parameter`` per sharded one, all-gathered for the forward). :class:`FSDPRows` is the
source of per-task rows for such a model, with the interface of
:class:`~multitask_optim._sources.ParameterRows`, so the step pipeline is unchanged:

0. **agree** (before any backward): ONE ``all_reduce`` of ``K`` presence flags. FSDP
   all-gathers a module's parameters for every backward pass through it, and the
   passes depend on the tasks (the frontier path runs one per head), so every rank
   must have the same tasks in a step; a task present on some ranks only is refused on
   every rank (a rank without samples of a task gives a zero loss through the task's
   head and ``samples=`` 0 for it). A task absent on *every* rank is fine: the step is
   the method on the present tasks, as without FSDP.
1. **gather** (no communication of ours): the partition is found from the graph as
   without FSDP, through the map *unsharded graph leaf -> sharded parameter* read from
   FSDP's own registry of module states (no ``model=`` argument). The gradient engine
   differentiates the losses w.r.t. the unsharded leaves -- the same exact paths
   (frontier, batched, looped) as without FSDP -- giving each task's gradient of the
   full parameter on this rank's batch, ``(K, *shape)``. FSDP's hooks still unshard the
   parameters for backward and reshard them afterwards; since ``autograd.grad`` fills
   no ``.grad``, FSDP reduces nothing itself.
2. **reduce**: ONE ``reduce_scatter`` of every stacked per-task gradient (shared rows
   and task-parameter gradients), cut along each parameter's shard dimension exactly
   as FSDP cuts it, laid out over all ``K`` tasks and every parameter of the partition
   on every rank (zeros for what a rank lacks). Task ``i``'s rows are weighted by the
   rank's ``samples=`` count (1 by default) and pre-divided by the world size, then
   rescaled by ``W / S_i`` (``S_i`` the total count), so every rank holds its shard of
   each task's gradient averaged over the ranks that had it -- what DDP's
   :func:`~multitask_optim._gradients.reduce_tasks` computes, and what K separate
   backwards through FSDP would deliver, in one collective instead of K. A tail rides
   in every rank's chunk (``K`` weighted loss values, ``K`` counts, a reached flag per
   parameter, a "non-finite on this rank" flag, a bound on the entries), so every rank
   gets the same values and presence and skips a step that any rank finds non-finite.
3. **gram**: each rank computes the partial Gram of its shards, ``G_r = J_r J_r^T``
   (float64), and ONE ``all_reduce`` of the ``(B, K, K)`` partials (plus one number, the
   sum of the ranks' largest row entries, for the overflow check below) gives
   ``G = sum_r G_r``, bitwise the same on every rank; every rank then computes the same
   coefficients.
4. **combine**: each rank forms its shard of the update ``J_b^T c_b`` from its own rows
   and writes it as a ``DTensor`` ``.grad`` with the parameter's placements.

Why this is exact: the rows of the Jacobian split into shards, so
``<g_i, g_j> = sum_r <g_i^(r), g_j^(r)>`` (the Gram), and ``J^T c`` restricted to a shard
is ``J_r^T c`` (the update). The per-task gradients are those of the global batch
because the reduce-scatter averages the ranks' full gradients, as FSDP's own
reduce-scatter does. Per-task preconditioning is element-wise, so its accumulators stay
sharded like the parameters.

**Row surgeries** (:class:`~multitask_optim.aggregators.RowAggregator`: GradDrop,
trimmed mean, ExcessMTL, DB-MTL, MoCo) replace steps 3-4's combination: each rank runs
the method on its ``(K, n_b)`` shard of every block's rows, with ``ctx.shards`` a
:class:`RowShards` saying where those elements sit in the whole rows. Element-wise work
(GradDrop's masks, the trimmed mean's sorts, EMAs, accumulators) runs on the shards
as it would on whole rows, and the methods' per-element state stays sharded; every
sum over a row's elements (norms, ``Y Y^T``, excess risks) is this rank's partial sum
passed through ``ctx.shards.sum`` (one float64 ``all_reduce``); GradDrop draws for the
whole block from the shared generator and keeps this rank's elements, so every rank's
generator stays in step and the draws are one process's. Each rank's update shard is
then checked finite by a vote of all ranks (one number), since an overflow may hit one
shard only.

Per step each rank sends, in bytes (W ranks, P shared and T task-only parameter
elements, N parameter tensors, K tasks, B blocks, float32 parameters):

- ``2 (W-1)/W * 8 K`` for the presence all-reduce;
- ``(W-1)/W * 4 (K*P + T + W*(2K + N + 2))`` in the reduce-scatter (plus the padding of
  uneven shards);
- ``2 (W-1)/W * 8 (B*K*K + 1)`` in the Gram all-reduce;
- row surgeries: ``2 (W-1)/W * 8 (S + 1)`` with ``S`` the entries they sum: 0 for
  GradDrop and the trimmed mean, ``B*K`` for ExcessMTL (partial excess risks) and DB-MTL
  (squared norms), ``B*K + B*K*K`` for MoCo (squared norms, shard Grams of ``y``);
- per-task preconditioning: ``2 (W-1)/W * 8`` (a vote on its accumulators);

against ``2 (W-1)/W * 4 K*P`` for the all-reduce of the replicated (DDP) path; FSDP's own
all-gathers of the parameters for forward and backward come on top, as for any FSDP
training.

Refused, with an error: per-task parameters and shared ones that are not sharded by FSDP
in one optimizer (shard the whole model), HSDP / 2-D meshes, a task present on some
ranks but not others in a step (step 0), representation mode, and
``gradient_mode="lean"`` (factored linear layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._combine import CombinePlan
from ._engine import GradientEngine
from ._fsdp_shards import RowShards
from ._fsdp_state import MultiTaskState, get_optimizer_state_dict, set_optimizer_state_dict
from ._gradients import Rows, TaskGradients, all_finite
from ._gram import GramPart, dense_grams
from ._graph import LossGraph
from ._sources import ParameterRows
from .aggregators.base import Shards
from .partition import Partition, describe

#: The user-facing names: checkpoint helpers and the sharding test. ``FSDPRows`` and
#: ``source_for`` are the optimizer's machinery (importable, not public API).
__all__ = [
    "MultiTaskState",
    "get_optimizer_state_dict",
    "set_optimizer_state_dict",
    "is_sharded",
]

try:  # torch.distributed is optional at build time
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - builds without distributed support
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_sharded(param: Tensor) -> bool:
    """Whether ``param`` is a ``DTensor`` (a parameter sharded by FSDP2).

    Args:
        param: a parameter of the optimizer.

    Returns:
        True for a ``DTensor``.
    """
    return DTensor is not None and isinstance(param, DTensor)


def as_param_grad(param: Tensor, grad: Tensor) -> Tensor:
    """``grad`` as ``param``'s gradient: a local shard becomes a ``DTensor`` with ``param``'s
    mesh, placements, global shape and stride (required for uneven shards); anything else
    is returned unchanged."""
    if not is_sharded(param) or is_sharded(grad):
        return grad
    local = param.to_local()  # type: ignore[attr-defined]
    grad = grad.to(device=local.device, dtype=local.dtype).contiguous()
    return DTensor.from_local(  # type: ignore[union-attr]
        grad, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(), run_check=False
    )


def local(t: Tensor) -> Tensor:
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def source_for(params: Sequence[Tensor], engine: GradientEngine) -> Optional[FSDPRows]:
    """The FSDP2 source when the optimizer's parameters are sharded (``DTensor``), else None.

    Raises:
        ValueError: a configuration the sharded path cannot run exactly (see the module
            docstring), naming the argument or the parameter.
    """
    if not any(is_sharded(p) for p in params):
        return None
    for n, p in enumerate(params):
        if not is_sharded(p):
            raise ValueError(
                f"optimizer: {describe(n, p)} is not sharded while others are (FSDP2 DTensors): apply "
                "fully_shard to the whole model (the root module too) before building the optimizer"
            )
    mesh = params[0].device_mesh  # type: ignore[attr-defined]
    for n, p in enumerate(params):
        placements = p.placements  # type: ignore[attr-defined]
        if p.device_mesh is not mesh and p.device_mesh != mesh:  # type: ignore[attr-defined]
            raise ValueError(f"optimizer: {describe(n, p)} lives on another device mesh than the others")
        if len(placements) != 1 or not isinstance(placements[0], Shard):
            raise ValueError(
                f"optimizer: {describe(n, p)} has placements {placements}; only FSDP2's Shard(dim) on a "
                "1-D mesh is supported (not HSDP or tensor parallelism)"
            )
    if engine.requested == "lean":
        raise ValueError(
            "gradient_mode='lean' keeps linear layers factored, which FSDP2 (sharded rows) cannot use; "
            "use 'auto', 'frontier', 'batched' or 'looped'"
        )
    engine.factored = False  # factored layers hold full-size inputs, not shards
    return FSDPRows(engine, mesh)


def unsharded_leaves(params: Sequence[Tensor]) -> Dict[int, Tensor]:
    """``id(sharded parameter) -> FSDP's unsharded parameter`` (the graph leaf) for ``params``.

    Read from FSDP2's registry of module states (private attributes of torch 2.4 to
    2.13: ``FSDPState._fsdp_param_groups[*].fsdp_params[*]._unsharded_param`` /
    ``.sharded_param``); a parameter whose group was never all-gathered has no entry.
    """
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    wanted = {id(p) for p in params}
    out: Dict[int, Tensor] = {}
    seen = set()
    for ref in list(_module_state_mapping.values()):
        state = ref() if callable(ref) else ref
        if not isinstance(state, FSDPState) or id(state) in seen:
            continue
        seen.add(id(state))
        for group in getattr(state, "_fsdp_param_groups", []):
            for fsdp_param in group.fsdp_params:
                sharded = fsdp_param.sharded_param
                leaf = getattr(fsdp_param, "_unsharded_param", None)
                if id(sharded) in wanted and leaf is not None:
                    out[id(sharded)] = leaf
    return out


@dataclass
class ShardedGradients(TaskGradients):
    """Per-task gradients as this rank's shards; :meth:`grams` sums the ranks' partial Grams.

    Attributes:
        source: the :class:`FSDPRows` that reduced them (its process group, and the
            overflow bound it keeps for the update).
    """

    source: Optional[FSDPRows] = field(default=None, repr=False)

    sharded: ClassVar[bool] = True

    def grams(self, blocks: Sequence[Sequence[int]], num_tasks: int) -> Tensor:
        """``G_b = sum_r J_b^(r) J_b^(r)T``: partial Grams, one all-reduce (float64)."""
        partial = dense_grams(self.shared, blocks, num_tasks)
        assert self.source is not None
        return self.source.sum_grams(partial, self.shared)

    def gram_parts(self, blocks: Sequence[Sequence[int]]) -> List[GramPart]:
        """The ranks' partial Grams summed (one all-reduce, read there): host values."""
        return [GramPart(b, g) for b, g in enumerate(self.grams(blocks, len(self.tasks)))]

    def agree(self, ok: bool) -> bool:
        """Whether every rank found ``ok`` (a local check of sharded values)."""
        assert self.source is not None
        return self.source.agree(ok)

    def block_rows(self, blocks: Sequence[Sequence[int]], like: Sequence[Tensor]) -> List[Tensor]:
        """Per block, this rank's ``(K, n_b)`` shard of the rows (its elements of each parameter)."""
        return super().block_rows(blocks, [local(p) for p in like])

    def split_updates(
        self, blocks: Sequence[Sequence[int]], updates: Sequence[Tensor], like: Sequence[Tensor]
    ) -> Rows:
        """Per-parameter local shards of the updates from per-block flat shards."""
        return super().split_updates(blocks, updates, [local(p) for p in like])

    def shards(self, blocks: Sequence[Sequence[int]], like: Sequence[Tensor]) -> Shards:
        """Where :meth:`block_rows`' shards sit in the whole rows (for row surgeries)."""
        assert self.source is not None
        return RowShards(self.source, blocks, like)


@dataclass
class _Piece:
    """Where one gradient goes in the reduce-scatter buffer."""

    lead: Tuple[int, ...]  # leading axes (K,) for Jacobian rows, () for a task gradient
    dim: int  # shard dimension of the parameter
    size: int  # full length along dim
    chunk: int  # ceil(size / world)
    local: int  # this rank's length along dim
    rest: Tuple[int, ...]  # the moved shape after dim
    numel: int  # elements per rank in the buffer
    dtype: torch.dtype


class FSDPRows(ParameterRows):
    """Per-task rows of a model sharded with FSDP2 (see the module docstring)."""

    mode = "parameters"

    def __init__(self, engine: GradientEngine, mesh: Any) -> None:
        super().__init__(engine)
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = int(dist.get_world_size(self.group))  # type: ignore[union-attr]
        self.rank = int(dist.get_rank(self.group))  # type: ignore[union-attr]
        self._leaves: Dict[int, Tensor] = {}
        self._bound = 0.0
        self.sent_bytes = 0  # bytes this rank sent in the optimizer's collectives, last step

    # ---------------------------------------------------------------- graph
    def map_graph(
        self, graph: LossGraph, params: Sequence[Tensor], representation: Optional[Tensor]
    ) -> LossGraph:
        """Give every sharded parameter the reachability of its unsharded graph leaf."""
        if representation is not None:
            raise ValueError(
                "representation= is not supported with a model sharded by FSDP2; use parameter mode"
            )
        self._leaves = unsharded_leaves(params)
        for p in params:
            leaf = self._leaves.get(id(p))
            if leaf is not None and id(leaf) in graph.param_mask:
                graph.param_mask[id(p)] = graph.param_mask[id(leaf)]
                graph.leaves[id(p)] = graph.leaves[id(leaf)]
        return graph

    # ---------------------------------------------------------------- stages
    def agree_on_tasks(self, names: Sequence[str], present: Sequence[int], first: bool) -> None:
        """Check, before any backward, that every rank has the same tasks (one all-reduce of ``K`` numbers).

        FSDP all-gathers a module's parameters for each backward pass through it, and the
        number of passes depends on the tasks (the frontier path runs one per head): ranks
        with different tasks would issue different collectives and hang. ``first``: the
        step's first (or only) micro-batch, where the count of bytes sent restarts.

        Raises:
            ValueError: on every rank, naming the tasks some ranks lack, and how to give them.
        """
        if first:
            self.sent_bytes = 0
        mine = torch.zeros(len(names), dtype=torch.float64)
        mine[list(present)] = 1.0
        counts = self.sum(mine)
        split = [n for n, c in zip(names, counts.tolist()) if 0 < c < self.world]
        if split:
            raise ValueError(
                f"task(s) {split} are absent on some ranks but present on others in this step; with a model "
                "sharded by FSDP2 every rank must have the same tasks (FSDP all-gathers parameters for each "
                "backward, and the backward passes depend on the tasks). On a rank without samples of a task, "
                "give a loss that goes through the task's head but is zero (e.g. 0 * output.sum()) and "
                "samples= 0 for it: the task's gradient is then averaged over the ranks with samples"
            )

    def gather(
        self,
        losses: Sequence[Tensor],
        graph: LossGraph,
        partition: Partition,
        once: bool = False,
        keep: bool = False,
    ) -> TaskGradients:
        """Each task's gradient of the full (unsharded) parameters on this rank's batch."""

        def leaf(p: Tensor) -> Tensor:
            return self._leaves.get(id(p), p)

        shared = [leaf(p) for p in partition.shared]
        tasks = [[leaf(p) for p in params] for params in partition.tasks]
        return self.engine.compute(losses, graph, shared, tasks, keep=keep).dense()

    def reduce_tasks(
        self,
        grads: TaskGradients,
        values: Tensor,
        present: Sequence[int],
        weights: Sequence[float],
        shared_like: Sequence[Tensor],
        task_like: Sequence[Sequence[Tensor]],
    ) -> Tuple[TaskGradients, Tensor, Tuple[int, ...]]:
        """ONE reduce-scatter: this rank's shard of each task's gradients averaged over the
        ranks that had the task, the averaged loss values, and the tasks some rank had.

        The sharded counterpart of :func:`~multitask_optim._gradients.reduce_tasks` (same
        arguments and result, the DDP path's): every rank lays its tasks out over all
        ``K`` tasks and every parameter of the whole partition (zeros for a task it
        lacks or a parameter its losses did not reach), so the buffer has one layout on
        every rank. Task ``i``'s rows are multiplied by this rank's weight ``s_ir`` (1, or
        its sample count; 0 when absent) and divided by the world size ``W`` before the
        sum, then multiplied by ``W / S_i`` (``S_i = sum_r s_ir``) after it: with every
        task on every rank and unit weights the pre-divided sum is the plain average
        and nothing is multiplied. A tail rides in every rank's chunk: ``s_ir L_ir``,
        ``s_ir``, a flag per parameter (reached by this rank's losses), a non-finite flag
        and a bound on the summed entries, so every rank learns the same values,
        presence and skip decision. When that bound cannot rule out an overflow of the
        averaged shards (huge gradients or sample counts) the ranks vote on their
        shards' finiteness (one small all-reduce), so they still skip together.
        """
        k = len(task_like)
        full = grads.dense().reindex(present, range(k), [len(t) for t in task_like])
        mine = torch.zeros(k, dtype=torch.float64)  # s_ir
        mine[list(present)] = torch.tensor(list(weights), dtype=torch.float64)
        spread = torch.zeros(k, dtype=torch.float64)
        spread[list(present)] = values.to(torch.float64)
        peak = _peak(full.tensors())  # NaN when an entry is not finite
        local_bad = not (bool(torch.isfinite(values).all()) and math.isfinite(peak))
        items = _weighted_items(full, shared_like, task_like, mine, bool((mine[list(present)] == 1.0).all()))
        bound = float(mine.amax()) * peak / self.world if math.isfinite(peak) else 0.0
        flags = [0.0 if g is None else 1.0 for _, g, _ in items]
        tail = torch.cat(
            [spread * mine, mine, torch.tensor([*flags, float(local_bad), bound], dtype=torch.float64)]
        )
        got, head, dtype = self._scatter(items, tail)
        totals = head[k : 2 * k]
        reached = (head[2 * k : 2 * k + len(items)] > 0).tolist()
        bad, bound = float(head[-2]) > 0, float(head[-1])
        union = tuple(i for i in range(k) if totals[i] > 0)
        new_values = (head[:k] / torch.where(totals > 0, totals, 1.0))[list(union)]
        after = torch.where(totals > 0, self.world / torch.where(totals > 0, totals, 1.0), 1.0)  # W / S_i
        scaled = bool((after != 1.0).any())  # not when every rank had every task with unit weight
        index = torch.tensor(union, dtype=torch.long)
        shared: Rows = []
        for rows, hit in zip(got[: len(shared_like)], reached):
            if not hit:  # no rank's losses reached it
                shared.append(None)
                continue
            rows = _times(rows, after) if scaled else rows
            shared.append(rows if len(union) == k else rows.index_select(0, index.to(rows.device)))
        rest = iter(zip(got[len(shared_like) :], reached[len(shared_like) :]))
        tasks: List[List[Optional[Tensor]]] = []
        for i, params in enumerate(task_like):
            own = [g if hit else None for g, hit in (next(rest) for _ in params)]
            if i in union:
                factor = float(after[i])
                tasks.append([g if g is None or factor == 1.0 else g * factor for g in own])
        if not bad and not bound * float(after.amax()) < 0.25 * torch.finfo(dtype).max:
            shards = [t for t in shared if t is not None] + [g for own in tasks for g in own if g is not None]
            bad = not self.agree(all_finite(shards))
        if bad:  # a rank saw a non-finite loss or gradient (or an average overflowed): all skip
            new_values = torch.full_like(new_values, float("nan"))
        # a bound on the averaged entries (the same on every rank): a step with no Gram (one
        # that surgery_every leaves out) still knows whether its update needs a vote
        self._bound = bound * float(after.amax()) if math.isfinite(bound) else math.inf
        return ShardedGradients(shared, tasks, [], source=self), new_values, union

    def _scatter(
        self, items: Sequence[Tuple[Tensor, Optional[Tensor], Tuple[int, ...]]], tail: Tensor
    ) -> Tuple[List[Tensor], Tensor, torch.dtype]:
        """The reduce-scatter itself: every item's gradient (``(*lead, *shape)`` of the full
        parameter, None for zeros) cut into the ranks' chunks and divided by ``W``, the
        ``tail`` appended to every chunk; returns this rank's summed shards (one per item,
        in the parameter's local layout), the summed tail (float64, CPU) and the buffer's dtype."""
        dtype = torch.float32
        for p, _, _ in items:
            dtype = torch.promote_types(dtype, p.dtype)
        device = self._device()
        pieces = [self._piece(p, lead, dtype) for p, _, lead in items]
        columns = [self._split(g, piece, device) for (_, g, _), piece in zip(items, pieces)]
        rows = torch.cat(columns, dim=1).div_(self.world) if columns else torch.zeros(self.world, 0)
        send = torch.cat([rows.to(device, dtype), tail.to(device, dtype).expand(self.world, -1)], dim=1)
        out = torch.empty(send.shape[1], dtype=dtype, device=device)  # rank r receives the sum of row r
        _reduce_scatter(out, send.reshape(-1), self.group)
        self.sent_bytes += send.numel() * send.element_size() * (self.world - 1) // self.world
        got, offset = [], 0
        for (p, _, _), piece in zip(items, pieces):
            got.append(self._join(out[offset : offset + piece.numel], piece, p))
            offset += piece.numel
        return got, out[offset:].to(torch.float64).cpu(), dtype

    def grams(self, grads: TaskGradients, blocks: Sequence[Sequence[int]], num_tasks: int) -> Tensor:
        return grads.grams(blocks, num_tasks)

    def planned_updates(
        self, grads: TaskGradients, blocks: Sequence[Sequence[int]], plan: CombinePlan, partition: Partition
    ) -> Tuple[Rows, bool]:
        """:meth:`updates` with the plan's coefficients (the ranks vote on finiteness there)."""
        return self.updates(grads, blocks, plan.coefficients, partition)

    def updates(
        self, grads: TaskGradients, blocks: Sequence[Sequence[int]], mix: Tensor, partition: Partition
    ) -> Tuple[Rows, bool]:
        """This rank's shards of ``J_b^T c_b``; whether they are finite on every rank.

        The update of each element is bounded by ``sum_i |c_i| * max |J|``; when that bound
        (the same on every rank) cannot overflow, no rank's update is non-finite and no
        collective is needed; otherwise the ranks vote (one small all-reduce).
        """
        updates, finite = grads.combine(blocks, mix)
        dtypes = [u.dtype for u in updates if u is not None]
        if not dtypes:
            return updates, finite
        limit = min(torch.finfo(d).max for d in dtypes)
        bound = float(mix.abs().sum(dim=1).max()) * self._bound
        if math.isfinite(bound) and bound < 0.25 * limit:
            return updates, finite
        return updates, self.agree(finite)

    def stats(self, grads: TaskGradients) -> Dict[str, Any]:
        return {
            "factored_params": 0,
            "jacobian_params": sum(1 for j in grads.shared if j is not None),
            "sent_bytes": self.sent_bytes,
        }

    # ---------------------------------------------------------------- collectives
    def sum_grams(self, partial: Tensor, rows: Sequence[Optional[Tensor]]) -> Tensor:
        """All-reduce the ``(B, K, K)`` partial Grams with the ranks' largest row entries."""
        peak = 0.0
        present = [r for r in rows if r is not None and r.numel()]
        if present:
            peak = float(torch.stack([r.detach().abs().amax().double() for r in present]).amax())
        buf = torch.cat([partial.reshape(-1), torch.tensor([peak], dtype=torch.float64)])
        buf = buf.to(self._device())
        dist.all_reduce(buf, group=self.group)  # type: ignore[union-attr]
        self.sent_bytes += 2 * buf.numel() * buf.element_size() * (self.world - 1) // self.world
        buf = buf.cpu()
        self._bound = max(self._bound, float(buf[-1]))
        return buf[:-1].view_as(partial)

    def sum(self, partial: Tensor) -> Tensor:
        """The sum over the ranks of ``partial`` (one all-reduce, float64 on the CPU)."""
        buf = partial.detach().to(device=self._device(), dtype=torch.float64).contiguous()
        dist.all_reduce(buf, group=self.group)  # type: ignore[union-attr]
        self.sent_bytes += 2 * buf.numel() * buf.element_size() * (self.world - 1) // self.world
        return buf.cpu()

    def agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (one all-reduce of one number)."""
        flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=self._device())
        dist.all_reduce(flag, group=self.group)  # type: ignore[union-attr]
        self.sent_bytes += 2 * flag.element_size() * (self.world - 1) // self.world
        return float(flag) == 0.0

    def _device(self) -> torch.device:
        """Where this group's collectives run (CUDA for NCCL, else the CPU)."""
        if dist.get_backend(self.group) == "nccl":  # type: ignore[union-attr]
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---------------------------------------------------------------- layout
    def _piece(self, p: Tensor, lead: Tuple[int, ...], dtype: torch.dtype) -> _Piece:
        dim = p.placements[0].dim  # type: ignore[attr-defined]
        dim = dim if dim >= 0 else dim + p.dim()
        size = int(p.shape[dim])
        chunk = -(-size // self.world)
        mine = int(local(p).shape[dim])
        expected = max(0, min(chunk, size - self.rank * chunk))
        if mine != expected:
            raise RuntimeError(
                f"FSDP2 parameter of shape {tuple(p.shape)}: local shard has {mine} rows along dim {dim}, "
                f"expected {expected} (torch.chunk layout)"
            )
        rest = tuple(int(s) for i, s in enumerate(p.shape) if i != dim)
        numel = math.prod(lead) * chunk * math.prod(rest)
        return _Piece(lead, dim, size, chunk, mine, rest, numel, dtype)

    def positions(self, p: Tensor) -> Tensor:
        """``(n,)`` long: where each element of this rank's shard of ``p`` (flattened) sits in
        the whole flattened ``p``."""
        dim = p.placements[0].dim  # type: ignore[attr-defined]
        dim = dim if dim >= 0 else dim + p.dim()
        size = int(p.shape[dim])
        start = min(self.rank * -(-size // self.world), size)
        mine = int(local(p).shape[dim])
        return torch.arange(p.numel()).view(tuple(p.shape)).narrow(dim, start, mine).reshape(-1)

    def _split(self, g: Optional[Tensor], piece: _Piece, device: torch.device) -> Tensor:
        """``(W, numel)``: the full gradient cut into the ranks' chunks (zero padded; zeros for None)."""
        if g is None:
            return torch.zeros(self.world, piece.numel, dtype=piece.dtype, device=device)
        n = len(piece.lead)
        moved = g.detach().to(device=device, dtype=piece.dtype).movedim(n + piece.dim, n)
        pad = piece.chunk * self.world - piece.size
        if pad:
            zeros = torch.zeros((*piece.lead, pad, *piece.rest), dtype=piece.dtype, device=device)
            moved = torch.cat([moved, zeros], dim=n)
        moved = moved.reshape(*piece.lead, self.world, piece.chunk, *piece.rest).movedim(n, 0)
        return moved.reshape(self.world, -1)

    def _join(self, flat: Tensor, piece: _Piece, p: Tensor) -> Tensor:
        """This rank's shard, in the parameter's local layout and dtype."""
        n = len(piece.lead)
        block = flat.view(*piece.lead, piece.chunk, *piece.rest).narrow(n, 0, piece.local)
        block = block.movedim(n, n + piece.dim)
        return block.to(local(p).dtype).contiguous()


def _peak(tensors: Sequence[Tensor]) -> float:
    """The largest magnitude of an entry of ``tensors`` (0 for none, NaN when one is not
    finite): one min/max pass per tensor, one host sync per device."""
    extremes: Dict[torch.device, List[Tensor]] = {}
    for t in tensors:
        if t.numel():
            low, high = torch.aminmax(t.detach())
            extremes.setdefault(t.device, []).extend((low.double(), high.double()))
    peak = 0.0
    for values in extremes.values():
        top = torch.stack(values).abs()
        if not bool(torch.isfinite(top).all()):
            return math.nan
        peak = max(peak, float(top.amax()))
    return peak


def _weighted_items(
    full: TaskGradients,
    shared_like: Sequence[Tensor],
    task_like: Sequence[Sequence[Tensor]],
    mine: Tensor,
    unit: bool,
) -> List[Tuple[Tensor, Optional[Tensor], Tuple[int, ...]]]:
    """``(parameter, gradient times this rank's task weight, leading axes)`` for every shared
    row and task gradient. Sample weights multiply in float32 at least: ``s_ir * g`` in
    float16 could overflow on one rank only, after its non-finite flag was taken."""
    k = mine.shape[0]
    items: List[Tuple[Tensor, Optional[Tensor], Tuple[int, ...]]] = [
        (p, rows if rows is None or unit else _times(_wide(rows), mine), (k,))
        for p, rows in zip(shared_like, full.shared)
    ]
    for i, (params, task) in enumerate(zip(task_like, full.tasks)):
        items += [
            (p, g if g is None or unit else _wide(g) * float(mine[i]), ()) for p, g in zip(params, task)
        ]
    return items


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 at least (half-precision products can overflow)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _times(rows: Tensor, factors: Tensor) -> Tensor:
    """``rows`` (``(K, ...)``) with row ``i`` multiplied by ``factors[i]`` (float64 ``(K,)``)."""
    scale = factors.to(device=rows.device, dtype=rows.dtype)
    return rows * scale.view(-1, *([1] * (rows.dim() - 1)))


def _reduce_scatter(out: Tensor, send: Tensor, group: Any) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # type: ignore[union-attr]
    fn(out, send, group=group)
