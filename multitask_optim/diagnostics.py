"""Per-step statistics, as plain Python numbers for any logger, and helpers to see them.

- :func:`step_stats` builds ``opt.last_stats`` (used by the optimizer).
- :func:`log_stats` writes one step's statistics as scalars to any object with an
  ``add_scalar(tag, value, step)`` method (TensorBoard's ``SummaryWriter``, a wandb or
  MLflow adapter, a test double).
- :class:`StatsHistory` records ``opt.last_stats`` step after step (plain lists) and
  :func:`plot_history` draws a run: the pairwise-cosine heat map (pairs x steps, where
  negative cells are conflicts), the task weights, the aggregation coefficients and
  the losses, saved as a PNG (matplotlib, the ``plot`` extra, imported only there).

Example::

    from torch.utils.tensorboard import SummaryWriter
    from multitask_optim.diagnostics import StatsHistory, log_stats, plot_history

    writer, history = SummaryWriter(), StatsHistory(task_names=opt.tasks)
    for step, batch in enumerate(loader):
        opt.zero_grad()
        opt.step(model.losses(batch))
        log_stats(writer, opt.last_stats, step, task_names=opt.tasks)
        history.append(opt.last_stats, step)
    plot_history(history, "run.png")
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

__all__ = ["StatsHistory", "log_stats", "plot_history", "step_stats"]


def step_stats(
    gram: Optional[Tensor],
    coefficients: Optional[Tensor],
    weights: Sequence[float],
    losses: Sequence[float],
    skipped: int,
) -> Dict[str, Any]:
    """Statistics of one step from the summed Gram matrix ``(K, K)`` of the shared gradients.

    Args:
        gram: ``(K, K)`` Gram matrix of the step (None on a plain step).
        coefficients: the surgery's coefficients (None when not a combination).
        weights: the task weights.
        losses: the task loss values.
        skipped: steps skipped so far for non-finite values.

    Returns:
        ``{"weights", "losses", "skipped"}`` and, with a Gram matrix, ``cosine`` (K x K
        list), ``grad_norms`` (per task) and ``conflicts`` (pairs ``i < j`` with a negative
        inner product); ``coefficients`` when given.
    """
    stats: Dict[str, Any] = {
        "weights": [float(w) for w in weights],
        "losses": [float(v) for v in losses],
        "skipped": int(skipped),
    }
    if gram is not None:
        g = gram.tolist()
        k = len(g)
        norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
        cosine = [  # clipped: rounding can put |cos| a hair above 1
            [
                min(1.0, max(-1.0, g[i][j] / (norms[i] * norms[j]))) if norms[i] > 0 and norms[j] > 0 else 0.0
                for j in range(k)
            ]
            for i in range(k)
        ]
        stats["grad_norms"] = norms
        stats["cosine"] = cosine
        stats["conflicts"] = sum(1 for i in range(k) for j in range(i + 1, k) if g[i][j] < 0)
    if coefficients is not None:
        stats["coefficients"] = coefficients.tolist()
    return stats


# ---------------------------------------------------------------------- logging
def _names(k: int, task_names: Optional[Sequence[str]]) -> List[str]:
    if task_names is None:
        return [str(i) for i in range(k)]
    names = [str(n) for n in task_names]
    if len(names) != k:
        raise ValueError(f"task_names has {len(names)} names but the statistics are for {k} tasks")
    return names


def _num_tasks(stats: Mapping[str, Any]) -> int:
    for key in ("losses", "weights", "grad_norms", "coefficients", "cosine"):
        value = stats.get(key)
        if isinstance(value, (list, tuple)):
            return len(value)
    return 0


def _pairs(k: int) -> List[Tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def _mean_pairwise(cosine: Sequence[Sequence[float]]) -> float:
    pairs = _pairs(len(cosine))
    if not pairs:
        return float("nan")
    return sum(float(cosine[i][j]) for i, j in pairs) / len(pairs)


def log_stats(
    writer: Any,
    stats: Mapping[str, Any],
    step: int,
    prefix: str = "multitask",
    task_names: Optional[Sequence[str]] = None,
) -> Dict[str, float]:
    """Write one step's statistics (``opt.last_stats``) as scalars to ``writer``.

    Tags (``{t}`` a task name, tasks named ``"0"``, ``"1"``, ... unless ``task_names``
    is given -- pass ``opt.tasks``):

    - ``{prefix}/loss/{t}``, ``{prefix}/weight/{t}``, ``{prefix}/grad_norm/{t}``,
      ``{prefix}/coefficient/{t}`` (mean over Gram blocks);
    - ``{prefix}/cosine/{a}-{b}`` for each pair ``a < b`` and ``{prefix}/cosine/mean``;
    - ``{prefix}/conflicts`` (pairs with a negative inner product),
      ``{prefix}/skipped`` (steps skipped so far), ``{prefix}/objective``.

    A skipped step's statistics hold only the losses and the skip count; only those
    are written. Keys that are absent are not written.

    Args:
        writer: anything with ``add_scalar(tag, value, step)``, e.g.
            ``torch.utils.tensorboard.SummaryWriter``.
        stats: ``opt.last_stats``.
        step: the global step for the writer.
        prefix: the first part of every tag.
        task_names: names for the tags (default ``"0"``, ``"1"``, ...).

    Returns:
        ``{tag: value}`` of everything written (plain floats).

    Raises:
        TypeError: ``writer`` has no ``add_scalar``.
    """
    if not hasattr(writer, "add_scalar"):
        raise TypeError(
            f"writer must have an add_scalar(tag, value, step) method, got {type(writer).__name__}"
        )
    k = _num_tasks(stats)
    names = _names(k, task_names)
    out: Dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        out[f"{prefix}/{tag}"] = float(value)

    per_task = (
        ("losses", "loss"),
        ("weights", "weight"),
        ("grad_norms", "grad_norm"),
        ("coefficients", "coefficient"),
    )
    for key, tag in per_task:
        values = stats.get(key)
        if values is None:
            continue
        for name, value in zip(names, values):
            put(f"{tag}/{name}", value)
    cosine = stats.get("cosine")
    if cosine is not None:
        for i, j in _pairs(len(cosine)):
            put(f"cosine/{names[i]}-{names[j]}", cosine[i][j])
        if len(cosine) > 1:
            put("cosine/mean", _mean_pairwise(cosine))
    for key in ("conflicts", "skipped", "objective"):
        if stats.get(key) is not None:
            put(key, stats[key])
    for tag, value in out.items():
        writer.add_scalar(tag, value, step)
    return out


# ---------------------------------------------------------------------- history
class StatsHistory:
    """Records ``opt.last_stats`` over a run, as plain Python lists.

    Each :meth:`append` adds one row to every list (``None`` where the step has no value,
    e.g. the cosines of a skipped step), so all lists are aligned with :attr:`steps`.

    Attributes:
        steps: the step index of each row.
        losses, weights, grad_norms, coefficients: per row, a list of K floats (or None).
        cosine: per row, the K x K cosine matrix (or None).
        conflicts: per row, the number of conflicting pairs (or None).
        skipped: per row, the number of steps skipped so far.
        skipped_step: per row, whether that step was skipped.
        task_names: the task names (``"0"``, ``"1"``, ... until known).
    """

    _FIELDS = ("losses", "weights", "grad_norms", "coefficients", "cosine", "conflicts")

    def __init__(self, task_names: Optional[Sequence[str]] = None) -> None:
        self.task_names: Optional[List[str]] = [str(n) for n in task_names] if task_names else None
        self.steps: List[int] = []
        self.losses: List[Optional[List[float]]] = []
        self.weights: List[Optional[List[float]]] = []
        self.grad_norms: List[Optional[List[float]]] = []
        self.coefficients: List[Optional[List[float]]] = []
        self.cosine: List[Optional[List[List[float]]]] = []
        self.conflicts: List[Optional[int]] = []
        self.skipped: List[int] = []
        self.skipped_step: List[bool] = []

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"StatsHistory(steps={len(self)}, tasks={self.names})"

    @property
    def num_tasks(self) -> int:
        if self.task_names is not None:
            return len(self.task_names)
        for row in self.losses:
            if row is not None:
                return len(row)
        return 0

    @property
    def names(self) -> List[str]:
        return _names(self.num_tasks, self.task_names)

    def append(self, stats: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Add one step's statistics.

        Args:
            stats: ``opt.last_stats`` after a step.
            step: the step's index (default: the next one).

        Raises:
            TypeError: ``stats`` is not a mapping.
            ValueError: ``stats`` is empty or has another number of tasks than the history.
        """
        if not isinstance(stats, Mapping):
            raise TypeError(f"stats must be a mapping (opt.last_stats), got {type(stats).__name__}")
        if not stats:
            raise ValueError("stats is empty: append opt.last_stats after a step")
        k = _num_tasks(stats)
        if self.num_tasks and k and k != self.num_tasks:
            raise ValueError(f"stats are for {k} tasks, the history for {self.num_tasks}")
        self.steps.append(int(step) if step is not None else (self.steps[-1] + 1 if self.steps else 0))
        for key in self._FIELDS:
            value = stats.get(key)
            getattr(self, key).append(copy.deepcopy(_plain(value)) if value is not None else None)
        self.skipped.append(int(stats.get("skipped", 0)))
        self.skipped_step.append(bool(stats.get("skipped_step", False)))

    def record(self, optimizer: Any, step: Optional[int] = None) -> None:
        """Append ``optimizer.last_stats`` (and take the task names from ``optimizer.tasks``).

        Args:
            optimizer: a :class:`~multitask_optim.MultiTaskOptimizer` after a step.
            step: the step's index (default: the next one).
        """
        if self.task_names is None and getattr(optimizer, "tasks", None):
            self.task_names = [str(n) for n in optimizer.tasks]
        self.append(optimizer.last_stats, step)

    def pair_cosines(self) -> Tuple[List[Tuple[int, int]], List[List[float]]]:
        """The cosine of every task pair over the steps.

        Returns:
            ``(pairs, rows)``: the pairs ``(i, j)`` with ``i < j`` and, for each, its cosine
            at every step (NaN where absent).
        """
        pairs = _pairs(self.num_tasks)
        rows = [[float(c[i][j]) if c is not None else float("nan") for c in self.cosine] for i, j in pairs]
        return pairs, rows

    def series(self, key: str) -> List[List[float]]:
        """Per task, the values of ``key`` over the steps.

        Args:
            key: ``"losses"``, ``"weights"``, ``"grad_norms"`` or ``"coefficients"``.

        Returns:
            One list per task (NaN where absent).

        Raises:
            ValueError: an unknown ``key``.
        """
        if key not in ("losses", "weights", "grad_norms", "coefficients"):
            raise ValueError(f"series() takes losses, weights, grad_norms or coefficients, got {key!r}")
        rows = getattr(self, key)
        return [
            [float(r[t]) if r is not None and t < len(r) else float("nan") for r in rows]
            for t in range(self.num_tasks)
        ]

    def to_dict(self) -> Dict[str, Any]:
        """Everything as plain lists (JSON-serialisable apart from NaN/inf floats).

        Returns:
            ``{"task_names", "steps", <statistic>: [...]}``.
        """
        out: Dict[str, Any] = {"task_names": self.names, "steps": list(self.steps)}
        for key in (*self._FIELDS, "skipped", "skipped_step"):
            out[key] = copy.deepcopy(getattr(self, key))
        return out


