"""``python -m benchmarks.speed --schedule``: PCGrad every k = 1, 2, 4, 8 steps, mean step cost."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any, Dict

from .common import machine_info, write_json, write_text
from .speed_impls import SCHEDULE_IMPLS, availability
from .speed_timing import time_steps
from .workloads import WorkloadConfig


def run_schedule(args: argparse.Namespace, cfg: WorkloadConfig, out: Path) -> Dict[str, Any]:
    """Average step cost of PCGrad run every k = 1, 2, 4, 8 steps (``surgery_every``) at one K.

    Interleaved rounds as in the sweep; the rounds are a multiple of 8 so every
    implementation's timed steps cover whole schedule periods, and the *mean* (not the
    median, which would pick the plain steps) is the average step cost.
    """
    k = args.k
    available = availability(SCHEDULE_IMPLS)
    runnable = [n for n in SCHEDULE_IMPLS if available[n] is None]
    rounds = args.reps or (16 if args.quick else 64)
    rounds = 8 * max(1, round(rounds / 8))
    warmup = 8 * max(1, args.warmup)  # whole periods, so the timed steps start at a period boundary
    started = time.perf_counter()
    res = time_steps(runnable, cfg, k, rounds, warmup, random.Random(args.seed), timer=args.timer)
    mean = {n: statistics.fmean(t) for n, t in res.times_ms.items()}
    median = {n: statistics.median(t) for n, t in res.times_ms.items()}
    doc = {
        "machine": machine_info(cfg.device, threads=args.threads, timer=args.timer),
        "config": {
            "workload": cfg.to_dict(),
            "k": k,
            "rounds": res.rounds,
            "warmup": warmup,
            "wall_seconds": time.perf_counter() - started,
        },
        "mean_ms": mean,
        "median_ms": median,
        "mean_over_floor": {n: mean[n] / mean["floor"] for n in mean if "floor" in mean},
        "mean_over_every1": {n: mean[n] / mean["ours-pcgrad"] for n in mean if "ours-pcgrad" in mean},
        "failed": res.failed,
    }
    lines = [
        f"PCGrad on a schedule (surgery_every = k), K = {k}, {cfg.kind} trunk, {res.rounds} interleaved "
        f"rounds, {args.threads} thread(s); mean = average step cost over whole schedule periods",
        "",
        "| implementation | mean ms/step | median ms/step | mean / floor | mean / every step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for n in runnable:
        if n in mean:
            lines.append(
                f"| {n} | {mean[n]:.2f} | {median[n]:.2f} | {doc['mean_over_floor'].get(n, float('nan')):.2f} | "
                f"{doc['mean_over_every1'].get(n, float('nan')):.2f} |"
            )
    text = "\n".join(lines)
    print("\n" + text)
    write_json(out / "speed_schedule.json", doc)
    write_text(out / "speed_schedule.md", text)
    print(f"\nwrote {out / 'speed_schedule.json'}, {out / 'speed_schedule.md'}")
    return doc
