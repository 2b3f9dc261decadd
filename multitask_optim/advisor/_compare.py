"""``compare``: short pilot runs of candidate configurations on the user's data, scored
against the plain sum."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..optimizer import MultiTaskOptimizer
from ._isolation import (
    Cycle,
    LossFn,
    OptimizerFactory,
    Progress,
    default_optimizer,
    describe,
    isolated_rng,
    matplotlib_pyplot,
    private_copy,
    task_losses,
    translate,
)

Evaluate = Callable[[nn.Module], Mapping[str, float]]
#: the reference every score is relative to
PLAIN_SUM: Dict[str, Any] = {"surgery": None}
#: ``compare``'s candidates when none are given: one or two of each family that needs no
#: model-specific argument (``diagnose(...).recommended`` is the better shortlist), in the
#: order of their mean rank / N over the scale and MultiDigits suites, penguins and wine
#: (ConFIG 0.16, DB-MTL beta=0 0.21, IMTL-G 0.26, Nash-MTL 0.29, FairGrad 0.32, UPGrad
#: 0.40, per-task Adam 0.41, PCGrad 0.44; the plain sum 0.64): the order ``best`` prefers
#: within the pilots' noise
DEFAULT_CONFIGS = (
    {"surgery": "config"},
    {"surgery": "db_mtl", "surgery_kwargs": {"beta": 0.0}},
    {"surgery": "imtl_g"},
    {"surgery": "nash_mtl"},
    {"surgery": "fairgrad"},
    {"surgery": "upgrad"},
    {"surgery": None, "precondition": "adam"},
    {"surgery": "pcgrad"},
)


@dataclass
class Entry:
    """One configuration's pilot runs.

    Attributes:
        config: the configuration.
        label: a short readable name.
        scores: per seed, the mean over tasks of ``(v - v_sum) / |v_sum|`` (higher is better).
        per_task: per task, the mean over seeds of its relative change.
        values: per seed, what ``evaluate`` returned.
        errors: per seed, the error of a run that raised or evaluated to a non-finite value.
        position: the configuration's place in the order it was given (the plain sum, when
            not given, after all of them): the prior that breaks ties within the noise.
    """

    config: Dict[str, Any]
    label: str
    position: int = 0
    scores: Dict[int, float] = field(default_factory=dict)
    per_task: Dict[str, float] = field(default_factory=dict)
    values: Dict[int, Dict[str, float]] = field(default_factory=dict)
    errors: Dict[int, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or not self.scores

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores.values()) if self.scores and not self.errors else -math.inf

    @property
    def std(self) -> float:
        vals = list(self.scores.values())
        return statistics.stdev(vals) if len(vals) > 1 else 0.0

    @property
    def sem(self) -> float:
        """The standard error of ``mean`` (0 with one seed)."""
        return self.std / math.sqrt(len(self.scores)) if self.scores else 0.0


class Comparison:
    """The ranking of ``compare``: highest mean score first, failed configurations last.

    ``best`` follows the one-standard-error rule of model selection (Breiman et al. 1984,
    *Classification and Regression Trees*; Hastie et al., *The Elements of Statistical
    Learning*, 7.10): among the configurations whose mean score is within one standard
    error (over seeds) of the highest mean, the first in the order they were given. Short
    pilots are noisy: on wine (``benchmarks/results/advisor_check.md``) the pilots' top
    two differed by a third of the top one's seed spread. A difference inside the noise is
    no evidence against the given order (``diagnose``'s, itself ranked by measurements
    across datasets). With one seed there is no spread and ``best`` is the top score.

    Attributes:
        ranking: the :class:`Entry` of every configuration (plain sum included), highest
            mean first.
        best: the chosen configuration (a dict for ``MultiTaskOptimizer(inner, **best)``).
        best_entry: its :class:`Entry`.
        steps: the pilot budget: steps per run.
        seeds: the pilot budget: the seeds each configuration ran with.

    Args:
        entries: every configuration's pilot runs.
        steps: steps per run.
        seeds: the seeds.
    """

    def __init__(self, entries: List[Entry], steps: int, seeds: Sequence[int]) -> None:
        self.ranking = sorted(entries, key=lambda e: (e.failed, -e.mean))
        self.steps, self.seeds = steps, list(seeds)
        self.best_entry = _within_noise_first(self.ranking)
        self.best: Dict[str, Any] = dict(self.best_entry.config)

    def __repr__(self) -> str:
        return f"Comparison(best={self.best!r}, configs={len(self.ranking)})"

    def table(self) -> str:
        """A readable table: rank, configuration, score (mean +- std, in % of the plain sum).

        Returns:
            The table as text (also what ``str(comparison)`` gives).
        """
        lines = [
            f"compare: {self.steps} steps x seeds {self.seeds}; score = mean over tasks of (v - v_sum)/|v_sum|, "
            "higher is better",
            "",
            f"{'#':>3}  {'configuration':<40}{'score %':>18}  per task %",
        ]
        for i, e in enumerate(self.ranking, 1):
            if e.failed:
                why = next(iter(e.errors.values()), "no score")
                lines.append(f"{i:>3}  {e.label[:39]:<40}{'failed':>18}  {why[:100]}")
                continue
            tasks = " ".join(f"{t}:{100 * v:+.1f}" for t, v in e.per_task.items())
            mark = "*" if e is self.best_entry else " "
            lines.append(
                f"{i:>3}{mark} {e.label[:39]:<40}{100 * e.mean:>+10.2f} ± {100 * e.std:<5.2f}  {tasks}"
            )
        top = self.ranking[0]
        if self.best_entry is not top and not top.failed:
            lines += [
                "",
                f"* best: {self.best_entry.label}, the first in the given order within one standard error "
                f"({100 * top.sem:.2f}) of the top score ({top.label})",
            ]
        return "\n".join(lines)

    __str__ = table

    def plot(self, path: Optional[str] = None) -> Any:
        """Bar chart of the scores (mean +- std over seeds; needs matplotlib).

        Args:
            path: where to save the figure; None: only return it.

        Returns:
            The matplotlib ``Figure``.

        Raises:
            ImportError: when matplotlib is not installed (names the ``plot`` extra).
        """
        plt = matplotlib_pyplot()
        ok = [e for e in self.ranking if not e.failed]
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(ok) + 1.2))
        ax.barh(
            [e.label for e in ok][::-1],
            [100 * e.mean for e in ok][::-1],
            xerr=[100 * e.std for e in ok][::-1],
            color=["tab:green" if e.mean > 0 else "tab:gray" for e in ok][::-1],
        )
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_xlabel("score vs plain sum, % (higher is better)")
        ax.set_title(f"compare: {self.steps} steps, {len(self.seeds)} seed(s)")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def compare(
    model: nn.Module,
    loss_fn: LossFn,
    train_batches: Iterable[Any],
    evaluate: Evaluate,
    configs: Optional[Union[Sequence[Mapping[str, Any]], Mapping[str, Mapping[str, Any]]]] = None,
    steps: int = 100,
    seeds: Sequence[int] = (0, 1),
    optimizer: Optional[OptimizerFactory] = None,
    *,
    partition: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> Comparison:
    """Pilot runs of each configuration from the same initial weights, scored against the plain sum.

    Args:
        model: the multi-task model at its initial weights; copied, never changed.
        loss_fn: ``loss_fn(model, batch)`` -> per-task losses (mapping or sequence).
        train_batches: a list (reshuffled per pass after the first, by seed) or a re-iterable
            loader, cycled for ``steps`` steps.
        evaluate: ``evaluate(model) -> {task: value}``, higher is better (pass a
            lower-is-better metric such as an RMSE negated); called in eval mode, no grad.
        configs: the candidates (dicts for ``MultiTaskOptimizer(inner, **config)``, e.g.
            ``diagnose(...).recommended``, or a mapping by label). The plain sum is always
            run as the reference. Default: :data:`DEFAULT_CONFIGS`.
        steps: training steps per pilot run.
        seeds: one pilot run per seed and configuration (seeds torch, ``random``, NumPy,
            the optimizer's own generator and the list's reshuffles).
        optimizer: builds the inner optimizer from parameters (default ``Adam(lr=1e-3)``).
        partition: ``{"shared": params, "tasks": {...}}`` of ``model`` when the first batch
            may lack a task (a config's own ``shared``/``tasks`` win).
        progress: show a progress bar.

    Returns:
        A :class:`Comparison`: ``ranking`` (mean +- std over seeds), ``best`` (the first of
        ``configs``, in their order, whose mean is within one standard error of the top
        mean: give them best first, as ``diagnose`` does), ``table()``, ``plot()``. A
        configuration that raises is ranked last with its error.

    Raises:
        ValueError: for ``steps < 1``, no seeds, or a ``configs`` entry that is not a mapping.
        RuntimeError: when the plain sum itself fails (nothing can be scored).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    entries = _entries(configs)
    bar = Progress(len(entries) * len(seeds), "compare", progress)
    try:
        for seed in seeds:
            for entry in entries:
                _pilot(entry, model, loss_fn, train_batches, evaluate, steps, seed, optimizer, partition)
                bar.update(entry.label)
    finally:
        bar.close()
    _score(entries, seeds)
    return Comparison(entries, steps, seeds)


def _within_noise_first(ranking: List[Entry]) -> Entry:
    """The first entry in the given order whose mean is within one standard error of the top's."""
    top = ranking[0]
    if top.failed:
        return top
    close = [e for e in ranking if not e.failed and e.mean >= top.mean - top.sem]
    return min(close, key=lambda e: e.position)


def _entries(configs: Any) -> List[Entry]:
    if configs is None:
        configs = DEFAULT_CONFIGS
    items = list(configs.items()) if isinstance(configs, Mapping) else [(None, c) for c in configs]
    entries = [Entry(dict(PLAIN_SUM), "sum (reference)", position=len(items))]
    for position, (label, config) in enumerate(items):
        if not isinstance(config, Mapping):
            raise ValueError(
                f"configs entry {label or config!r} is not a mapping of MultiTaskOptimizer arguments"
            )
        if _is_plain_sum(config):
            entries[0].position = min(entries[0].position, position)
            continue
        entries.append(
            Entry(dict(config), str(label) if label is not None else describe(config), position=position)
        )
    return entries


def _is_plain_sum(config: Mapping[str, Any]) -> bool:
    return {k: v for k, v in config.items() if v is not None} == {}


def _pilot(
    entry: Entry,
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    evaluate: Evaluate,
    steps: int,
    seed: int,
    optimizer: Optional[OptimizerFactory],
    partition: Optional[Mapping[str, Any]],
) -> None:
    """One pilot run, its evaluation or its error recorded in ``entry``."""
    with isolated_rng(seed):
        twin, memo = private_copy(model)
        twin.train()
        try:
            config = translate(entry.config, memo)
            if "shared" not in config and partition:
                config.update(translate(partition, memo))
            opt: Optional[MultiTaskOptimizer] = None
            for n, batch in enumerate(Cycle(batches, shuffle_seed=seed)):
                if n >= steps:
                    break
                losses = task_losses(loss_fn(twin, batch))
                if opt is None:
                    extra = {} if "shared" in config else {"task_names": list(losses)}
                    inner = (optimizer or default_optimizer)(twin.parameters())
                    opt = MultiTaskOptimizer(inner, seed=seed, **extra, **config)
                opt.zero_grad()
                opt.step(losses)
            twin.eval()
            with torch.no_grad():
                values = {str(k): float(v) for k, v in evaluate(twin).items()}
        except Exception as exc:  # a failing candidate is a result, not the end of the comparison
            entry.errors[seed] = f"{type(exc).__name__}: {exc}"
            return
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        entry.errors[seed] = f"non-finite evaluation for {bad}"
    entry.values[seed] = values


def _score(entries: List[Entry], seeds: Sequence[int]) -> None:
    ref = entries[0]
    if ref.errors:
        raise RuntimeError(f"the plain sum (the reference) failed: {next(iter(ref.errors.values()))}")
    for entry in entries:
        rel: Dict[str, List[float]] = {}
        for seed in seeds:
            if seed in entry.errors or seed not in entry.values:
                continue
            values, base = entry.values[seed], ref.values[seed]
            if set(values) != set(base):
                entry.errors[seed] = (
                    f"evaluate returned tasks {sorted(values)}, the plain sum's were {sorted(base)}"
                )
                continue
            changes = {t: (values[t] - base[t]) / max(abs(base[t]), 1e-12) for t in base}
            entry.scores[seed] = statistics.fmean(changes.values())
            for t, v in changes.items():
                rel.setdefault(t, []).append(v)
        entry.per_task = {t: statistics.fmean(v) for t, v in rel.items()}
