"""Coordinate-wise trimmed mean (Yin et al., ICML 2018).

Reference: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML 2018 (the trimmed-mean rule).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

from ._rows import check_count
from .base import AGGREGATORS, AggregationContext, RowAggregator, State


@AGGREGATORS.register
class TrimmedMean(RowAggregator):
    """Coordinate-wise trimmed mean of the task gradients.

    For every coordinate ``p``, sort ``g_1[p], ..., g_K[p]``, drop the ``t`` largest and
    the ``t`` smallest (``t = trim_number``) and average the remaining ``K - 2t``::

        d[p] = 1 / (K - 2t) * sum_{r = t+1}^{K-t} g_(r)[p]

    (``g_(r)[p]`` the ``r``-th smallest). The update has the scale of a mean, as in the
    paper and TorchJD 0.18's ``TrimmedMean`` (whose argument name this is), which it
    equals. It is robust to up to ``t`` outlying tasks per coordinate; ``t = 0`` is the
    plain mean. Sorting is per coordinate, so it needs the Jacobian's rows and runs in
    parameter mode only (representation mode refuses it); no coefficients are reported.
    Nothing crosses coordinates, so on a model sharded with FSDP2 each rank trims its
    own shard of the rows, which is exact.

    Paper:
        D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed
        Learning: Towards Optimal Statistical Rates", ICML 2018 (the coordinate-wise trimmed
        mean).

    Departures:
        The paper's rule on the task gradients, at the scale of a mean; equals TorchJD
        0.18's ``TrimmedMean`` to 1e-5 relative (``tests/test_anchor_rows.py``).

    Cost:
        Reads the Jacobian's rows: the K x P per-task gradients of every block are built (no
        factored fast path) and sorted per coordinate. Measured: 15-21 ms at K = 4, 78-114
        ms at K = 16 per call on K x 100,000 rows (median of 30 ``aggregate_rows`` calls,
        one thread), against well under a millisecond for the Gram methods.

    When to use:
        Many tasks with a few outliers per coordinate; needs ``K >= 2 trim_number + 1``. Not
        in the two-task quality runs.

    Args:
        trim_number: ``t``, values dropped at each end of every coordinate (default 1).

    Raises:
        ValueError: naming ``trim_number`` if it is not a non-negative integer, or at a
            call when there are fewer than ``2 * trim_number + 1`` tasks.
    """

    name = "trimmed_mean"

    def __init__(self, trim_number: int = 1) -> None:
        self.trim_number = check_count("trim_number", trim_number)

    def min_tasks(self) -> int:
        return 2 * self.trim_number + 1

    def aggregate_rows(
        self, rows: List[Tensor], gram: Tensor, state: State, ctx: AggregationContext
    ) -> Tuple[List[Tensor], Optional[Tensor], State]:
        """The coordinate-wise trimmed mean of every block's rows.

        Raises:
            ValueError: fewer than ``2 * trim_number + 1`` tasks.
        """
        k, t = gram.shape[1], self.trim_number
        if k < 2 * t + 1:
            raise ValueError(f"trimmed_mean with trim_number={t} needs at least {2 * t + 1} tasks, got {k}")
        updates = []
        for r in rows:
            kept = r.sort(dim=0).values[t : k - t] if t else r
            updates.append(kept.mean(dim=0))
        return updates, None, state

    def settings(self) -> Dict[str, Any]:
        return {"trim_number": self.trim_number}
