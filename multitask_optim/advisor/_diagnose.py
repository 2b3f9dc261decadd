"""``diagnose``: measure the user's model under the plain sum and shortlist methods."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sized

from torch import nn

from ..optimizer import MultiTaskOptimizer
from ._isolation import (
    Cycle,
    LossFn,
    OptimizerFactory,
    Progress,
    default_optimizer,
    is_adaptive,
    isolated_rng,
    matplotlib_pyplot,
    private_copy,
    task_losses,
    translate,
)
from ._measure import Measurements
from ._rules import IMBALANCE, recommend

#: explicit gradient paths tried in order (an explicit mode computes the per-task
#: statistics even for the plain sum); the loop works wherever backward does
MODES = ("frontier", "looped")
#: the scale-free surgery of the zero-loss probe (run when the scales are far apart)
PROBE = "imtl_g"


class Recommendation(dict):  # type: ignore[type-arg]
    """A configuration (a dict for ``MultiTaskOptimizer(inner, **config)``) with its ``reason``.

    Args:
        config: the keyword arguments of ``MultiTaskOptimizer``.
        reason: why the rules recommend it.
    """

    def __init__(self, config: Mapping[str, Any], reason: str) -> None:
        super().__init__(config)
        self.reason = reason


class Diagnosis:
    """What ``diagnose`` measured and recommends.

    Attributes:
        measurements: the per-step record (:class:`~multitask_optim.advisor.Measurements`).
        recommended: configurations, best first; each a dict with a ``reason`` attribute.
        warnings: ``{method: why}`` for the methods the measurements rule out.
    """

    def __init__(self, measurements: Measurements) -> None:
        self.measurements = measurements
        picks, self.warnings = recommend(measurements)
        self.recommended: List[Recommendation] = [Recommendation(c, r) for c, r in picks]

    @property
    def summary(self) -> Dict[str, Any]:
        """The derived measurements as plain numbers (see ``Measurements.summary``)."""
        return self.measurements.summary()

    def __repr__(self) -> str:
        return f"Diagnosis(tasks={list(self.measurements.tasks)}, recommended={[dict(r) for r in self.recommended]})"

    def __str__(self) -> str:
        m, s = self.measurements, self.summary
        lines = [
            f"diagnose: {m.steps} steps of the plain sum, inner {m.inner}"
            f" ({'Adam-like' if m.adaptive else 'not adaptive'}), per-task gradients: {m.gradient_mode}",
            "",
            f"{'task':<16}{'first loss':>12}{'last loss':>12}{'trend/100':>11}{'grad norm':>12}{'missing':>9}  to 0?",
        ]
        for t in m.tasks:
            e = s["tasks"][t]
            lines.append(
                f"{t[:15]:<16}{e['initial_loss']:>12.4g}{e['loss']:>12.4g}{100 * e['trend_per_100_steps']:>10.0f}%"
                f"{e['grad_norm']:>12.4g}{100 * e['missing']:>8.0f}%  {'YES' if e['approaches_zero'] else 'no'}"
            )
        if m.probe is not None:
            probe = ", ".join(f"{t} {m.probe.loss_scale(t):.3g}" for t in m.tasks)
            lines.append(
                f"(scales far apart: {m.probe.steps} more steps with {PROBE} to see each task's own trend; last losses: {probe})"
            )
        lines += [
            "",
            f"loss ratio {s['loss_ratio']:.4g}   gradient-norm ratio {s['grad_ratio']:.4g}   "
            f"conflicts {100 * s['conflict_fraction']:.0f}% of steps x pairs (mean -cos when conflicting "
            f"{s['conflict_strength']:.2f}; mean cos {s['mean_cosine']:.2f})",
            "",
            "recommended (best first):",
        ]
        for i, rec in enumerate(self.recommended, 1):
            lines.append(f"  {i}. {_short(rec)}  -- {rec.reason}")
        if self.warnings:
            lines += ["", "ruled out:"]
            lines += [f"  {name}: {why}" for name, why in self.warnings.items()]
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None) -> Any:
        """Losses, shared-gradient norms and pairwise cosines per step (needs matplotlib).

        Args:
            path: where to save the figure (PNG by the extension); None: only return it.

        Returns:
            The matplotlib ``Figure``.

        Raises:
            ImportError: when matplotlib is not installed (names the ``plot`` extra).
        """
        plt = matplotlib_pyplot()
        m = self.measurements
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for t in m.tasks:
            axes[0].plot(m.losses[t], label=t)
            axes[1].plot(m.grad_norms[t], label=t)
        for pair, vals in m.cosines.items():
            axes[2].plot(vals, label=pair.replace("|", " / "), lw=0.8)
        axes[2].axhline(0.0, color="k", lw=0.6)
        titles = ("loss per task", "shared-gradient norm", "pairwise cosine (< 0: conflict)")
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def _short(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def diagnose(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    steps: int = 100,
    *,
    optimizer: Optional[OptimizerFactory] = None,
    horizon: Optional[int] = None,
    partition: Optional[Mapping[str, Any]] = None,
    steps_per_epoch: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
) -> Diagnosis:
    """Train a copy of ``model`` with the plain sum and measure what decides the method.

    Args:
        model: the multi-task model; it is deep-copied and never changed.
        loss_fn: ``loss_fn(model, batch)`` returns the per-task losses (a mapping by task
            name or a sequence; a task may be absent, as for ``step``).
        batches: a list or a re-iterable loader, cycled for ``steps`` steps.
        steps: training steps measured (default 100).
        optimizer: builds the inner optimizer from parameters (default ``Adam(lr=1e-3)``);
            whether it is Adam-like changes the advice.
        horizon: the length of the real training run, in steps, to which loss trends are
            projected (default ``10 * steps``).
        partition: ``{"shared": params, "tasks": {name: params}}`` of ``model`` (translated
            to the copy), needed when the first batch lacks a task.
        steps_per_epoch: batches per epoch of the real run, given to a recommended method
            whose schedule counts epochs (STCH's warm-up); default ``len(batches)`` when
            ``batches`` has a length.
        seed: seeds torch, ``random`` and NumPy inside the run (their states are restored).
        progress: show a progress bar.

    Returns:
        A :class:`Diagnosis`: ``recommended`` configurations (best first, with reasons),
        ``warnings``, ``print(report)`` and ``report.plot()``.

    Raises:
        ValueError: for ``steps < 1``, ``horizon < steps``, ``steps_per_epoch < 1``, empty
            batches or no task.
        TypeError: when ``loss_fn`` returns something other than per-task losses.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    horizon = 10 * steps if horizon is None else horizon
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < steps:
        raise ValueError(f"horizon must be an integer >= steps ({steps}), got {horizon!r}")
    if steps_per_epoch is None:
        steps_per_epoch = len(batches) if isinstance(batches, Sized) and len(batches) > 0 else None
    elif isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}")
    bar = Progress(2 * steps, "diagnose", progress)
    try:
        measured = _measure(model, loss_fn, batches, steps, horizon, optimizer, partition, seed, None, bar)
        if max(measured.loss_ratio(), measured.grad_ratio()) >= IMBALANCE:
            probe = _measure(model, loss_fn, batches, steps, horizon, optimizer, partition, seed, PROBE, bar)
            measured.probe = probe
        measured.steps_per_epoch = steps_per_epoch
    finally:
        bar.close()
    return Diagnosis(measured)


