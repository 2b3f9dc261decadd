"""The advisor checked on real data: every configuration the library offers, ranked on a test split.

For each real dataset of :mod:`benchmarks.quality_real` and each seed:

1. **grid**: train every configuration of :func:`benchmarks.quality_grid.grid` (and
   single-task baselines) on the training split and score it on the held-out test split:
   Delta_m% against the single-task baselines (lower is better) and, per task, whether
   it beats the trivial predictor (training mean / majority class);
2. **advisor**: on the training split only, ``advisor.diagnose`` (its first pick) and
   ``advisor.compare`` over the recommended shortlist, scored on a validation part carved
   out of the training split (its best);
3. **rank** both picks among all configurations by the grid's mean Delta_m% over seeds.

    python -m benchmarks.advisor_check --datasets penguins --seeds 3 --out benchmarks/results
    python -m benchmarks.advisor_check --datasets wine,diabetes --seeds 3 --out benchmarks/results

Writes ``advisor_check.json`` and ``advisor_check.md`` (merged with the datasets already
there) in ``--out``. Training: Adam(lr 1e-2), batch 32, 300 steps, an MLP trunk of two
64-wide layers with one linear head per task.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from multitask_optim import MultiTaskOptimizer
from multitask_optim.advisor import describe

from . import quality_real as R
from .common import DEFAULT_OUT, machine_info
from .quality_grid import GridContext, grid, same_config
from .quality_report import delta_m, dumps, mean_std


@dataclass(frozen=True)
class Budget:
    """The training budget of every run (recorded in the JSON)."""

    steps: int = 300
    batch: int = 32
    lr: float = 1e-2
    width: int = 64
    depth: int = 2
    #: diagnose: steps of plain-sum training measured
    diagnose_steps: int = 100
    #: compare: steps per pilot run, seeds, and the validation share of the training split
    compare_steps: int = 150
    compare_seeds: int = 2
    validation: float = 0.25


def _epochs(data: R.Split, budget: Budget, seed: int):  # type: ignore[no-untyped-def]
    """Mini-batches for ``budget.steps`` steps, a fresh shuffle per epoch."""
    epoch = 0
    while True:
        yield from R.batches(data, budget.batch, 1_000 * seed + epoch)
        epoch += 1


def _model(table: R.Table, budget: Budget, seed: int) -> R.TabularNet:
    torch.manual_seed(seed)
    return R.TabularNet(table.x.shape[1], table.tasks, budget.width, budget.depth)


def context(table: R.Table, train: R.Split, model: R.TabularNet, budget: Budget) -> GridContext:
    """The grid's context: tasks, kinds, budget and the first batch's losses at init."""
    first = next(iter(_epochs(train, budget, 0)))
    with torch.no_grad():
        losses = R.loss_fn(table.tasks)(model, first)
    return GridContext(
        tasks=tuple(t.name for t in table.tasks),
        kinds=tuple("regression" if t.regression else "classification" for t in table.tasks),
        total_steps=budget.steps,
        steps_per_epoch=math.ceil(len(train) / budget.batch),
        first_losses=tuple(float(v) if v is not None else 1.0 for v in losses.values()),
        last_shared=model.last_shared,
    )


def train_config(table: R.Table, train: R.Split, config: Any, budget: Budget, seed: int, steps: int):  # type: ignore[no-untyped-def]
    """Train a fresh seeded model with ``config`` (a dict, or a grid builder); returns the model."""
    model = _model(table, budget, seed)
    if callable(config):
        config = config(context(table, train, model, budget))
    inner = torch.optim.Adam(model.parameters(), lr=budget.lr)
    tasks = {t.name: list(h.parameters()) for t, h in zip(table.tasks, model.heads)}
    opt = MultiTaskOptimizer(inner, shared=list(model.trunk.parameters()), tasks=tasks, seed=seed, **config)
    fn = R.loss_fn(table.tasks)
    for step, batch in enumerate(_epochs(train, budget, seed)):
        if step >= steps:
            break
        losses = fn(model, batch)
        opt.zero_grad()
        opt.step(losses)
    return model


def _single(table: R.Table, train: R.Split, test: R.Split, t: int, budget: Budget, seed: int) -> float:
    model = _model(table, budget, seed)
    inner = torch.optim.Adam([*model.trunk.parameters(), *model.heads[t].parameters()], lr=budget.lr)
    task = table.tasks[t]
    for step, (x, ys) in enumerate(_epochs(train, budget, seed)):
        if step >= budget.steps:
            break
        _, outs = model(x)
        loss = R.task_losses([outs[t]], [ys[t]], [task])[task.name]
        if loss is None:
            continue
        inner.zero_grad()
        loss.backward()
        inner.step()
    return R.evaluate(model, test, table.tasks)[task.name]


def grid_run(dataset: str, name: str, seed: int, budget: Budget) -> Dict[str, Any]:
    """One cell of the grid: config ``name`` (or ``single:<t>``) on ``dataset`` for ``seed``."""
    torch.set_num_threads(1)
    table = R.TABLES[dataset]()
    train, test = R.split(table, seed)
    t0 = time.perf_counter()
    if name.startswith("single:"):
        t = int(name.split(":")[1])
        return {
            "dataset": dataset,
            "name": name,
            "seed": seed,
            "value": _single(table, train, test, t, budget, seed),
        }
    builder = dict(grid(len(table.tasks)))[name]
    config = builder(context(table, train, _model(table, budget, seed), budget))
    out: Dict[str, Any] = {"dataset": dataset, "name": name, "seed": seed, "config": _jsonable(config)}
    try:
        model = train_config(table, train, builder, budget, seed, budget.steps)
        out["metrics"] = R.evaluate(model, test, table.tasks)
    except Exception as exc:  # a crash is a result: reported, never fatal
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = time.perf_counter() - t0
    return out


def _jsonable(config: Dict[str, Any]) -> Dict[str, Any]:
    """The config without parameter lists (GradNorm's layer), for the JSON."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            value = {k: ("<last shared layer>" if k == "layer" else v) for k, v in value.items()}
        out[key] = value
    return out


def run_pool(jobs: Sequence[Tuple[Any, ...]], fn: Any, workers: int) -> List[Dict[str, Any]]:
    """Run ``fn(*job)`` for every job in ``workers`` processes, printing progress to stderr."""
    results: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    if workers <= 1:
        for n, job in enumerate(jobs):
            results.append(fn(*job))
            print(
                f"[{n + 1}/{len(jobs)}] {job[:3]} {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        return results
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fn, *job): job for job in jobs}
        for n, fut in enumerate(as_completed(futures)):
            results.append(fut.result())
            print(
                f"[{n + 1}/{len(jobs)}] {futures[fut][:3]} {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    return results


# ---------------------------------------------------------------------- the grid's summary


def summarise_grid(dataset: str, runs: Sequence[Dict[str, Any]], seeds: Sequence[int]) -> Dict[str, Any]:
    """Per configuration: Delta_m% (mean +- std over seeds), crashes, tasks worse than trivial."""
    table = R.TABLES[dataset]()
    names = [t.name for t in table.tasks]
    higher = dict(R.metric_direction(table.tasks))
    single = {
        n: statistics.fmean(r["value"] for r in runs if r["name"] == f"single:{t}")
        for t, n in enumerate(names)
    }
    trivial = {
        n: statistics.fmean(R.trivial(*R.split(table, s), table.tasks)[n] for s in seeds) for n in names
    }
    configs: Dict[str, Any] = {}
    for r in runs:
        if r["name"].startswith("single:"):
            continue
        entry = configs.setdefault(r["name"], {"config": r["config"], "per_seed": {}, "errors": {}})
        if "error" in r:
            entry["errors"][str(r["seed"])] = r["error"]
        else:
            entry["per_seed"][str(r["seed"])] = r["metrics"]
    for entry in configs.values():
        values = list(entry["per_seed"].values())
        finite = [v for v in values if all(math.isfinite(x) for x in v.values())]
        entry["crashed"] = bool(entry["errors"]) or len(finite) < len(values)
        deltas = [delta_m(v, single, higher) for v in finite]
        entry["delta_m"] = mean_std(deltas) if deltas and not entry["crashed"] else None
        means = {n: statistics.fmean(v[n] for v in finite) for n in names} if finite else {}
        entry["mean_metrics"] = means
        entry["worse_than_trivial"] = [
            n for n in names if means and not R.better(table.tasks[names.index(n)], means[n], trivial[n])
        ]
    ranked = sorted(configs, key=lambda n: _sort_key(configs[n]))
    for rank, name in enumerate(ranked, 1):
        configs[name]["rank"] = rank
    return {
        "title": table.title,
        "tasks": names,
        "metrics": {t.name: t.metric for t in table.tasks},
        "seeds": list(seeds),
        "single_task": single,
        "trivial": trivial,
        "configs": {n: configs[n] for n in ranked},
    }


def _sort_key(entry: Dict[str, Any]) -> Tuple[int, float]:
    """Crashed configurations last; then by mean Delta_m% (lower is better)."""
    if entry["delta_m"] is None:
        return (1, math.inf)
    return (0, entry["delta_m"]["mean"])


def rank_of(section: Dict[str, Any], config: Dict[str, Any]) -> Optional[int]:
    """The grid rank of ``config`` (None when the grid does not hold it)."""
    for entry in section["configs"].values():
        if same_config(entry["config"], _jsonable(config)):
            return int(entry["rank"])
    return None


def grid_jobs(dataset: str, seeds: Sequence[int], budget: Budget) -> List[Tuple[Any, ...]]:
    k = len(R.TABLES[dataset]().tasks)
    names = [n for n, _ in grid(k)] + [f"single:{t}" for t in range(k)]
    return [(dataset, n, s, budget) for s in seeds for n in names]


def grid_table(section: Dict[str, Any]) -> str:
    """Markdown: one row per configuration, best first."""
    tasks = section["tasks"]
    head = " | ".join(f"{t} {section['metrics'][t]}" for t in tasks)
    lines = [
        f"| rank | configuration | {head} | Δm% ↓ | note |",
        "|---:|---|" + "---:|" * len(tasks) + "---:|---|",
    ]
    ref = " | ".join(f"{section['single_task'][t]:.4g}" for t in tasks)
    triv = " | ".join(f"{section['trivial'][t]:.4g}" for t in tasks)
    lines.append(f"| | single-task baselines | {ref} | 0 | |")
    lines.append(f"| | trivial predictors (mean / majority) | {triv} | | |")
    for name, e in section["configs"].items():
        cells = " | ".join(f"{e['mean_metrics'][t]:.4g}" if t in e["mean_metrics"] else "" for t in tasks)
        dm = f"{e['delta_m']['mean']:.2f} ± {e['delta_m']['std']:.2f}" if e["delta_m"] else "—"
        note = "crashed: " + next(iter(e["errors"].values()))[:80] if e["errors"] else ""
        if not e["errors"] and e["crashed"]:
            note = "non-finite"
        if e["worse_than_trivial"]:
            note = (note + "; " if note else "") + "worse than trivial: " + ", ".join(e["worse_than_trivial"])
        lines.append(f"| {e['rank']} | {name} | {cells} | {dm} | {note} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line


def _load(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.advisor_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--datasets", default="penguins,wine,diabetes")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--phase", choices=("grid", "advisor", "all"), default="all")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    budget, seeds = Budget(), list(range(args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "advisor_check.json"
    doc = _load(path) or {"benchmark": "advisor_check", "datasets": {}}
    doc["budget"] = asdict(budget)
    doc.pop("machine", None)  # per phase: the grid and the advisor may be measured at different commits
    for dataset in [d for d in args.datasets.split(",") if d]:
        section = doc["datasets"].setdefault(dataset, {})
        if args.phase in ("grid", "all"):
            t0 = time.perf_counter()
            runs = run_pool(grid_jobs(dataset, seeds, budget), grid_run, args.workers)
            (args.out / f"advisor_grid_runs_{dataset}.json").write_text(json.dumps(runs) + "\n")
            section["grid"] = summarise_grid(dataset, runs, seeds)
            section["grid"]["wall_seconds"] = time.perf_counter() - t0
            section["grid"]["machine"] = machine_info(workers=args.workers, threads_per_worker=1)
        if args.phase in ("advisor", "all"):
            t0 = time.perf_counter()
            section["advisor"] = advisor_section(dataset, seeds, budget, section["grid"], args.workers)
            section["advisor"]["wall_seconds"] = time.perf_counter() - t0
            section["advisor"]["machine"] = machine_info(workers=args.workers, threads_per_worker=1)
        path.write_text(dumps(doc) + "\n")
        (args.out / "advisor_check.md").write_text(markdown(doc) + "\n")
        print(f"{dataset}: written to {path}", file=sys.stderr)


def _partition(model: R.TabularNet, table: R.Table) -> Dict[str, Any]:
    return {
        "shared": list(model.trunk.parameters()),
        "tasks": {t.name: list(h.parameters()) for t, h in zip(table.tasks, model.heads)},
    }


def advisor_seed(dataset: str, seed: int, budget: Budget) -> Dict[str, Any]:
    """diagnose and compare on the training split of ``seed`` (compare scores on a validation part)."""
    from multitask_optim.advisor import compare, diagnose

    torch.set_num_threads(1)
    table = R.TABLES[dataset]()
    train, _ = R.split(table, seed)
    gen = torch.Generator().manual_seed(7_000_001 * (seed + 1))
    perm = torch.randperm(len(train), generator=gen)
    cut = int(round((1.0 - budget.validation) * len(train)))
    fit, val = train.take(perm[:cut]), train.take(perm[cut:])
    model = _model(table, budget, seed)
    fn = R.loss_fn(table.tasks)

    def inner(params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=budget.lr)

    def evaluate(m: Any) -> Dict[str, float]:
        values = R.evaluate(m, val, table.tasks)
        return {t.name: R.signed(t, values[t.name]) for t in table.tasks}

    part = _partition(model, table)
    t0 = time.perf_counter()
    report = diagnose(
        model,
        fn,
        R.batches(train, budget.batch, seed),
        steps=budget.diagnose_steps,
        optimizer=inner,
        horizon=budget.steps,
        partition=part,
        seed=seed,
        progress=False,
    )
    t1 = time.perf_counter()
    result = compare(
        model,
        fn,
        R.batches(fit, budget.batch, seed),
        evaluate,
        configs=report.recommended,
        steps=budget.compare_steps,
        seeds=range(budget.compare_seeds),
        optimizer=inner,
        partition=part,
        progress=False,
    )
    t2 = time.perf_counter()
    return {
        "dataset": dataset,
        "seed": seed,
        "report": str(report),
        "summary": report.summary,
        "recommended": [dict(r) for r in report.recommended],
        "reasons": [r.reason for r in report.recommended],
        "warnings": report.warnings,
        "first_pick": dict(report.recommended[0]),
        "compare_table": result.table(),
        "compare_best": dict(result.best),
        "diagnose_seconds": t1 - t0,
        "compare_seconds": t2 - t1,
    }


def advisor_section(
    dataset: str, seeds: Sequence[int], budget: Budget, grid_section: Dict[str, Any], workers: int = 1
) -> Dict[str, Any]:
    """Both picks per seed and their ranks in the grid; every recommended config checked."""
    runs = sorted(
        run_pool([(dataset, s, budget) for s in seeds], advisor_seed, workers), key=lambda r: r["seed"]
    )
    n = len(grid_section["configs"])
    for r in runs:
        r["first_pick_rank"] = rank_of(grid_section, r["first_pick"])
        r["compare_best_rank"] = rank_of(grid_section, r["compare_best"])
        r["recommended_ranks"] = [rank_of(grid_section, c) for c in r["recommended"]]
    problems = []
    for r in runs:
        for c, rank in zip(r["recommended"], r["recommended_ranks"]):
            entry = _entry_at(grid_section, rank)
            if entry is None:
                problems.append(f"seed {r['seed']}: {describe(c)} is not in the grid")
            elif entry["crashed"] or entry["worse_than_trivial"]:
                problems.append(
                    f"seed {r['seed']}: {describe(c)} crashed or worse than trivial on {entry['worse_than_trivial']}"
                )
    quartile = math.ceil(n / 4)
    return {
        "configs_ranked": n,
        "top_quartile": quartile,
        "runs": runs,
        "problems": problems,
    }


def _entry_at(section: Dict[str, Any], rank: Optional[int]) -> Optional[Dict[str, Any]]:
    for entry in section["configs"].values():
        if entry["rank"] == rank:
            return entry
    return None


def validation_table(doc: Dict[str, Any]) -> str:
    """Markdown: per dataset, the rank of diagnose's first pick and compare's best per seed."""
    lines = [
        "| dataset | N | top quartile | diagnose's first pick (rank per seed) | compare's best (rank per seed) | recommended: crashed / worse than trivial |",
        "|---|---:|---:|---|---|---|",
    ]
    for dataset, section in doc["datasets"].items():
        adv = section.get("advisor")
        if adv is None:
            continue
        firsts = "; ".join(f"{describe(r['first_pick'])} #{r['first_pick_rank']}" for r in adv["runs"])
        bests = "; ".join(f"{describe(r['compare_best'])} #{r['compare_best_rank']}" for r in adv["runs"])
        lines.append(
            f"| {dataset} | {adv['configs_ranked']} | ≤ {adv['top_quartile']} | {firsts} | {bests} | "
            f"{'; '.join(adv['problems']) or 'none'} |"
        )
    return "\n".join(lines)


def markdown(doc: Dict[str, Any]) -> str:
    parts = ["## The advisor's picks among every configuration (test split)\n\n" + validation_table(doc)]
    for section in doc["datasets"].values():
        if "grid" in section:
            g = section["grid"]
            parts.append(
                f"### {g['title']}\n\nseeds {g['seeds']}; test split; wall {g.get('wall_seconds', 0):.0f} s\n\n"
                + grid_table(g)
            )
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
