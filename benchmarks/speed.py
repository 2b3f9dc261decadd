"""Speed and memory of full multi-task training steps: ours vs textbook vs third-party.

Each implementation (:mod:`benchmarks.speed_impls`) is a setup function
``setup(model, inner) -> step(batch)``; ``step`` runs one FULL training step (forward,
per-task gradients, aggregation, inner optimizer step) on its own copy of the model
(bitwise-identical init for everyone). Timing (:mod:`benchmarks.speed_timing`) is
interleaved: after warm-up, every round runs one timed step of every implementation, in
an order shuffled per round by a seeded RNG, so machine drift affects all
implementations alike; we report the median and best-of-rounds ms/step and their ratios
to the ``floor`` (inner optimizer on ``sum(losses)``) of the same run.

    python -m benchmarks.speed                       # MLP trunk, K in {2, 4, 8, 16}
    python -m benchmarks.speed --quick               # 1-minute smoke run
    python -m benchmarks.speed --memory --ks 2,8,16  # peak extra RSS, fresh process each
    python -m benchmarks.speed --cnn                 # small conv trunk (MultiDigits-style)
    python -m benchmarks.speed --tiny                # TorchJD's example network: ratios to TorchJD / floor
    python -m benchmarks.speed --scaling             # 3x32x32 CNN at K=8,16,40 and the MLP at K=40
    python -m benchmarks.speed --distributed         # 2 gloo ranks: DDP and FSDP2, bytes sent per step
    python -m benchmarks.speed --schedule --k 8      # PCGrad every k = 1, 2, 4, 8 steps: mean step cost
    python -m benchmarks.speed --one ours-pcgrad --k 8 --steps 20   # e.g. under cProfile
    python -m benchmarks.speed --gpu-table           # the GPU's speed and memory table (MLP, CNN; K=4,16,40)

Every mode takes ``--device`` (default: CUDA when available): models, data and every
optimizer live there, each timed step is bracketed by ``torch.cuda.synchronize`` on
CUDA, and every JSON records the device, its name and the torch, CUDA and cuDNN versions
(:func:`benchmarks.common.device_info`). ``--timer cpu`` times this process's CPU time
instead of the wall clock (CPU only: steadier on a shared machine; it counts work, not
latency). ``--head-outputs`` gives every head several outputs.

Results go to ``benchmarks/out/`` (git-ignored) unless ``--out`` says otherwise (the
README's figures: ``--out benchmarks/results``). Anchors that are not importable
(TorchJD, pytorch_optimizer, LibMTL) are skipped with the reason printed and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .common import (
    DEFAULT_OUT,
    add_device_argument,
    git_info,
    load_json,
    machine_info,
    write_json,
    write_text,
)
from .speed_gpu import run_gpu_table
from .speed_impls import IMPLS, adam, availability, gradient_mode
from .speed_report import aggregation_table, markdown_table, memory_table, plot
from .speed_scaling import run_scaling
from .speed_schedule import run_schedule
from .speed_timing import (
    TIMERS,
    k_cells,
    memory_child,
    memory_measure,
    memory_repeats,
    probe_conflict,
    run_memory,
    step_timer,
    time_steps,
)
from .speed_tiny import run_tiny
from .workloads import WorkloadConfig, build_model, make_data

# ---------------------------------------------------------------------- --one, --list


def run_one(args: argparse.Namespace, cfg: WorkloadConfig) -> Dict[str, Any]:
    """One implementation alone (``--one``), or its memory probe in a fresh process (``--memory-child``)."""
    if args.one not in IMPLS:
        raise SystemExit(f"unknown implementation {args.one!r}; known: {', '.join(IMPLS)}")
    if args.memory_child:
        record = memory_child(args.one, cfg, args.k)
        print("MEMORY_RESULT " + json.dumps(record), flush=True)
        return record
    IMPLS[args.one].check()
    step = IMPLS[args.one].setup(build_model(cfg, args.k), adam)
    data = make_data(cfg, args.k)
    step(data[0])

    def steps() -> None:
        for n in range(args.steps):
            step(data[n % len(data)])

    ms = step_timer(torch.device(cfg.device), args.timer)(steps) / max(args.steps, 1)
    print(f"{args.one} K={args.k}: {ms:.1f} ms/step over {args.steps} steps (mode {gradient_mode(step)})")
    return {"impl": args.one, "k": args.k, "mean_ms": ms}


def run_list(names: Sequence[str], available: Dict[str, Optional[str]]) -> Dict[str, Any]:
    for n in names:
        print(f"{n:30s} {'ok' if available[n] is None else 'SKIP: ' + str(available[n])}")
    return {"available": available}


# ---------------------------------------------------------------------- --memory
def run_memory_mode(
    args: argparse.Namespace, cfg: WorkloadConfig, names: Sequence[str], ks: Sequence[int], json_path: Path
) -> Dict[str, Any]:
    """Peak extra RSS per implementation and K (fresh process each), merged into the sweep's JSON."""
    available = availability(names)
    skipped = {n: why for n, why in available.items() if why is not None}
    print(f"memory ({cfg.kind}), fresh subprocess per implementation and K", flush=True)
    runnable = [n for n in names if available[n] is None]
    memory = run_memory(
        runnable, ks, cfg, args.memory_timeout, args.threads, memory_repeats(args.memory_repeats, args.quick)
    )
    for n, why in skipped.items():
        memory[n] = {str(k): {"impl": n, "k": k, "skipped": why} for k in ks}
    doc = load_json(json_path)
    doc.setdefault("machine", machine_info(cfg.device, threads=args.threads))
    doc["memory"] = {
        "config": cfg.to_dict(),
        "ks": list(ks),
        "steps": 3,
        "git": git_info(),
        "measure": memory_measure(cfg.device),
        "delta_mb": memory,
    }
    write_json(json_path, doc)
    print("\npeak extra RSS (MB) over a forward-only baseline, 3 steps, median of fresh processes\n")
    print(memory_table({n: memory[n] for n in names if n in memory}, ks))
    return doc


