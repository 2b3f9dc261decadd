"""Where a loss is heading: a floor fitted to its record, for the 1/L hazard.

A weighting that divides by a task's loss (GLS, FAMO, STCH, IMTL-L) is harmed by a loss
that goes to 0 (a separable classification: ``grad log L`` keeps its size while ``L``
vanishes, so that task keeps the update), not by a loss that merely falls a long way
(a regression in raw units falls from the error of predicting 0 to its noise variance,
often a hundredfold, and then stops). What separates the two is the floor the loss
converges to, relative to where it is now.

The fit reads the medians of the record's windows (a tenth of it each) up to the lowest
(a task that falls towards 0 while it is trained and rises once another task takes the
trunk over still shows its fall), from the steepest fall in ``log L`` on (before it, a
regression's output may still be travelling towards its targets' scale, its fall
speeding up). Two families of curves are fitted by least squares on the relative error:

- **a floor**: ``L(t) = L* + A g(t)`` with ``L* >= 0`` free and a transient ``g``
  that shrinks geometrically (``q^t``) or as a power of the step (``t^-a``);
- **no floor** (the hazard): the same transients with ``L* = 0``, or with ``L*`` just under
  the edge (a tenth of the lowest window): curves that go below the edge by the horizon.

The loss is shown to stay above the edge when the best floor curve does and every
hazard curve that goes below it fits worse by more than :data:`CHI2` noise variances
(the noise of a window's median from the scatter of ``log L`` inside the windows). The
burden of proof is on the floor: ruling the 1/L weightings out by mistake costs a
shortlist place, missing a loss that goes to 0 can leave a task untrained.

Limits: a regression early in its descent, its fall still speeding up, shows no floor
yet and may be read as approaching 0 (after it fell tenfold); a floor far below the
lowest window is invisible until the loss gets near it (it is then 0 for the rule).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

#: the record is cut into this many windows; their medians are what the fit reads
WINDOWS = 10
#: the fitted fall counts when its slope exceeds this many standard errors
SIGNIFICANT = 2.0
#: the standard error of a median is about this factor times that of a mean
MEDIAN_SE = 1.2533
#: a floor is only shown by a fit through at least this many windows (one more than its parameters)
MIN_FIT = 4
#: a positive floor is kept when it lowers the squared error by this many noise variances
#: (the 95% point of a chi-square with one degree of freedom: one parameter more)
CHI2 = 3.84
#: the grids of the transients' parameters (refined by golden-section search): geometric
#: rates per window (``q`` from 0.99 to 0.007) and power-law exponents (0.05 to 10)
RATES = tuple(-math.exp(math.log(0.01) + i * math.log(500.0) / 79) for i in range(80))
POWERS = tuple(math.exp(math.log(0.05) + i * math.log(200.0) / 79) for i in range(80))
#: where a power law's clock may start, in windows before the record's start (a loss may
#: only begin its power-law fall after a transient: a negative offset)
OFFSETS = (-0.45, -0.25, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
#: golden-section steps refining the best grid parameter
REFINE = 30


@dataclass(frozen=True)
class Trend:
    """The floor model fitted to one task's loss record.

    Attributes:
        first: median of the first window.
        lowest: median of the lowest window (the last one fitted).
        floor: the best floor curve's ``L*``.
        projected: the best floor curve's value at the horizon.
        falling: a line through the fitted windows' ``log`` medians falls by more than
            :data:`SIGNIFICANT` standard errors (from the scatter of ``log L`` inside the
            windows): a fall, not noise.
        stays_above: the record shows the loss staying above the hazard's edge by the horizon.
    """

    first: float
    lowest: float
    floor: float
    projected: float
    falling: bool
    stays_above: bool


def _windows(values: Sequence[float]) -> List[List[float]]:
    width = max(len(values) // WINDOWS, 1)
    return [list(values[i : i + width]) for i in range(0, len(values) - width + 1, width)]


def _line(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float]:
    """Least-squares intercept and slope of ``ys`` against ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den
    return my - slope * mx, slope


Shape = Callable[[float, float], float]


def _geometric(rate: float, c: float) -> float:
    return math.exp(rate * c)


def _power(exponent: float, c: float) -> float:
    return c ** (-exponent)


@dataclass(frozen=True)
class _Fit:
    sse: float
    floor: float
    amplitude: float
    shape: Shape
    param: float

    def at(self, c: float) -> float:
        """The fitted curve at ``c`` (in the fit's time coordinate)."""
        return self.floor + self.amplitude * self.shape(self.param, c)


def _fit_at(
    shape: Shape, param: float, cs: Sequence[float], medians: Sequence[float], floor: Optional[float]
) -> Optional[_Fit]:
    """``M_j ~ floor + amplitude * shape(param, c_j)`` by least squares on the relative error,
    ``floor`` given or (None) fitted with ``floor >= 0``; None when the amplitude is not positive."""
    us = [1.0 / m for m in medians]
    es = [u * shape(param, c) for u, c in zip(us, cs)]
    see = sum(e * e for e in es)
    if floor is None:
        suu, sue = sum(u * u for u in us), sum(u * e for u, e in zip(us, es))
        det = suu * see - sue * sue
        floor = max((see * sum(us) - sue * sum(es)) / det, 0.0) if det > 1e-12 * suu * see else 0.0
    amplitude = sum(e * (1.0 - floor * u) for u, e in zip(us, es)) / see
    if amplitude <= 0:
        return None
    sse = sum((1.0 - floor * u - amplitude * e) ** 2 for u, e in zip(us, es))
    return _Fit(sse, floor, amplitude, shape, param)


