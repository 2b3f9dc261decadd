"""Training quality of every method: MultiDigits, scale imbalance and the conflict toy.

Trains and evaluates, for several seeds, each loss weighting, gradient surgery and
per-task preconditioning of ``multitask_optim`` (and useful combinations) on three
suites, plus single-task baselines on the same architecture, and reports per-task test
metrics and Delta_m% as mean +- std over seeds:

    python -m benchmarks.quality                         # default grid, < 5 minutes on 2 CPU cores
    python -m benchmarks.quality --out benchmarks/results  # the README's committed figures
    python -m benchmarks.quality --full                  # more seeds, longer training, more methods
    python -m benchmarks.quality --quick                 # seconds-long smoke run of the whole pipeline
    python -m benchmarks.quality --suites toy --toy-methods equal,mgda,pcgrad

Output goes to ``benchmarks/out/`` (git-ignored) unless ``--out`` says otherwise; no
result file records an absolute path. ``--device`` (default: CUDA when available) is
where the supervised suites train; the JSON records it with the torch, CUDA and cuDNN
versions.

The benchmark, by concern:

- :mod:`benchmarks.quality_methods`: the methods table (each method builds its own arguments);
- :mod:`benchmarks.quality_suites`: the suites, one config each; data and models in
  :mod:`benchmarks.quality_data` (trunks in :mod:`benchmarks.trunks`);
- :mod:`benchmarks.quality_train`: the run config, training runs and the job pool;
- :mod:`benchmarks.quality_report`: Delta_m%, the JSON sections and the Markdown tables;
- :mod:`benchmarks.quality_plots`: the PNG plots;
- this module: the command line.

Training: the inner optimizer is Adam with the suite's learning rate (MultiDigits 5e-3,
best of 2e-3 / 5e-3 / 1e-2; scale 3e-3, better than 1e-3; chosen on seed 0 for the
*single-task* baselines at the default budget, so Delta_m% is not flattered by an
under-trained reference), except the ``/sgd`` methods: SGD(1e-3, momentum 0.9), with
which per-task Adam preconditioning is exactly per-task Adam on the trunk. Per-method
settings (uncertainty's and GradNorm's own learning rates, PE-LTR's bounds, ...) are in
:class:`~benchmarks.quality_methods.MethodSettings` and the JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from .common import DEFAULT_OUT, add_device_argument, machine_info, portable_path
from .quality_data import toy_pareto_set
from .quality_methods import FULL_METHODS, METHODS, TOY_ALLOWED, TOY_FULL
from .quality_plots import make_plots
from .quality_report import dumps, report, summarise_suite, summarise_toy
from .quality_suites import SUITES, SUPERVISED
from .quality_train import Config, build_jobs, run_jobs, validate


def run(cfg: Config, progress: bool = True) -> Dict[str, Any]:
    """Run the grid of ``cfg`` and return the JSON document."""
    validate(cfg)
    t0 = time.perf_counter()
    if "toy" in cfg.suites:
        toy_pareto_set()  # computed once here rather than in every worker's first job
    results = run_jobs(build_jobs(cfg), cfg, progress)
    doc: Dict[str, Any] = {
        "benchmark": "quality",
        "config": cfg.to_dict(),
        "machine": machine_info(cfg.device, workers=cfg.workers, threads_per_worker=cfg.threads),
        "suites": {},
    }
    for name in SUPERVISED:
        if name in cfg.suites:
            runs = [r for r in results if r["suite"] == name]
            suite = cfg.suite(name)
            doc["suites"][name] = summarise_suite(suite, runs, suite.variants(cfg.methods))
    if "toy" in cfg.suites:
        runs = [r for r in results if r["suite"] == "toy"]
        doc["suites"]["toy"] = summarise_toy(runs, cfg.toy_methods, cfg.toy)
    doc["wall_seconds"] = time.perf_counter() - t0
    return doc


def _csv(value: str) -> Tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="complete grid: 5 seeds, longer training, all methods")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run in seconds: 1 seed, equal and PCGrad, tiny data, 1 worker (tables, JSON and plots)",
    )
    p.add_argument("--suites", type=_csv, default=None, help=f"comma-separated, from {','.join(SUITES)}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --full 5)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument(
        "--methods", type=_csv, default=None, help=f"supervised suites; 'all' or from {','.join(METHODS)}"
    )
    p.add_argument("--toy-methods", type=_csv, default=None, help=f"from {','.join(TOY_ALLOWED)}")
    p.add_argument("--digits-epochs", type=int, default=None)
    p.add_argument("--digits-train", type=int, default=None, help="training images")
    p.add_argument("--digits-test", type=int, default=None, help="test images")
    p.add_argument("--scale-epochs", type=int, default=None)
    p.add_argument("--scale-train", type=int, default=None, help="training samples")
    p.add_argument("--scale-test", type=int, default=None, help="test samples")
    p.add_argument("--partial-epochs", type=int, default=None)
    p.add_argument("--toy-steps", type=int, default=None)
    p.add_argument("--toy-lr", type=float, default=None)
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    add_device_argument(p)
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output folder (default benchmarks/out/, git-ignored; the README's figures: benchmarks/results)",
    )
    p.add_argument("--json", type=Path, default=None, help="default <out>/quality.json")
    p.add_argument("--markdown", type=Path, default=None, help="default <out>/quality.md")
    p.add_argument("--plot-dir", type=Path, default=None, help="default <out>")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _full(cfg: Config) -> Config:
    """The complete grid: 5 seeds, all methods, longer training, the CAGrad paper's toy budget."""
    return replace(
        cfg,
        seeds=(0, 1, 2, 3, 4),
        methods=FULL_METHODS,
        toy_methods=TOY_FULL,
        multidigits=replace(
            cfg.multidigits, data=replace(cfg.multidigits.data, n_train=10000, n_test=3000), epochs=15
        ),
        scale=replace(cfg.scale, epochs=40),
        toy=replace(cfg.toy, steps=100000, lr=1e-3),  # the CAGrad paper's setting: Adam(lr=1e-3), 100k steps
    )