def _plain(value: Any) -> Any:
    """Tensors and nested sequences as plain Python numbers and lists."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------- plotting
def plot_history(
    history: StatsHistory,
    path: Union[str, os.PathLike[str]],
    title: Optional[str] = None,
    dpi: int = 100,
) -> str:
    """Draw a run recorded in ``history`` and save it as a PNG at ``path``.

    Panels: the pairwise cosine of the task gradients on the shared parameters as a heat
    map (one row per pair, one column per step; blue aligned, red conflicting) with
    the number of conflicting pairs per step below it, the task weights, the aggregation
    coefficients (mean over Gram blocks) and the losses (log scale when positive).
    Skipped steps are left blank.

    Needs matplotlib (the ``plot`` extra); it is imported here only, with the
    non-interactive Agg canvas (no display, no global backend change).

    Args:
        history: the recorded run.
        path: where to write the PNG.
        title: a title for the figure.
        dpi: the resolution.

    Returns:
        ``str(path)``.

    Raises:
        ImportError: matplotlib is not installed.
        TypeError: ``history`` is not a :class:`StatsHistory`.
        ValueError: ``history`` is empty.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_history needs matplotlib: pip install -e '.[plot]' in the checkout "
            "(or pip install matplotlib)"
        ) from error
    if not isinstance(history, StatsHistory):
        raise TypeError(f"history must be a StatsHistory, got {type(history).__name__}")
    if len(history) == 0:
        raise ValueError("history is empty: append opt.last_stats after each step first")

    fig = Figure(figsize=(10, 10.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(4, 2, height_ratios=[1.3, 0.45, 1, 1])
    _plot_conflicts(fig, grid, history)
    _plot_series(fig, grid, history)
    if title:
        fig.suptitle(title)
    fig.savefig(str(path), dpi=dpi, format="png")
    return str(path)


def _plot_conflicts(fig: Any, grid: Any, history: StatsHistory) -> None:
    """The pair-cosine heat map and the count of conflicting pairs per step."""
    steps, names = history.steps, history.names
    pairs, rows = history.pair_cosines()
    heat = fig.add_subplot(grid[0, :])
    count = fig.add_subplot(grid[1, :], sharex=heat)
    lo, hi = steps[0] - 0.5, steps[-1] + 0.5
    if pairs:
        image = heat.imshow(
            rows,
            aspect="auto",
            cmap="RdBu",
            vmin=-1.0,
            vmax=1.0,
            interpolation="nearest",
            extent=(lo, hi, len(pairs) - 0.5, -0.5),
        )
        heat.set_yticks(range(len(pairs)))
        heat.set_yticklabels([f"{names[i]} / {names[j]}" for i, j in pairs])
        fig.colorbar(image, ax=heat, label="cosine (< 0: conflict)")
    else:
        heat.text(0.5, 0.5, "one task: no pairs", ha="center", va="center", transform=heat.transAxes)
    heat.set_title("task-gradient cosine on the shared parameters (pairs x steps)")
    counts = [float(c) if c is not None else float("nan") for c in history.conflicts]
    count.bar(steps, counts, width=0.8, color="tab:red")
    count.set_xlim(lo, hi)
    count.set_ylim(0, max(len(pairs), 1))
    count.set_ylabel("conflicts")
    count.set_xlabel("step")


def _plot_series(fig: Any, grid: Any, history: StatsHistory) -> None:
    """Weights, coefficients, losses and gradient norms per task; skipped steps dotted."""
    steps, names = history.steps, history.names
    panels = [
        (fig.add_subplot(grid[2, 0]), "weights", "task weights", False),
        (fig.add_subplot(grid[2, 1]), "coefficients", "aggregation coefficients", False),
        (fig.add_subplot(grid[3, 0]), "losses", "losses", True),
        (fig.add_subplot(grid[3, 1]), "grad_norms", "gradient norms (shared)", True),
    ]
    skipped = [s for s, flag in zip(steps, history.skipped_step) if flag]
    for ax, key, label, log in panels:
        series = history.series(key)
        for name, values in zip(names, series):
            ax.plot(steps, values, label=name, linewidth=1.2)
        finite = [v for values in series for v in values if math.isfinite(v)]
        if log and finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("step")
        if names:
            ax.legend(fontsize="small")
        for s in skipped:
            ax.axvline(s, color="grey", linestyle=":", linewidth=0.8)
