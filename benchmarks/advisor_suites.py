"""The advisor on the generated suites its rules were drawn from (:mod:`benchmarks.quality`).

For each supervised suite (MultiDigits: two classifications at similar scales; scale
imbalance: four regressions whose losses are up to 10^6 apart) and seed,
``advisor.diagnose`` runs on the suite's training data with the suite's inner optimizer
(Adam at its learning rate) and ``horizon`` = the suite's training steps; its
measurements (ratios, conflicts, losses approaching 0) and its shortlist are placed among
the suite's committed rows (Delta_m% of ``benchmarks/results/quality_wave2.json``, with
the rows of ``quality_rows.json`` where it holds them: the DB-MTL / MoCo settings for
Adam and ExcessMTL as it is now). A change of the rules has to hold here, where the
rules came from, and on the real data of :mod:`benchmarks.advisor_check`.

    python -m benchmarks.advisor_suites --seeds 2 --out benchmarks/results

Writes ``advisor_suites.json`` and ``advisor_suites.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from multitask_optim.advisor import describe, diagnose

from .common import DEFAULT_OUT, RESULTS, machine_info
from .quality_grid import same_config
from .quality_methods import METHODS, MethodContext, MethodSettings
from .quality_train import Config

SUITES = ("multidigits", "scale")
#: the committed quality results the shortlist is ranked in (a later file's rows win)
ROWS = ("quality_wave2.json", "quality_rows.json")


def suite_rows(results: Path, suite: str) -> Dict[str, Dict[str, Any]]:
    """``{method: {"delta_m": mean, "kwargs": MultiTaskOptimizer arguments}}`` of ``suite``."""
    rows: Dict[str, Dict[str, Any]] = {}
    for name in ROWS:
        doc = json.loads((results / name).read_text())
        section = doc["suites"].get(suite, {})
        k = len(section.get("tasks", []))
        for method, entry in section.get("methods", {}).items():
            if method not in METHODS or METHODS[method].inner != "adam" or not entry.get("delta_m"):
                continue
            try:
                ctx = MethodContext(num_tasks=k, settings=MethodSettings(), first_losses=(1.0,) * k)
                kwargs = METHODS[method].optimizer_kwargs(ctx)
            except ValueError:  # needs the model (GradNorm's layer): never on a shortlist
                continue
            rows[method] = {"delta_m": float(entry["delta_m"]["mean"]), "kwargs": kwargs}
    return rows


def _comparable(config: Dict[str, Any]) -> Dict[str, Any]:
    """A config as the suites run it: they close epochs themselves (no ``steps_per_epoch``)."""
    out = dict(config)
    for key in ("weighting_kwargs", "surgery_kwargs"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k != "steps_per_epoch"} or None
    return out


def rank_in(rows: Dict[str, Dict[str, Any]], config: Dict[str, Any]) -> Tuple[Optional[int], Optional[str]]:
    """The rank (1 = lowest Delta_m%) and row name of ``config`` among ``rows`` (None: not run)."""
    order = sorted(rows, key=lambda n: rows[n]["delta_m"])
    for rank, name in enumerate(order, 1):
        if same_config(_comparable(rows[name]["kwargs"]), _comparable(config)):
            return rank, name
    return None, None


def diagnose_suite(suite_name: str, seed: int, steps: int) -> Dict[str, Any]:
    """``diagnose`` on one suite's training data for ``seed``."""
    torch.set_num_threads(1)
    suite = Config().suite(suite_name)
    data = suite.data(seed)
    torch.manual_seed(seed)
    model = suite.model()
    gen = torch.Generator().manual_seed(10_007 * (seed + 1))
    per_epoch = math.ceil(data["x_train"].shape[0] / suite.batch)
    batches = []
    for _, idx in suite.batches(data, gen):
        batches.append((data["x_train"][idx], data["y_train"][idx]))
        if len(batches) == per_epoch:
            break

    def loss_fn(m: torch.nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x, y = batch
        _, outs = m(x)
        return dict(zip(suite.tasks, suite.losses(outs, y)))

    report = diagnose(
        model,
        loss_fn,
        batches,
        steps=steps,
        optimizer=lambda p: torch.optim.Adam(p, lr=suite.lr),
        horizon=max(per_epoch * suite.epochs, steps),
        seed=seed,
        progress=False,
    )
    s = report.summary
    return {
        "suite": suite_name,
        "seed": seed,
        "loss_ratio": s["loss_ratio"],
        "grad_ratio": s["grad_ratio"],
        "conflict_fraction": s["conflict_fraction"],
        "approaching_zero": [t for t, e in s["tasks"].items() if e["approaches_zero"]],
        "recommended": [dict(r) for r in report.recommended],
        "ruled_out": sorted(report.warnings),
        "report": str(report),
    }


def markdown(runs: Sequence[Dict[str, Any]], rows: Dict[str, Dict[str, Dict[str, Any]]]) -> str:
    lines = [
        "| suite | seed | loss / gradient ratio | conflicts | approaching 0 | shortlist (rank of N by Δm%) |",
        "|---|---:|---|---:|---|---|",
    ]
    for r in runs:
        table = rows[r["suite"]]
        picks = []
        for config in r["recommended"]:
            rank, name = rank_in(table, config)
            picks.append(f"{describe(config)} #{rank if rank else '—'}")
        lines.append(
            f"| {r['suite']} | {r['seed']} | {r['loss_ratio']:.3g} / {r['grad_ratio']:.3g} | "
            f"{100 * r['conflict_fraction']:.0f}% | {', '.join(r['approaching_zero']) or 'none'} | "
            f"{'; '.join(picks)} (N = {len(table)}) |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.advisor_suites", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--suites", default=",".join(SUITES))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=100, help="diagnose's steps")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--rows", type=Path, default=RESULTS, help="folder of the committed quality results")
    args = p.parse_args(argv)
    suites = [s for s in args.suites.split(",") if s]
    runs: List[Dict[str, Any]] = []
    for suite in suites:
        for seed in range(args.seeds):
            runs.append(diagnose_suite(suite, seed, args.steps))
            print(f"{suite} seed {seed}: {runs[-1]['recommended']}", file=sys.stderr, flush=True)
    rows = {s: suite_rows(args.rows, s) for s in suites}
    doc = {"benchmark": "advisor_suites", "steps": args.steps, "runs": runs, "machine": machine_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "advisor_suites.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "advisor_suites.md").write_text(markdown(runs, rows) + "\n")
    print(markdown(runs, rows))


if __name__ == "__main__":
    main()
