"""Aggregator contract: per-block Gram matrices in, task coefficients out.

An aggregator never sees the K x P Jacobian. It receives the Gram matrices
``G[b] = J_b J_b^T`` of every block ``b`` (shape ``(B, K, K)``, float64, on the CPU;
their entries are as accurate as the rows' precision allows, ``ctx.rounding``)
and returns coefficients ``c[b]`` so that the shared update of block ``b`` is
``d_b = J_b^T c[b]``. Methods whose state must survive a checkpoint keep it in a
plain ``dict[str, Tensor]`` that the optimizer stores and restores; the aggregator
returns the *new* state instead of mutating the old one, so that a skipped step can
drop it and leave no trace.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .._components import Component, Registry, State

try:  # optional: the package needs only torch; NumPy makes the pairwise surgeries faster
    import numpy as np
except ImportError:  # pragma: no cover - NumPy ships with nearly every torch install
    np = None  # type: ignore[assignment]

#: Up to this many (block, task) rows the pairwise surgeries run in plain Python floats
#: (``O(B K^3)`` float operations, no per-call dispatch); above it, vectorised over blocks
#: and tasks in NumPy, or torch without NumPy (``K - 1`` lock-step rounds of a few array calls each). Measured
#: (one thread, B = 1, all pairs conflicting): the two cross near ``K = 16-20``; at
#: ``K = 40`` the scalar loop takes 1.3 ms (PCGrad) / 2.3 ms (GradVac), the NumPy rounds
#: 0.4 ms / 1.2 ms (``python -m benchmarks.aggregation_time --k 40``).
SCALAR_LIMIT = 20

#: The contract's public names; the other helpers here serve the method modules.
__all__ = ["AGGREGATORS", "AggregationContext", "Aggregator", "RowAggregator", "Shards", "random_orders"]


class Shards:
    """Where the rows a :class:`RowAggregator` receives sit in the whole Jacobian rows.

    In one process, and under DDP, every rank holds whole rows: this base class is the
    identity. Under FSDP2 each rank holds a *shard* of every row -- its own elements of
    each parameter, concatenated in block order -- and :mod:`multitask_optim.fsdp` hands
    the method a subclass. Two rules then keep a row method exact on shards:

    - a reduction over the elements of a row (a norm, an inner product, a sum) is
      computed on the local elements and passed through :meth:`sum`, which adds the
      ranks' partial results (every rank gets the same total);
    - a random draw per element is made for the *whole* row (:meth:`size` elements, from
      the shared generator, so every rank's generator stays in step) and this rank's
      elements are kept with :meth:`take`, so the draws equal one process's.

    Element-wise work (masks, sorts across tasks, EMAs) needs neither: it runs on the
    local elements as it would on whole rows. Every method's use of these is in its own
    file.
    """

    #: Whether the rows are shards (False: whole rows, every method below is the identity).
    sharded: ClassVar[bool] = False

    def sum(self, partial: Tensor) -> Tensor:
        """The sum over the ranks of every rank's ``partial`` (same shape on every rank).

        Args:
            partial: this rank's partial sum (e.g. of a row's squared elements).

        Returns:
            The total over the ranks (``partial`` itself without sharding).
        """
        return partial

    def size(self, block: int, rows: Tensor) -> int:
        """The length ``P_b`` of block ``block``'s whole rows.

        Args:
            block: the block's index.
            rows: this rank's ``(K, n)`` rows of the block.

        Returns:
            ``P_b`` (``n`` without sharding).
        """
        return int(rows.shape[-1])

    def positions(self, block: int, rows: Tensor) -> Tensor:
        """Where this rank's elements sit in the whole rows of a block.

        Args:
            block: the block's index.
            rows: this rank's ``(K, n)`` rows of the block.

        Returns:
            ``(n,)`` long: the index in the whole row of each of this rank's elements.
        """
        return torch.arange(rows.shape[-1], device=rows.device)

    def take(self, block: int, rows: Tensor, whole: Tensor) -> Tensor:
        """This rank's elements of ``whole``, a tensor over the whole row.

        Args:
            block: the block's index.
            rows: this rank's ``(K, n)`` rows of the block.
            whole: a tensor whose last axis has the whole row's length ``P_b``.

        Returns:
            ``whole`` restricted to this rank's elements (``whole`` itself without sharding).
        """
        return whole


@dataclass
class AggregationContext:
    """What an aggregator may read besides the Gram matrices.

    Attributes:
        generator: the optimizer's own seeded CPU generator (checkpointed with it).
        losses: current (weighted) task losses, float64 CPU tensor of shape ``(K,)``.
        step: index of the optimizer step being computed (0 for the first).
        shards: where a row method's rows sit in the whole rows (:class:`Shards`; the
            identity unless the model is sharded with FSDP2).
        rounding: the precision of the rows, relative to ``||g_i|| ||g_j||``, one float
            or a ``(B,)`` tensor (per block): the unit roundoff of the rows' dtype
            (float32's ``1.2e-7`` for float32, float16 or bfloat16 rows; float64's
            ``2.2e-16``, the default, for float64 rows). The Gram's entries are that
            accurate (small blocks are even formed in float64), and a solver treats
            what lies below that level as zero (:func:`~._common.clean_gram`):
            rank-deficient or rounding-noisy Grams (fewer elements than tasks,
            duplicated or nearly dependent rows) then give bounded, correct
            coefficients.
    """

    generator: torch.Generator
    losses: Tensor
    step: int = 0
    shards: Shards = field(default_factory=Shards)
    rounding: Union[float, Tensor] = field(default=torch.finfo(torch.float64).eps)


class Aggregator(Component):
    """Maps per-block Gram matrices to coefficients over the task gradients.

    Subclasses set ``name`` (the registry key), validate their hyper-parameters in
    ``__init__``, report them in :meth:`settings`, and implement :meth:`aggregate`.
    Registering (``@AGGREGATORS.register``) makes the method available as
    ``surgery="name"`` and runs the aggregator contract tests on it.

    :meth:`aggregate` runs on the host: the Grams it gets are float64 CPU tensors (the
    step's one device-to-host copy, see ``_host``), its state is float64 CPU tensors,
    and the coefficients it returns go back to the device without blocking. It may loop
    and branch on values freely: nothing it reads waits for an accelerator.
    """

    #: True for methods that are not linear in the Jacobian and need its rows.
    needs_jacobian: ClassVar[bool] = False
    #: Whether scaling the Jacobian by ``c > 0`` scales the update by ``c`` (the contract
    #: tests check it; a method that is not says so here and in its docstring).
    homogeneous: ClassVar[bool] = True
    #: Whether exact ties are broken by task index (then relabelling the tasks can change
    #: the result on tied inputs, e.g. Krum's selection).
    breaks_ties_by_index: ClassVar[bool] = False

    def min_tasks(self) -> int:
        """The fewest tasks the method is defined for (a step with fewer raises).

        Returns:
            The minimum number of tasks (1 unless the method says otherwise).
        """
        return 1

    def is_plain_sum(self) -> bool:
        """Whether the update is always ``sum_i g_i`` (the step then is one backward of the sum).

        Returns:
            True for the plain sum, False for every method that changes the update.
        """
        return False

    @abstractmethod
    def aggregate(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        """Map the Gram matrices of the blocks to coefficients.

        Args:
            gram: ``(B, K, K)`` float64 Gram matrices ``G_b = J_b J_b^T`` (on the CPU).
            state: the method's state (never mutated).
            ctx: the generator (every random draw comes from it), losses, step, shards.

        Returns:
            ``(coefficients, new_state)``: ``(B, K)`` float64 coefficients ``c_b`` (the update
            of block ``b`` is ``J_b^T c_b``) and the new state.
        """

    def __call__(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        if gram.dim() == 2:
            coefs, new_state = self.aggregate(gram.unsqueeze(0), state, ctx)
            return coefs[0], new_state
        return self.aggregate(gram, state, ctx)


class RowAggregator(Aggregator):
    """A method that is not linear in the Jacobian and reads its rows (GradDrop, ...).

    Subclasses implement :meth:`aggregate_rows` instead of :meth:`aggregate`. They run in
    parameter mode only (representation mode refuses them with a clear error) and
    never take the factored fast path. The rows they see carry the task weights (and
    the per-task preconditioning when it is on). On a model sharded with FSDP2 the rows
    are this rank's shards of the whole rows: a method reads ``ctx.shards``
    (:class:`Shards`) for every sum over a row's elements and every per-element draw.

    Unlike :meth:`Aggregator.aggregate`, :meth:`aggregate_rows` runs on the rows'
    device (the Grams too are on it): a value it reads on the host (``.item()``,
    ``if t:``) waits for the device, so the built-in row methods keep their decisions
    on the device (``torch.where``) and their state on the rows' device.
    """

    needs_jacobian: ClassVar[bool] = True

    def aggregate(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        """Refuse the Gram-only path: a row method needs the rows (:meth:`aggregate_rows`).

        Raises:
            TypeError: always, naming the method.
        """
        raise TypeError(f"surgery {self.name!r} needs the Jacobian's rows, not only their Gram")

    @abstractmethod
    def aggregate_rows(
        self, rows: List[Tensor], gram: Tensor, state: State, ctx: AggregationContext
    ) -> Tuple[List[Tensor], Optional[Tensor], State]:
        """Combine the rows of every block.

        Args:
            rows: per block ``b``, the ``(K, P_b)`` Jacobian (its parameters flattened and
                concatenated in block order), in the parameters' dtype; under FSDP2 this
                rank's ``(K, n_b)`` shard of it (see ``ctx.shards``).
            gram: ``(B, K, K)`` float64 Gram matrices of the same rows, on their device.
            state: the method's state (never mutated).
            ctx: generator (every random draw comes from it), losses, step, shards.

        Returns:
            ``(updates, coefficients, new_state)``: per block the update, shaped like one
            row (``(P_b,)``, or this rank's ``(n_b,)`` shard); the ``(B, K)``
            coefficients to report in ``last_stats`` when the update is a combination
            ``J_b^T c_b`` (else None); the new state.
        """


AGGREGATORS: Registry[Aggregator] = Registry("surgery", Aggregator)
"""Aggregators by name (``surgery=``); ``None`` builds :class:`~.sum.Sum` (set in ``sum.py``).

Register a new one with ``@AGGREGATORS.register`` (or :func:`register_aggregator`).
"""


def random_orders(num_blocks: int, num_tasks: int, generator: torch.Generator) -> Tensor:
    """Draw, for every block and task ``i``, a random order of the other tasks.

    Args:
        num_blocks: ``B``.
        num_tasks: ``K``.
        generator: the generator to draw from (one call).

    Returns:
        A ``(B, K, K-1)`` long tensor whose row ``[b, i]`` is a uniformly random
        permutation of ``{0..K-1} \\ {i}``.
    """
    if num_tasks < 2:
        return torch.zeros(num_blocks, num_tasks, 0, dtype=torch.long)
    keys = torch.rand(num_blocks, num_tasks, num_tasks - 1, generator=generator)
    idx = keys.argsort(dim=-1)
    own = torch.arange(num_tasks).view(1, num_tasks, 1)
    return idx + (idx >= own).long()


def scatter_sum(values: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """``out[b, j] = sum over (i, t) with orders[b, i, t] == j of values[b, i, t]`` (float64 ``(B, K)``)."""
    assert np is not None
    b, k = orders.shape[0], orders.shape[1]
    flat = (orders + (np.arange(b) * k)[:, None, None]).ravel()
    return np.bincount(flat, weights=values.ravel(), minlength=b * k).reshape(b, k)


def check_reduction(reduction: str) -> str:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return reduction


def project_rounds_setup(gram: Tensor, orders: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shared bookkeeping of the pairwise surgeries.

    Returns ``(diag, partner_rows, partner_sq)`` where ``partner_rows[b, i, t]`` is row
    ``orders[b, i, t]`` of ``gram[b]`` (shape ``(B, K, K-1, K)``) and ``partner_sq`` the
    matching squared norms ``(B, K, K-1)``.
    """
    b, k, _ = gram.shape
    diag = gram.diagonal(dim1=-2, dim2=-1)
    partner_sq = diag.gather(1, orders.reshape(b, -1)).reshape(orders.shape)
    idx = orders.reshape(b, -1, 1).expand(b, orders.shape[1] * orders.shape[2], k)
    partner_rows = gram.gather(1, idx).reshape(b, k, orders.shape[2], k)
    return diag, partner_rows, partner_sq
