"""Gradient Sign Dropout (Chen et al., NeurIPS 2020).

Reference: Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov,
"Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
NeurIPS 2020 (Algorithm 1).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .base import AGGREGATORS, AggregationContext, RowAggregator, State

Leak = Union[float, Sequence[float]]


@AGGREGATORS.register
class GradDrop(RowAggregator):
    """GradDrop: keep, coordinate by coordinate, only the gradients of one sign.

    For every coordinate ``p`` of a block, the gradient positive sign purity is
    ``P[p] = 1/2 (1 + sum_i g_i[p] / sum_i |g_i[p]|)`` (``1/2`` where every ``g_i[p]`` is
    0). With ``U[p] ~ Uniform(0, 1)`` drawn from the optimizer's generator, the positive
    entries are kept where ``P > U`` and the negative ones where ``P < U``::

        M_i[p] = 1[P[p] > U[p]] 1[g_i[p] > 0] + 1[P[p] < U[p]] 1[g_i[p] < 0]
        d[p]   = sum_i (l_i + (1 - l_i) M_i[p]) g_i[p]

    so with no leak (``l = 0``) each coordinate of ``d`` is the sum of the positive
    entries with probability ``P`` and the sum of the negative entries otherwise. This is
    lines 10-15 of the paper's Algorithm 1 (``f`` the identity) applied to the Jacobian's
    rows, as TorchJD 0.18's ``GradDrop`` does: the paper's activation-level form
    multiplies by the sign of the layer input and sums over the batch first, which has
    no counterpart for parameter rows. Our update equals TorchJD's for the same draws
    (``U`` in the rows' dtype, one draw per block in block order).

    Not linear in the Jacobian: it needs its rows and runs in parameter mode only
    (representation mode refuses it with a clear error); no coefficients are reported.
    Purity and masks are element-wise, so on a model sharded with FSDP2 each rank works
    on its shard of the rows; ``U`` is still drawn for the whole block (every rank's
    generator stays in step) and each rank keeps its elements' draws, so the update
    equals one process's.

    Paper:
        Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov, "Just
        Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS
        2020 (Algorithm 1, lines 10-15).

    Departures:
        Applied to the Jacobian's rows, as TorchJD 0.18 does; the paper's activation-level
        form has no counterpart for parameter rows. Our update equals TorchJD's ``GradDrop``
        for the same draws, to 1e-5 relative (float32 and float64, with and without per-task
        leaks), and LibMTL 1.1.5's (which runs on a representation) on one all-positive
        sample (``tests/test_anchor_rows.py``).

    Cost:
        Reads the Jacobian's rows: the K x P per-task gradients of every block are built (no
        factored fast path) and one uniform draw per element. Measured: 12-14 ms at K = 4,
        33-52 ms at K = 16 per call on K x 100,000 rows (median of 30 ``aggregate_rows``
        calls, one thread), against well under a millisecond for the Gram methods.

    When to use:
        Sign conflicts between tasks, coordinate by coordinate. Among the best means on
        MultiDigits (0.65, with a large seed spread) and no help for a magnitude imbalance
        (scale ~409).

    Args:
        leak: ``l_i`` in ``[0, 1]``, how much of task ``i``'s gradient passes unmasked:
            one value for every task, or one per task (TorchJD's ``leak``; default 0). A
            step lacking some tasks uses the present tasks' leaks.

    Raises:
        ValueError: naming ``leak`` when a value is outside ``[0, 1]``, or at a call when
            the number of per-task values is not the number of tasks.
    """

    name = "graddrop"

    #: A step lacking some tasks uses the present tasks' leaks.
    per_task = {"leak": "slice"}

    def __init__(self, leak: Leak = 0.0) -> None:
        values = (leak,) if isinstance(leak, (int, float)) else leak
        try:
            checked = tuple(float(v) for v in values)  # type: ignore[union-attr]
        except (TypeError, ValueError) as err:
            raise ValueError(f"leak must be a number or a sequence of numbers, got {leak!r}") from err
        if (
            not checked
            or isinstance(leak, bool)
            or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in checked)
        ):
            raise ValueError(f"leak must be in [0, 1] (one value or one per task), got {leak!r}")
        self.leak: Union[float, Tuple[float, ...]] = checked[0] if isinstance(leak, (int, float)) else checked

    def _leaks(self, num_tasks: int) -> Tensor:
        if isinstance(self.leak, float):
            return torch.full((num_tasks,), self.leak, dtype=torch.float64)
        if len(self.leak) != num_tasks:
            raise ValueError(f"leak has {len(self.leak)} values but there are {num_tasks} tasks")
        return torch.tensor(self.leak, dtype=torch.float64)

    def aggregate_rows(
        self, rows: List[Tensor], gram: Tensor, state: State, ctx: AggregationContext
    ) -> Tuple[List[Tensor], Optional[Tensor], State]:
        leaks = self._leaks(gram.shape[1])
        updates = []
        for b, r in enumerate(rows):
            size = ctx.shards.size(b, r)  # the whole row's length (this rank's r may be a shard)
            if size == 0:
                updates.append(r.new_zeros(r.shape[1]))
                continue
            mass = r.abs().sum(dim=0)
            purity = torch.where(mass > 0, 0.5 * (1.0 + r.sum(dim=0) / mass.where(mass > 0, 1.0)), 0.5)
            dtype = r.dtype if r.dtype in (torch.float32, torch.float64) else torch.float32
            whole = torch.rand(size, generator=ctx.generator, dtype=dtype)
            draw = ctx.shards.take(b, r, whole).to(r.device)
            keep = ((purity > draw) & (r > 0)) | ((purity < draw) & (r < 0))
            leak = leaks.to(device=r.device, dtype=r.dtype).unsqueeze(1)
            updates.append(torch.where(keep, r, leak * r).sum(dim=0))
        return updates, None, state

    def settings(self) -> Dict[str, Any]:
        return {"leak": self.leak}
