"""Statistics and reports of the quality benchmark: Delta_m%, the JSON sections, Markdown tables.

Delta_m% (Maninis et al. 2019; as used by Liu et al. 2021 and later work) is the mean
relative change of each task's metric against the single-task baseline, signed so that
**lower is better** (negative: the multi-task model beats the single-task models)::

    Delta_m% = 100 / T * sum_t (-1)^{l_t} (M_t - M_single_t) / M_single_t,
    l_t = 1 if higher is better for task t's metric, else 0.

``M_single_t`` is the single-task metric averaged over seeds; Delta_m% is computed per
seed and then summarised as mean +- sample std.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .quality_data import TOY_STARTS, toy_pareto_front, toy_pareto_set
from .quality_methods import METHODS
from .quality_suites import SUITES, ZERO, Suite, ToyConfig


def delta_m(
    metrics: Mapping[str, float], baseline: Mapping[str, float], higher_is_better: Mapping[str, bool]
) -> float:
    """Delta_m% = 100/T sum_t (-1)^{l_t} (M_t - B_t) / B_t, l_t = 1 if higher is better.

    Lower is better; negative means the multi-task model beats the baseline on average.

    Raises:
        ValueError: if the tasks differ or a baseline value is 0.
    """
    if set(metrics) != set(baseline) or set(metrics) != set(higher_is_better):
        raise ValueError(
            f"delta_m: tasks differ: {sorted(metrics)} / {sorted(baseline)} / {sorted(higher_is_better)}"
        )
    if not metrics:
        raise ValueError("delta_m: no tasks")
    total = 0.0
    for task, value in metrics.items():
        base = baseline[task]
        if base == 0:
            raise ValueError(f"delta_m: baseline of task {task!r} is 0")
        sign = -1.0 if higher_is_better[task] else 1.0
        total += sign * (value - base) / base
    return 100.0 * total / len(metrics)


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def _label(name: str) -> str:
    """A method's label; ``@zero`` runs (absent tasks as zero losses) say so."""
    base = METHODS[name.removesuffix(ZERO)].label
    return base + " (absent tasks as zero losses)" if name.endswith(ZERO) else base