def _quick(cfg: Config) -> Config:
    """A smoke run of every stage (all suites, tables, JSON, every plot) in seconds:
    one seed, the plain sum and PCGrad (whose diagnostics plot is drawn), tiny data."""
    return replace(
        cfg,
        seeds=(0,),
        methods=("equal", "pcgrad"),
        toy_methods=("equal", "pcgrad"),
        multidigits=replace(
            cfg.multidigits, data=replace(cfg.multidigits.data, n_train=128, n_test=64), epochs=1
        ),
        scale=replace(cfg.scale, data=replace(cfg.scale.data, n_train=100, n_test=50), epochs=1),
        toy=replace(cfg.toy, steps=20),
        workers=1,
    )


def _given(**values: Any) -> Dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def config_from(args: argparse.Namespace) -> Config:
    if args.full and args.quick:
        raise SystemExit("python -m benchmarks.quality: --full and --quick exclude each other")
    cfg = _full(Config()) if args.full else _quick(Config()) if args.quick else Config()
    n_seeds = args.seeds if args.seeds is not None else len(cfg.seeds)
    cfg.seeds = tuple(range(args.first_seed, args.first_seed + n_seeds))
    if args.suites is not None:
        cfg.suites = args.suites
    if args.methods is not None:
        cfg.methods = FULL_METHODS if args.methods == ("all",) else args.methods
    if args.toy_methods is not None:
        cfg.toy_methods = TOY_ALLOWED if args.toy_methods == ("all",) else args.toy_methods
    digits, scale = cfg.multidigits, cfg.scale
    cfg.multidigits = replace(
        digits,
        data=replace(digits.data, **_given(n_train=args.digits_train, n_test=args.digits_test)),
        **_given(epochs=args.digits_epochs),
    )
    cfg.scale = replace(
        scale,
        data=replace(scale.data, **_given(n_train=args.scale_train, n_test=args.scale_test)),
        **_given(epochs=args.scale_epochs),
    )
    cfg.partial = replace(cfg.partial, **_given(epochs=args.partial_epochs))
    cfg.toy = replace(cfg.toy, **_given(steps=args.toy_steps, lr=args.toy_lr))
    default_workers = cfg.workers if args.quick else max(1, min(2, os.cpu_count() or 1))
    cfg.workers = args.workers if args.workers is not None else default_workers
    cfg.threads = args.threads if args.threads is not None else 1
    cfg.device = str(args.device)
    if not args.no_plots:
        cfg.plot_dir = str(args.plot_dir)
    return cfg


def _command(argv: Sequence[str], out: Path) -> str:
    """The command line as run, with every absolute path made portable."""
    shown = [portable_path(a, out) if os.path.isabs(a) else a for a in argv]
    return " ".join(["python -m benchmarks.quality", *shown]).strip()


def write_outputs(doc: Dict[str, Any], text: str, args: argparse.Namespace) -> None:
    """The JSON and the Markdown report."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(dumps(doc) + "\n")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    md = (
        f"<!-- written by `{doc['command']}`; wall time {doc['wall_seconds']:.0f} s on "
        f"{doc['machine']['cpus']} CPU(s), torch {doc['machine']['torch']} -->\n\n" + text + "\n"
    )
    args.markdown.write_text(md)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.json = args.json or args.out / "quality.json"
    args.markdown = args.markdown or args.out / "quality.md"
    args.plot_dir = args.plot_dir or args.out
    cfg = config_from(args)
    doc = run(cfg, progress=not args.no_progress)
    doc["command"] = _command(argv, args.out)
    text = report(doc)
    print(text)
    print(f"\nwall time: {doc['wall_seconds']:.1f} s ({cfg.workers} worker(s) x {cfg.threads} thread(s))")
    if not args.no_plots:
        plots = make_plots(doc, args.plot_dir)
        diagnostics = args.plot_dir / str(doc["config"]["diagnostics_png"])
        if diagnostics.exists():
            plots.append(str(diagnostics))
        doc["plots"] = [portable_path(p, args.plot_dir) for p in plots]
    write_outputs(doc, text, args)
    where = f" and plots in {args.plot_dir}" if "plots" in doc else ""
    print(f"\nwrote {args.json}, {args.markdown}{where}")
    return doc


if __name__ == "__main__":
    main()