def _measure(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    steps: int,
    horizon: int,
    optimizer: Optional[OptimizerFactory],
    partition: Optional[Mapping[str, Any]],
    seed: int,
    surgery: Optional[str],
    bar: Progress,
) -> Measurements:
    """``steps`` steps of a fresh copy of ``model`` with ``surgery``, recorded."""
    with isolated_rng(seed):
        twin, memo = private_copy(model)
        twin.train()
        inner = (optimizer or default_optimizer)(twin.parameters())
        runner = _Runner(twin, loss_fn, inner, translate(partition or {}, memo), seed, surgery)
        for batch in Cycle(batches):
            if runner.measured is not None and runner.measured.steps >= steps:
                break
            runner.step(batch, steps, horizon)
            bar.update()
    assert runner.measured is not None
    return runner.measured


class _Runner:
    """The plain-sum training of the copy, one batch at a time."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inner: Any,
        partition: Dict[str, Any],
        seed: int,
        surgery: Optional[str],
    ) -> None:
        self.model, self.loss_fn, self.inner, self.partition, self.seed = (
            model,
            loss_fn,
            inner,
            partition,
            seed,
        )
        self.surgery = surgery
        self.opt: Optional[MultiTaskOptimizer] = None
        self.measured: Optional[Measurements] = None

    def _build(self, names: List[str], mode: str) -> MultiTaskOptimizer:
        extra = dict(self.partition) if self.partition else {"task_names": names}
        return MultiTaskOptimizer(
            self.inner, surgery=self.surgery, gradient_mode=mode, seed=self.seed, **extra
        )

    def step(self, batch: Any, steps: int, horizon: int) -> None:
        losses = task_losses(self.loss_fn(self.model, batch))
        if not losses:
            raise ValueError("loss_fn returned no task")
        if self.opt is None:
            self._first(batch, losses, steps, horizon)
        else:
            self.opt.zero_grad()
            self.opt.step(losses)
        assert self.measured is not None and self.opt is not None
        self.measured.record(self.opt.last_stats)
        self.measured.steps += 1
        self.measured.skipped = int(self.opt.last_stats.get("skipped", 0))
        self.measured.gradient_mode = str(self.opt.last_stats.get("gradient_mode", ""))

    def _first(self, batch: Any, losses: Dict[str, Any], steps: int, horizon: int) -> None:
        names = list(losses)
        absent = [n for n, v in losses.items() if v is None]
        if absent and not self.partition:
            raise ValueError(
                f"the first batch has no loss for {absent}: the automatic partition needs every task once; "
                "pass partition={'shared': ..., 'tasks': {...}} or start batches with a fully labelled one"
            )
        error: Optional[Exception] = None
        for mode in MODES:
            opt = self._build(names, mode)
            try:
                opt.zero_grad()
                opt.step(losses)
            except RuntimeError as exc:  # a path the model does not support: the next one
                error = exc
                losses = task_losses(self.loss_fn(self.model, batch))
                continue
            self.opt = opt
            break
        if self.opt is None:
            raise RuntimeError(f"no gradient path worked for this model: {error}") from error
        self.measured = Measurements(
            tasks=tuple(names),
            steps=0,
            horizon=horizon,
            inner=type(self.inner).__name__,
            adaptive=is_adaptive(self.inner),
        )