def _mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _single_task(suite: Suite, runs: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    single: Dict[str, Dict[str, Any]] = {}
    for t, task in enumerate(suite.tasks):
        rs = [r for r in runs if r["method"] == f"single:{t}"]
        single[task] = {m.name: mean_std([r["metrics"][task][m.name] for r in rs]) for m in suite.metrics} | {
            "per_seed": {str(r["seed"]): r["metrics"][task] for r in rs}
        }
    return single


def _method_section(
    suite: Suite, name: str, rs: Sequence[Mapping[str, Any]], baseline: Mapping[str, float]
) -> Dict[str, Any]:
    tasks = suite.tasks
    higher = {task: suite.primary.higher_is_better for task in tasks}
    per_seed = []
    for r in rs:
        prim = {task: r["metrics"][task][suite.primary.name] for task in tasks}
        entry = {k: v for k, v in r.items() if k not in ("suite", "method")}
        entry["delta_m"] = delta_m(prim, baseline, higher)
        per_seed.append(entry)
    summary = {
        task: {m.name: mean_std([p["metrics"][task][m.name] for p in per_seed]) for m in suite.metrics}
        for task in tasks
    }
    return {
        "label": _label(name),
        "options": METHODS[name.removesuffix(ZERO)].options(),
        "summary": summary,
        "delta_m": mean_std([p["delta_m"] for p in per_seed]),
        "ms_per_step": statistics.fmean(p["ms_per_step"] for p in per_seed),
        "conflict_fraction": _mean_or_none([p.get("conflict_fraction") for p in per_seed]),
        "per_seed": per_seed,
    }


def summarise_suite(
    suite: Suite, runs: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> Dict[str, Any]:
    """Group the runs of one supervised suite into the JSON section (with Delta_m%)."""
    single = _single_task(suite, runs)
    baseline = {task: single[task][suite.primary.name]["mean"] for task in suite.tasks}
    out_methods: Dict[str, Any] = {}
    for name in methods:
        rs = sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"])
        if rs:
            out_methods[name] = _method_section(suite, name, rs, baseline)
    return {
        "title": suite.title,
        "not_run": {name: suite.unsupported[name] for name in methods if name in suite.unsupported},
        "tasks": suite.tasks,
        "primary_metric": asdict(suite.primary),
        "metrics": [asdict(m) for m in suite.metrics],
        "seeds": sorted({r["seed"] for r in runs}),
        "single_task": single,
        "methods": out_methods,
    }


def summarise_toy(
    runs: Sequence[Mapping[str, Any]], methods: Sequence[str], toy: ToyConfig
) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in methods:
        rs = sorted(
            (r for r in runs if r["method"] == name), key=lambda r: TOY_STARTS.index(tuple(r["start"]))
        )
        if not rs:
            continue
        out[name] = {
            "label": METHODS[name].label,
            "reached": sum(1 for r in rs if r["reached_pareto"]),
            "runs": [{k: v for k, v in r.items() if k not in ("suite", "method")} for r in rs],
        }
    return {
        "title": "Conflict toy (CAGrad paper, 2-D parameter, inner Adam)",
        "starts": [list(s) for s in TOY_STARTS],
        "steps": toy.steps,
        "lr": toy.lr,
        "tolerance": toy.tolerance,
        "pareto_set": [list(p) for p in toy_pareto_set()],
        "pareto_front": [list(p) for p in toy_pareto_front()],
        "methods": out,
    }


# ---------------------------------------------------------------------- tables


def _pm(stat: Mapping[str, float], digits: int = 2, scale: float = 1.0) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _fmt_metric(metric: str, stat: Mapping[str, float]) -> str:
    if metric == "accuracy":
        return _pm(stat, 2, 100.0)
    if metric == "nmse":
        return f"{stat['mean']:.3g} ± {stat['std']:.2g}"
    return _pm(stat, 3)


def suite_table(section: Mapping[str, Any]) -> str:
    """Markdown table: per-task metrics and Delta_m% (mean ± std), one row per method."""
    tasks = section["tasks"]
    metrics = [m["name"] for m in section["metrics"]]
    unit = {"accuracy": "acc. %", "loss": "loss", "nmse": "MSE/σ²"}
    head = [f"{t} {unit.get(m, m)}" for t in tasks for m in metrics]
    lines = [
        "| method | " + " | ".join(head) + " | Δm% ↓ | conflict % | ms/step |",
        "|---|" + "---:|" * (len(head) + 3),
    ]
    single = section["single_task"]
    cells = [_fmt_metric(m, single[t][m]) for t in tasks for m in metrics]
    lines.append("| single-task baselines | " + " | ".join(cells) + " | 0 (reference) | | |")
    for entry in section["methods"].values():
        cells = [_fmt_metric(m, entry["summary"][t][m]) for t in tasks for m in metrics]
        conflict = entry.get("conflict_fraction")
        conflict_s = f"{100 * conflict:.0f}" if conflict is not None else ""
        lines.append(
            f"| {entry['label']} | "
            + " | ".join(cells)
            + f" | {_pm(entry['delta_m'], 2)} | {conflict_s} | {entry['ms_per_step']:.1f} |"
        )
    return "\n".join(lines)


def toy_table(section: Mapping[str, Any]) -> str:
    starts = section["starts"]
    head = [f"({s[0]:g}, {s[1]:g})" for s in starts]
    lines = [
        "| method | " + " | ".join(head) + " | reached Pareto set |",
        "|---|" + "---|" * len(head) + "---:|",
    ]
    for entry in section["methods"].values():
        by_start = {tuple(r["start"]): r for r in entry["runs"]}
        cells = []
        for s in starts:
            r = by_start.get(tuple(s))
            if r is None:
                cells.append("")
                continue
            mark = "✓" if r["reached_pareto"] else "✗"
            cells.append(f"{r['losses'][0]:.2f}, {r['losses'][1]:.2f} {mark}")
        lines.append(
            f"| {entry['label']} | " + " | ".join(cells) + f" | {entry['reached']}/{len(entry['runs'])} |"
        )
    return "\n".join(lines)


def _toy_part(section: Mapping[str, Any]) -> str:
    return (
        f"### {section['title']}\n\nFinal (L1, L2) from each start, {section['steps']} steps of "
        f"Adam(lr={section['lr']:g}) on the 2-D point; ✓ = the final (L1, L2) is within "
        f"{section['tolerance']:g} of the Pareto front (Euclidean, loss space).\n\n" + toy_table(section)
    )


def _suite_part(section: Mapping[str, Any]) -> str:
    seeds = len(section["seeds"])
    return (
        f"### {section['title']}\n\nTest metrics, mean ± std over {seeds} seed(s); "
        "Δm% against the single-task baselines (lower is better). "
        "conflict % = share of steps×task pairs whose gradients on the shared trunk have a "
        "negative inner product (for MGDA-UB: on the shared features).\n\n"
        + suite_table(section)
        + "".join(f"\n\nNot run here: {_label(n)}: {why}." for n, why in section.get("not_run", {}).items())
    )


def report(doc: Mapping[str, Any]) -> str:
    """The Markdown report: one part per suite run."""
    parts: List[str] = []
    for name in SUITES:
        section = doc["suites"].get(name)
        if section is not None:
            parts.append(_toy_part(section) if name == "toy" else _suite_part(section))
    return "\n\n".join(parts)


_NUMBER_LIST = re.compile(
    r"\[\s*((?:-?[0-9][0-9.eE+-]*|true|false|null)(?:,\s*(?:-?[0-9][0-9.eE+-]*|true|false|null))*)\s*\]"
)


def dumps(doc: Any) -> str:
    """JSON with an indent, but every innermost list of numbers on one line."""
    text = json.dumps(doc, indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
