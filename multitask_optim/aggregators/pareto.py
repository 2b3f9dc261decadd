"""PE-LTR's Pareto step: min-norm weights with per-task lower bounds (Lin et al., 2019).

Reference: X. Lin, H. Chen, C. Pei, F. Sun, X. Xiao, H. Sun, Y. Zhang, W. Ou, P. Jiang,
"A Pareto-Efficient Algorithm for Multiple Objective Optimization in E-Commerce
Recommendation", RecSys 2019.

Per block, the task weights solve::

    w = argmin || sum_i w_i g_i ||^2 = argmin w^T G w
        subject to  sum_i w_i = 1,  w_i >= c_i,

with user-chosen lower bounds ``c_i`` (``0 <= c_i < 1``, ``sum_i c_i <= 1``). They
keep every task in the update with at least weight ``c_i`` while finding the most
balanced (Pareto-stationary) combination allowed by the bounds.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._qp import check_lower, min_norm_weights
from .base import AGGREGATORS, AggregationContext, Aggregator, State

LowerBounds = Union[float, Sequence[float], Tensor]


@AGGREGATORS.register
class ParetoWeights(Aggregator):
    """PE-LTR's Pareto-efficient weights (Lin et al., 2019) on the bounded simplex.

    Coefficients ``w = argmin_w w^T G w`` subject to ``sum_i w_i = 1`` and
    ``w_i >= c_i`` per block; the update is ``d = J^T w = sum_i w_i g_i``.

    Relation to the paper: its solver (PECsolver) substitutes ``w = c + w_hat``, first
    *relaxes* the problem by dropping ``w_hat >= 0`` and solves the remaining
    equality-constrained quadratic in closed form from its KKT linear system, then
    maps the relaxed solution back to feasible weights with a non-negative
    least-squares projection. That two-step procedure returns a feasible point, but the
    projection measures distance between weight vectors, not the objective ``w^T G w``,
    so in general it is not the constrained minimiser. Here the constrained problem
    itself is solved exactly (:mod:`._qp`, an active-set method): whenever the relaxed
    solution already satisfies the bounds both agree, and otherwise this one has an
    objective no larger. With all ``c_i = 0`` it is exactly MGDA without normalisation.

    Paper:
        X. Lin, H. Chen, C. Pei, F. Sun, X. Xiao, H. Sun, Y. Zhang, W. Ou, P. Jiang, "A
        Pareto-Efficient Algorithm for Multiple Objective Optimization in E-Commerce
        Recommendation", RecSys 2019 (PE-LTR, Algorithm 2).

    Departures:
        The constrained problem is solved exactly, where the paper's PECsolver relaxes the
        bounds and projects back (a feasible point that is not the constrained minimiser in
        general); both agree when the relaxed solution meets the bounds. No other library's
        implementation is compared; ``tests/test_mgda_pareto.py`` checks the KKT conditions.

    Cost:
        One Gram matrix per block, shared by every Gram method (factored for ``Linear``
        layers, so no K x P buffer there), then one small quadratic programme with bounds on
        the host in float64. Measured: 0.1 ms at K = 4, 0.4 ms at K = 16 per call (median of
        30 aggregation calls, one thread; a one-off script timing ``aggregate`` on a Gram
        matrix of 100,000-element rows).

    When to use:
        As MGDA, when every task must keep at least a share ``c_i`` of the update (a
        recommender's business objectives). With ``c = 0`` it is MGDA. The quality runs
        (bounds 0.2 / K) land with MGDA: no gain on the scale suite.

    Args:
        lower_bounds: ``c``; one float for every task or one per task. Each must be in
            ``[0, 1)`` and they must sum to at most 1 (a single float ``c`` needs
            ``K c <= 1``, checked when ``K`` is known, at the first call). A step lacking
            some tasks keeps the present tasks' bounds as they are.

    Raises:
        ValueError: naming ``lower_bounds`` if a bound is outside ``[0, 1)``, the
            bounds sum to more than 1, or (at a call) their number is not ``K``.
    """

    name = "pareto"

    #: A step lacking some tasks keeps the present tasks' bounds as they are (they still
    #: sum to at most 1; a single float applies to every task).
    per_task = {"lower_bounds": "slice"}

    def __init__(self, lower_bounds: LowerBounds = 0.0) -> None:
        if isinstance(lower_bounds, Tensor):
            lower_bounds = lower_bounds.detach().to("cpu", torch.float64)
            lower_bounds = float(lower_bounds) if lower_bounds.dim() == 0 else lower_bounds.tolist()
        if isinstance(lower_bounds, (int, float)) and not isinstance(lower_bounds, bool):
            values: Tuple[float, ...] = (float(lower_bounds),)
            self.lower_bounds: Union[float, Tuple[float, ...]] = float(lower_bounds)
        else:
            try:
                values = tuple(float(x) for x in lower_bounds)  # type: ignore[union-attr]
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"lower_bounds must be a float or a sequence of floats, got {lower_bounds!r}"
                ) from err
            if not values:
                raise ValueError("lower_bounds must not be empty")
            self.lower_bounds = values
        for v in values:
            if not (math.isfinite(v) and 0.0 <= v < 1.0):
                raise ValueError(f"every lower_bounds entry must be in [0, 1), got {v!r}")
        if isinstance(self.lower_bounds, tuple):
            check_lower(values, len(values), name="lower_bounds")

    def bounds(self, num_tasks: int) -> list[float]:
        """The lower bounds for ``num_tasks`` tasks.

        Args:
            num_tasks: ``K``.

        Returns:
            ``K`` bounds.

        Raises:
            ValueError: the bounds do not fit ``K`` tasks (their number, or a sum above 1).
        """
        return check_lower(self.lower_bounds, num_tasks, name="lower_bounds")

    def aggregate(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        lower = self.bounds(gram.shape[-1])
        g = gram.detach().to(device="cpu", dtype=torch.float64)
        return min_norm_weights(g, lower), state

    def settings(self) -> Dict[str, Any]:
        return {"lower_bounds": self.lower_bounds}
