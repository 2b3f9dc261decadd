"""Surgery on a schedule (``surgery_every=``, ``surgery_start=``).

Gradient surgery costs K per-task backward passes (or one batched one) plus a Gram; a
training loop can afford it on some steps only. With ``surgery_every = k`` and
``surgery_start = n``, the full method (per-task gradients, preconditioning, Gram,
surgery) runs on the optimizer steps ``s`` (counting taken steps from 0) with::

    s >= n  and  (s - n) % k == 0

and every other step is the *plain path*: one backward of the weighted sum
``sum_i w_i L_i`` and the inner step, at the cost of ordinary training. On plain steps
only the weighting runs (its state advances as on every step); the surgery and the
preconditioner do not run and their states stay as they were, so a stateful method
(GradVac's targets, Nash-MTL's warm start, the per-task accumulators) updates only on
the steps where it runs. A weighting that reads the Gram of the task gradients
(GradNorm) cannot update its parameters on a plain step: they keep their values there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .weighting._per_task import check_nonnegative_int, check_positive_int


@dataclass(frozen=True)
class Schedule:
    """When the full method runs.

    Attributes:
        every: run it every ``every`` steps (1: every step).
        start: first step on which it runs (earlier steps are plain).
    """

    every: int = 1
    start: int = 0

    @classmethod
    def of(cls, every: Any, start: Any) -> Schedule:
        """Validate the constructor arguments (errors name them)."""
        return cls(check_positive_int(every, "surgery_every"), check_nonnegative_int(start, "surgery_start"))

    @property
    def always(self) -> bool:
        """Whether the full method runs on every step."""
        return self.every == 1 and self.start == 0

    def runs(self, step: int) -> bool:
        """Whether the full method runs on (0-based, taken) step ``step``."""
        return step >= self.start and (step - self.start) % self.every == 0