# ---------------------------------------------------------------------- the sweep (default mode)

Reps = Union[int, Callable[[float], int]]


def _rounds_for(args: argparse.Namespace, ks: Sequence[int], started: float) -> Callable[[int, int], Reps]:
    """Rounds at each K: ``--reps-at``, else ``--reps``, else fitted to ``--budget``."""
    fixed = args.quick or not args.budget

    def rounds_for(k: int, index: int) -> Reps:
        if k in args.reps_at:
            return args.reps_at[k]
        if fixed:
            return args.reps

        def fit(round_seconds: float) -> int:
            remaining = args.budget - (time.perf_counter() - started)
            later = sum(round_seconds * k2 / k for k2 in ks[index + 1 :])  # their warm-up rounds
            per_round = round_seconds * sum(k2 / k for k2 in ks[index:])
            fitted = int((remaining - later * max(args.warmup, 1)) // max(per_round, 1e-9))
            return max(args.min_reps, min(args.reps, fitted))

        return fit

    return rounds_for


def run_sweep(
    args: argparse.Namespace,
    cfg: WorkloadConfig,
    names: Sequence[str],
    ks: Sequence[int],
    paths: Dict[str, Path],
) -> Dict[str, Any]:
    """Interleaved timing of every implementation at every K; JSON, Markdown and a plot."""
    available = availability(names)
    skipped = {n: why for n, why in available.items() if why is not None}
    for n, why in skipped.items():
        print(f"skip {n}: {why}", flush=True)
    runnable = [n for n in names if available[n] is None]
    machine = machine_info(cfg.device, threads=args.threads, timer=args.timer)
    print(
        f"torch {machine['torch']}, {args.threads} threads, {machine['cpu_model']}, "
        f"load {machine['loadavg_start'][0]:.2f}; workload {cfg.kind}, batch {cfg.batch}",
        flush=True,
    )
    rng = random.Random(args.seed)
    started = time.perf_counter()
    rounds_for = _rounds_for(args, ks, started)
    sweep: Dict[str, Any] = {"results": {n: {} for n in names}, "conflict": {}, "rounds": {}, "loads": {}}
    sweep["aggregation"] = {"pcgrad": {}, "gradvac": {}}
    sweep["modes"], sweep["paths"] = {}, {}
    for index, k in enumerate(ks):
        _sweep_one_k(args, cfg, k, runnable, names, skipped, rounds_for(k, index), rng, sweep)
    doc = _sweep_doc(args, cfg, ks, machine, sweep, skipped, started)
    previous = load_json(paths["json"])
    if previous.get("memory", {}).get("config") == cfg.to_dict():
        doc["memory"] = previous["memory"]
    write_json(paths["json"], doc)
    rendered = _sweep_text(cfg, names, ks, machine, sweep, skipped, args.threads)
    print("\n" + rendered)
    write_text(paths["markdown"], rendered)
    if not args.no_plot:
        title = f"full step time / floor ({cfg.kind} trunk, batch {cfg.batch})"
        plot(sweep["results"], names, ks, paths["plot"], title)
    shown = "" if args.no_plot else f", {paths['plot']}"
    print(f"\nwrote {paths['json']}{shown}, {paths['markdown']}")
    return doc


def _sweep_one_k(
    args: argparse.Namespace,
    cfg: WorkloadConfig,
    k: int,
    runnable: Sequence[str],
    names: Sequence[str],
    skipped: Dict[str, str],
    reps: Reps,
    rng: random.Random,
    sweep: Dict[str, Any],
) -> None:
    agg: Dict[str, float] = {}
    if args.agg_calls > 0:  # 0: no conflict probe (K backward passes) and no aggregation timing
        sweep["conflict"][str(k)], agg = probe_conflict(cfg, k, args.agg_calls)
    for label, us in agg.items():
        sweep["aggregation"][label][str(k)] = us
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    res = time_steps(runnable, cfg, k, reps, args.warmup, rng, timer=args.timer)
    sweep["rounds"][str(k)] = res.rounds
    sweep["loads"][str(k)] = {"before": load_before, "after": os.getloadavg()[0]}
    for n, cell in k_cells(res, names, skipped).items():
        sweep["results"][n][str(k)] = cell
        if "failed" in cell:
            print(f"  {n} failed at K={k}: {cell['failed']}", flush=True)
    for n, mode in res.modes.items():
        if mode:
            sweep["modes"].setdefault(n, {})[str(k)] = mode
            if res.paths.get(n):
                sweep["paths"].setdefault(n, {})[str(k)] = res.paths[n]
    print(
        f"  K={k}: {res.rounds} rounds in {time.perf_counter() - t0:.0f}s (load "
        f"{load_before:.1f} -> {sweep['loads'][str(k)]['after']:.1f})"
        + "".join(f"; agg-only {label} {us:.0f} us" for label, us in agg.items()),
        flush=True,
    )
    for n in names:
        if res.modes.get(n):
            detail = f" ({res.paths[n]})" if res.paths.get(n) else ""
            print(f"    {n}: gradient_mode {res.modes[n]}{detail}", flush=True)


def _sweep_doc(
    args: argparse.Namespace,
    cfg: WorkloadConfig,
    ks: Sequence[int],
    machine: Dict[str, Any],
    sweep: Dict[str, Any],
    skipped: Dict[str, str],
    started: float,
) -> Dict[str, Any]:
    fixed = args.quick or not args.budget
    return {
        "machine": {**machine, "loadavg_end": list(os.getloadavg())},
        "config": {
            "workload": cfg.to_dict(),
            "ks": list(ks),
            "reps": sweep["rounds"],
            "max_reps": args.reps,
            "budget_seconds": None if fixed else args.budget,
            "warmup": max(args.warmup, 1),
            "inner": "torch.optim.Adam(lr=1e-3)",
            "order": "interleaved round-robin, shuffled per round (random.Random(seed))",
            "wall_seconds": time.perf_counter() - started,
            "loadavg_1min_per_k": sweep["loads"],
        },
        "conflict": sweep["conflict"],
        "results": sweep["results"],
        "skipped": skipped,
        "gradient_modes": sweep["modes"],
        "gradient_paths": sweep["paths"],
        "aggregation_us": sweep["aggregation"],
    }


def _sweep_text(
    cfg: WorkloadConfig,
    names: Sequence[str],
    ks: Sequence[int],
    machine: Dict[str, Any],
    sweep: Dict[str, Any],
    skipped: Dict[str, str],
    threads: int,
) -> str:
    text = [
        f"Median ms per full training step (ratio to floor's median), {cfg.kind} trunk, batch "
        f"{cfg.batch}, torch {machine['torch']}, {threads} threads, {machine['cpu_model']}; "
        f"rounds per K {sweep['rounds']}",
        "",
        markdown_table(sweep["results"], names, ks),
        "",
        "Best-of-rounds ms per step (ratio to floor's best; robust to bursts of load from other jobs)",
        "",
        markdown_table(sweep["results"], names, ks, "min_ms", "ratio_min"),
        "",
        aggregation_table(sweep["aggregation"], ks),
    ]
    if skipped:
        text += ["", "Skipped:"] + [f"- {n}: {why}" for n, why in skipped.items()]
    return "\n".join(text)


# ---------------------------------------------------------------------- CLI


def parse_ks(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_reps_at(text: str) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for item in text.split(","):
        if item.strip():
            k, r = item.split(":")
            out[int(k)] = int(r)
    return out


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="smoke run: K in {2,4}, 3 reps (with --tiny/--scaling: tiny)"
    )
    p.add_argument("--cnn", action="store_true", help="convolutional trunk instead of the MLP")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="2 gloo ranks: DDP and FSDP2 (ours vs sum(losses)), ms/step and bytes sent per step (--k, --reps)",
    )
    p.add_argument("--tiny", action="store_true", help="TorchJD's example network, many rounds, as ratios")
    p.add_argument(
        "--schedule", action="store_true", help="PCGrad every k = 1, 2, 4, 8 steps at K = --k: mean step cost"
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="3x32x32 CNN at K=8,16,40 and the MLP at K=40: time, memory, plot",
    )
    p.add_argument(
        "--gpu-table",
        action="store_true",
        help="the device's speed and memory table: MLP and CNN at K=4,16,40 (--ks), ratios to TorchJD and "
        "to the plain step, peak memory (CUDA: max_memory_allocated); speed_<device type>.json/.md",
    )
    p.add_argument("--cnn-ks", type=parse_ks, default=None, help="--scaling: CNN Ks (default 8,16,40)")
    p.add_argument("--mlp-ks", type=parse_ks, default=None, help="--scaling: MLP Ks (default 40)")
    p.add_argument(
        "--trunks", default="cnn,mlp", help="--scaling, --gpu-table: which trunks (default cnn,mlp)"
    )
    p.add_argument(
        "--no-memory", action="store_true", help="--scaling, --gpu-table: skip the memory measurements"
    )
    p.add_argument("--memory-impls", type=lambda t: [v for v in t.split(",") if v], default=None)
    p.add_argument("--memory", action="store_true", help="peak extra RSS per implementation and K")
    p.add_argument("--memory-timeout", type=float, default=900.0)
    p.add_argument(
        "--memory-repeats",
        type=int,
        default=None,
        help="fresh processes per memory cell (median; 3, --quick 1)",
    )
    p.add_argument("--one", default=None, help="run one implementation only (with --k)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="steps for --one (e.g. under cProfile)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--list", action="store_true", help="list implementations and whether they can run")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=parse_ks, default=None, help="comma-separated K values (default 2,4,8,16)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per K (default 15)")
    p.add_argument(
        "--reps-at",
        type=parse_reps_at,
        default=None,
        help="per-K rounds overriding --reps, e.g. '16:5' (the default, 15 rounds at every K, "
        "takes about 4-5 minutes on an idle 2-core machine; far longer under load)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="optional seconds for the whole timing run: the rounds at each K not fixed by "
        "--reps-at are cut (never below --min-reps) so that all K fit, predicting a round's "
        "cost as proportional to K from the last warm-up round (0: off)",
    )
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per K (at least 1)")
    p.add_argument("--impls", default=None, help="comma-separated implementation names (default: all)")
    _add_mode_flags(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    add_device_argument(p)
    p.add_argument(
        "--timer",
        choices=TIMERS,
        default="wall",
        help="wall: elapsed time (CUDA synchronised); cpu: this process's CPU time, all threads (CPU "
        "only; steadier under other jobs' load, counts work rather than latency)",
    )
    p.add_argument("--head-outputs", type=int, default=1, help="outputs of every head (default 1)")
    p.add_argument("--seed", type=int, default=0, help="model/data seed and the round-order RNG seed")
    p.add_argument("--width", type=int, default=1024, help="MLP hidden width")
    p.add_argument("--in-dim", type=int, default=512, help="MLP input width")
    p.add_argument("--depth", type=int, default=3, help="MLP trunk layers")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument(
        "--agg-calls",
        type=int,
        default=300,
        help="calls per aggregation-only timing (sweep: 0 skips it and the conflict probe)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/out/)")
    p.add_argument("--json", type=Path, default=None, help="default <out>/speed[_cnn].json")
    p.add_argument("--plot", type=Path, default=None, help="default <out>/speed[_cnn].png")
    p.add_argument("--markdown", type=Path, default=None, help="default <out>/speed[_cnn].md")
    p.add_argument("--no-plot", action="store_true")
    return p


def config_from(args: argparse.Namespace) -> WorkloadConfig:
    if args.workload_json:
        return WorkloadConfig.from_dict(json.loads(args.workload_json))
    return WorkloadConfig(
        kind="cnn" if args.cnn else "mlp",
        in_dim=args.in_dim,
        width=args.width,
        depth=args.depth,
        batch=args.batch,
        seed=args.seed,
        head_outputs=args.head_outputs,
        device=str(args.device),
    )


def _sweep_setup(args: argparse.Namespace, cfg: WorkloadConfig) -> Tuple[List[int], List[str]]:
    """The Ks and implementations of the sweep; fills in the rounds defaults."""
    if args.quick:
        ks = args.ks or [2, 4]
        args.reps = args.reps or 3
        args.warmup = min(args.warmup, 1)
    else:
        ks = args.ks or [2, 4, 8, 16]
        args.reps = args.reps or 15
    args.reps_at = args.reps_at or {}
    if args.impls:
        names = [n.strip() for n in args.impls.split(",") if n.strip()]
        unknown = [n for n in names if n not in IMPLS]
        if unknown:
            raise SystemExit(f"unknown implementation(s) {unknown}; known: {', '.join(IMPLS)}")
    else:
        names = [n for n, impl in IMPLS.items() if cfg.kind in impl.kinds]
    return ks, names if "floor" in names else ["floor", *names]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timer == "cpu" and args.device.type != "cpu":
        parser.error(f"--timer cpu counts this process's CPU time: it cannot time {args.device.type} kernels")
    if args.head_outputs < 1:
        parser.error(f"--head-outputs must be at least 1, got {args.head_outputs}")
    # --tiny: one thread (its ops are too small to split; a second thread only adds contention)
    args.threads = args.threads or (1 if args.tiny else os.cpu_count() or 1)
    torch.set_num_threads(args.threads)
    cfg = config_from(args)
    if args.one is not None:
        return run_one(args, cfg)
    if args.tiny:
        return run_tiny(args, args.out)
    if args.distributed:
        from .distributed import main as run_distributed

        return run_distributed(args, cfg)
    if args.schedule:
        return run_schedule(args, cfg, args.out)
    if args.scaling:
        return run_scaling(args, args.out)
    if args.gpu_table:
        return run_gpu_table(args, args.out)
    ks, names = _sweep_setup(args, cfg)
    suffix = "_cnn" if cfg.kind == "cnn" else ""
    paths = {
        "json": args.json or args.out / f"speed{suffix}.json",
        "plot": args.plot or args.out / f"speed{suffix}.png",
        "markdown": args.markdown or args.out / f"speed{suffix}.md",
    }
    if args.list:
        return run_list(names, availability(names))
    if args.memory:
        return run_memory_mode(args, cfg, names, ks, paths["json"])
    return run_sweep(args, cfg, names, ks, paths)


if __name__ == "__main__":
    main()
