"""``diagnose``'s measurements: a copy of the model trained with the plain sum, recorded per step.

The per-task numbers come from ``MultiTaskOptimizer``'s own statistics (``last_stats``:
losses, shared-gradient norms, cosines, present tasks): the copy is trained with
``surgery=None`` and an explicit ``gradient_mode``, which is the plain sum's update with
the per-task gradients (and so the statistics) computed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ._trend import Trend, fit

#: a loss "approaches 0" only after its lowest window fell below this share of its first ...
ZERO_FALLEN = 0.1
#: ... and unless its fitted floor model (:mod:`._trend`) shows it staying above this share
#: of its lowest window by the horizon
ZERO_TREND = 0.1
#: a loss at or below this is 0 already (float32 underflow of a separable cross-entropy)
ZERO_ABSOLUTE = 1e-30


def _median(values: List[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def _slope(points: List[Tuple[int, float]]) -> float:
    """Least-squares slope of ``log(loss)`` against the step (per step); 0 with < 3 points."""
    pts = [(s, math.log(v)) for s, v in points if v > 0 and math.isfinite(v)]
    if len(pts) < 3:
        return 0.0
    mx = statistics.fmean(s for s, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    den = sum((s - mx) ** 2 for s, _ in pts)
    return sum((s - mx) * (y - my) for s, y in pts) / den if den > 0 else 0.0


@dataclass
class Measurements:
    """What ``diagnose`` recorded, step by step, and what it derives from it.

    Attributes:
        tasks: task names, in the order of the first batch.
        steps: steps trained (plain sum).
        horizon: the training length the loss trends are projected to.
        inner: the inner optimizer's class name.
        adaptive: whether it is Adam-like (normalises each coordinate by its own history).
        losses: per task, the loss of every step (NaN where the task was absent).
        grad_norms: per task, the norm of its gradient on the shared parameters per step.
        cosines: per task pair ``"a|b"``, the cosine of their shared gradients per step.
        skipped: steps the optimizer skipped (a non-finite loss or gradient).
        gradient_mode: the optimizer's path for the per-task gradients.
        steps_per_epoch: batches per pass over the data (None when unknown), given to the
            recommended methods whose schedule counts epochs.
        probe: the same steps from the same start with a scale-free surgery (IMTL-G), run
            when the scales are far apart (None otherwise; see ``approaches_zero``).
    """

    tasks: Tuple[str, ...]
    steps: int
    horizon: int
    inner: str
    adaptive: bool
    losses: Dict[str, List[float]] = field(default_factory=dict)
    grad_norms: Dict[str, List[float]] = field(default_factory=dict)
    cosines: Dict[str, List[float]] = field(default_factory=dict)
    skipped: int = 0
    gradient_mode: str = ""
    steps_per_epoch: Optional[int] = None
    #: the same steps from the same start with a scale-free surgery (IMTL-G), run when the
    #: scales are far apart: under the plain sum a small task is starved and cannot show
    #: that its loss would fall to 0 once it is trained (see ``approaches_zero``)
    probe: Optional[Measurements] = None
    #: fitted trends by (task, losses recorded, horizon): the fit is the costly part of a
    #: summary, and the report, the rules and the probe each ask for it
    _trends: Dict[Tuple[str, int, int], Optional[Trend]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def record(self, stats: Mapping[str, Any]) -> None:
        """Append one step of ``MultiTaskOptimizer.last_stats``.

        Args:
            stats: the optimizer's ``last_stats`` after a step.
        """
        present = [str(t) for t in stats.get("tasks", self.tasks)]
        row = dict(zip(present, stats.get("losses", [])))
        norms = dict(zip(present, stats.get("grad_norms", [])))
        cos = stats.get("cosine")
        for task in self.tasks:
            self.losses.setdefault(task, []).append(float(row.get(task, math.nan)))
            self.grad_norms.setdefault(task, []).append(float(norms.get(task, math.nan)))
        for i, a in enumerate(self.tasks):
            for b in self.tasks[i + 1 :]:
                value = math.nan
                if cos is not None and a in present and b in present:
                    value = float(cos[present.index(a)][present.index(b)])
                self.cosines.setdefault(f"{a}|{b}", []).append(value)

    # ------------------------------------------------------------------ derived, per task

    def _window(self, task: str, first: bool) -> List[float]:
        vals = [v for v in self.losses.get(task, []) if math.isfinite(v)]
        n = max(1, len(vals) // (10 if first else 4))
        return vals[:n] if first else vals[-n:]

    def initial_loss(self, task: str) -> float:
        """Median loss over the first tenth of the steps the task was present.

        Args:
            task: a task name.

        Returns:
            The median (NaN when the task never had a finite loss).
        """
        return _median(self._window(task, True))

    def loss_scale(self, task: str) -> float:
        """Median loss over the last quarter of the steps the task was present.

        Args:
            task: a task name.

        Returns:
            The median (NaN when the task never had a finite loss).
        """
        return _median(self._window(task, False))

    def grad_norm(self, task: str) -> float:
        """Median norm of the task's gradient on the shared parameters.

        Args:
            task: a task name.

        Returns:
            The median (NaN when none was recorded).
        """
        return _median(self.grad_norms.get(task, []))

    def missing(self, task: str) -> float:
        """Share of steps on which the task had no loss (absent labels).

        Args:
            task: a task name.

        Returns:
            A fraction in ``[0, 1]``.
        """
        vals = self.losses.get(task, [])
        return sum(1 for v in vals if math.isnan(v)) / len(vals) if vals else 0.0

    def slope(self, task: str) -> float:
        """Per-step slope of ``log(loss)`` over the last quarter of the run.

        Args:
            task: a task name.

        Returns:
            The slope (0 with fewer than three finite losses).
        """
        vals = self.losses.get(task, [])
        start = len(vals) - max(len(vals) // 4, 3)
        return _slope([(s, v) for s, v in enumerate(vals) if s >= start and math.isfinite(v)])

    def trend(self, task: str) -> Optional[Trend]:
        """The floor model fitted to the task's losses, projected to ``horizon`` (see :mod:`._trend`).

        Args:
            task: a task name.

        Returns:
            The fitted trend, or None when there are too few losses to fit.
        """
        vals = self.losses.get(task, [])
        key = (task, len(vals), self.horizon)
        if key not in self._trends:
            finite = [v for v in vals if math.isfinite(v)]
            share = len(finite) / len(vals) if vals else 1.0
            self._trends[key] = fit(finite, self.horizon * share, ZERO_TREND)
        return self._trends[key]

    def approaches_zero(self, task: str) -> bool:
        """The 1/L hazard, under the plain sum or in the balanced ``probe``: the loss reached 0,
        or its lowest window fell tenfold below its first, the fall into it exceeds the windows' noise, and the
        floor model fitted to it does not show the loss staying above a tenth of that window
        by ``horizon``. A loss approaching a positive floor, however far it fell, is not flagged.

        Args:
            task: a task name.

        Returns:
            Whether the task's loss is flagged.
        """
        if self.probe is not None and self.probe.approaches_zero(task):
            return True
        vals = [v for v in self.losses.get(task, []) if math.isfinite(v)]
        if any(v <= ZERO_ABSOLUTE for v in vals):
            return True
        t = self.trend(task)
        if t is None or not t.falling or not t.lowest < ZERO_FALLEN * t.first:
            return False
        return not t.stays_above

    # ------------------------------------------------------------------ derived, across tasks

    def loss_ratio(self) -> float:
        """Largest over smallest loss scale (1 for one task).

        Returns:
            The ratio (inf when the smallest is 0).
        """
        return _ratio([self.loss_scale(t) for t in self.tasks])

    def grad_ratio(self) -> float:
        """Largest over smallest median shared-gradient norm.

        Returns:
            The ratio (1 for one task, inf when the smallest is 0).
        """
        return _ratio([self.grad_norm(t) for t in self.tasks])

    def _all_cosines(self) -> List[float]:
        return [c for vals in self.cosines.values() for c in vals if math.isfinite(c)]

    def conflict_fraction(self) -> float:
        """Share of (step, task pair) entries with a negative cosine.

        Returns:
            A fraction in ``[0, 1]`` (0 with no recorded pair).
        """
        cos = self._all_cosines()
        return sum(1 for c in cos if c < 0) / len(cos) if cos else 0.0

    def conflict_strength(self) -> float:
        """Mean ``-cos`` over the conflicting entries (0 when none conflict).

        Returns:
            The mean, in ``[0, 1]``.
        """
        neg = [-c for c in self._all_cosines() if c < 0]
        return statistics.fmean(neg) if neg else 0.0

    def mean_cosine(self) -> float:
        """Mean cosine over every recorded (step, task pair) entry.

        Returns:
            The mean (NaN with no recorded pair).
        """
        cos = self._all_cosines()
        return statistics.fmean(cos) if cos else math.nan

    def pair_cosine(self, pair: str) -> float:
        """Mean cosine of one task pair over the steps that had both.

        Args:
            pair: ``"a|b"``, as in :attr:`cosines`.

        Returns:
            The mean (NaN when the pair was never recorded).
        """
        vals = [c for c in self.cosines.get(pair, []) if math.isfinite(c)]
        return statistics.fmean(vals) if vals else math.nan

    def summary(self) -> Dict[str, Any]:
        """Every derived number, as plain floats (what the rules read and the report prints).

        Returns:
            ``loss_ratio``, ``grad_ratio``, ``conflict_fraction``, ``conflict_strength``,
            ``mean_cosine``, per-task values under ``"tasks"`` and per-pair cosines under
            ``"pairs"``.
        """
        return {
            "loss_ratio": self.loss_ratio(),
            "grad_ratio": self.grad_ratio(),
            "conflict_fraction": self.conflict_fraction(),
            "conflict_strength": self.conflict_strength(),
            "mean_cosine": self.mean_cosine(),
            "tasks": {
                t: {
                    "initial_loss": self.initial_loss(t),
                    "loss": self.loss_scale(t),
                    "trend_per_100_steps": math.exp(100 * self.slope(t)) - 1.0,
                    "grad_norm": self.grad_norm(t),
                    "missing": self.missing(t),
                    "approaches_zero": self.approaches_zero(t),
                }
                for t in self.tasks
            },
            "pairs": {p: self.pair_cosine(p) for p in self.cosines},
        }


def _ratio(values: List[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    if len(vals) < 2:
        return 1.0
    low, high = min(vals), max(vals)
    return high / low if low > 0 else math.inf