def _best(
    shape: Shape, grid: Sequence[float], cs: Sequence[float], medians: Sequence[float], floor: Optional[float]
) -> Optional[_Fit]:
    """The best fit over ``grid``, refined by golden-section search between the neighbours of
    the best grid point (a coarse parameter would leave an error that a free floor absorbs)."""
    fits = [_fit_at(shape, p, cs, medians, floor) for p in grid]
    found = [(f.sse, i) for i, f in enumerate(fits) if f is not None]
    if not found:
        return None
    i = min(found)[1]
    best = fits[i]
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(REFINE):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        fa, fb = _fit_at(shape, a, cs, medians, floor), _fit_at(shape, b, cs, medians, floor)
        for f in (fa, fb):
            if f is not None and (best is None or f.sse < best.sse):
                best = f
        if (fa.sse if fa is not None else math.inf) < (fb.sse if fb is not None else math.inf):
            hi = b
        else:
            lo = a
    return best


def _family(cs: Sequence[float], ms: Sequence[float], floor: Optional[float]) -> List[_Fit]:
    """The best geometric and the best power-law curves with ``floor`` (None: fitted); the
    power law's clock may start at any of :data:`OFFSETS` (in windows before the record)."""
    low = cs[-1]
    fits = [_best(lambda r, c: _geometric(r, c - low), RATES, cs, ms, floor)]
    for offset in OFFSETS:
        fits.append(_best(lambda a, c, o=offset: _power(a, (c + o) / (low + o)), POWERS, cs, ms, floor))
    return [f for f in fits if f is not None]


def fit(values: Sequence[float], horizon: float, share: float) -> Optional[Trend]:
    """The floor and no-floor curves through the record up to its lowest window, at ``horizon``.

    Args:
        values: the task's finite, positive losses, in step order.
        horizon: the position (counted in ``values``' steps) to project to.
        share: the edge of the hazard, as a share of the lowest window: ``stays_above``
            says whether the loss is shown to stay above ``share * lowest`` by the horizon.

    Returns:
        The :class:`Trend`, or None with fewer than three windows up to the lowest.
    """
    windows = _windows(values)
    medians = [statistics.median(w) for w in windows]
    if not medians or min(medians) <= 0:
        return None
    logs = [math.log(m) for m in medians]
    # the last window at the lowest level (within noise): a loss resting on its floor is
    # fitted over its whole stay there, not up to whichever window its noise put lowest
    level = min(logs) + SIGNIFICANT * math.sqrt(2.0 * _median_variance(windows))
    low = max(j for j, y in enumerate(logs) if y <= level)
    if low < 2:
        return None
    noise = _median_variance(windows[: low + 1])
    cs = [j + 0.5 for j in range(low + 1)]  # window centres, in windows from the record's start
    _, slope = _line(cs, logs[: low + 1])
    slope_se = math.sqrt(noise / sum((c - statistics.fmean(cs)) ** 2 for c in cs))
    drops = [logs[j] - logs[j + 1] for j in range(low)]
    steepest = max(drops) - SIGNIFICANT * math.sqrt(2.0 * noise)  # as steep, within noise
    start = max(min(j for j, d in enumerate(drops) if d >= steepest), 1)  # window 0: the start-up
    cs, ms = cs[start:], medians[start : low + 1]
    at = horizon / len(windows[0])  # the horizon in windows from the record's start
    edge = share * ms[-1]
    floors = _family(cs, ms, None) if len(ms) >= MIN_FIT else []
    free = min(floors, key=lambda f: f.sse) if floors else None
    stays = False
    if free is not None and free.at(at) >= edge:
        hazard = [f for fl in (0.0, edge * (1 - 1e-6)) for f in _family(cs, ms, fl) if f.at(at) < edge]
        stays = all(f.sse - free.sse > CHI2 * noise for f in hazard)
    return Trend(
        first=medians[0],
        lowest=ms[-1],
        floor=free.floor if free is not None else 0.0,
        projected=free.at(at) if free is not None else 0.0,
        falling=slope < -SIGNIFICANT * slope_se,
        stays_above=stays,
    )


def _median_variance(windows: Sequence[Sequence[float]]) -> float:
    """The variance of a window's ``log`` median, from the scatter of ``log L`` about a line
    inside each window (the trend inside a window is not noise), pooled over the windows."""
    scatter = []
    for w in windows:
        if len(w) > 2:
            xs, ys = list(range(len(w))), [math.log(v) for v in w]
            a, b = _line(xs, ys)
            scatter.append(sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / (len(w) - 2) / len(w))
    return MEDIAN_SE**2 * statistics.fmean(scatter) if scatter else 0.0
