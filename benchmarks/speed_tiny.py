"""``python -m benchmarks.speed --tiny``: TorchJD's example network, as ratios.

TorchJD's ``mtl_backward`` example (10 -> 5 -> 3 shared MLP, two ``Linear(3, 1)`` heads,
batch 16, MSE, inner ``SGD(lr=0.1)``), thousands of interleaved rounds on one thread:
our PCGrad step against TorchJD's, and ours with no surgery against the plain step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import Tensor

from .common import machine_info, write_json, write_text
from .speed_impls import TINY_IMPLS, availability
from .speed_report import markdown_table, ratio_table
from .speed_timing import k_cells, time_steps
from .workloads import TINY


def sgd_tiny(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The inner optimizer of TorchJD's example: ``SGD(lr=0.1)``."""
    return torch.optim.SGD(params, lr=0.1)


def paired_ratio(times: Dict[str, List[float]], a: str, b: str) -> Dict[str, Optional[float]]:
    """``a / b``: of the medians, of the bests, and the median of the per-round ratios."""
    if not times.get(a) or not times.get(b):
        return {"median": None, "best": None, "paired": None}
    ta, tb = times[a], times[b]
    return {
        "median": statistics.median(ta) / statistics.median(tb),
        "best": min(ta) / min(tb),
        "paired": statistics.median(x / y for x, y in zip(ta, tb)),
    }


TINY_RATIOS = (
    ("ours-pcgrad", "torchjd-pcgrad"),
    ("ours-sum", "floor"),
    ("ours-pcgrad", "floor"),
    ("torchjd-pcgrad", "floor"),
    ("torchjd-upgrad", "floor"),
)


def run_tiny(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """TorchJD's example network: our PCGrad step vs TorchJD's, ours without surgery vs the floor."""
    cfg = replace(TINY, seed=args.seed, device=str(args.device))
    available = availability(TINY_IMPLS)
    runnable = [n for n in TINY_IMPLS if available[n] is None]
    rounds = args.reps or (200 if args.quick else 3000)
    warmup = max(args.warmup, 20)
    started = time.perf_counter()
    rng = random.Random(args.seed)
    res = time_steps(runnable, cfg, 2, rounds, warmup, rng, inner=sgd_tiny, gc_every=100, timer=args.timer)
    ratios = {f"{a} / {b}": paired_ratio(res.times_ms, a, b) for a, b in TINY_RATIOS}
    skipped = {n: why for n, why in available.items() if why is not None}
    doc = {
        "machine": machine_info(cfg.device, threads=args.threads, timer=args.timer),
        "config": {
            "workload": cfg.to_dict(),
            "k": 2,
            "rounds": res.rounds,
            "warmup": warmup,
            "inner": "torch.optim.SGD(lr=0.1) (TorchJD's example)",
            "wall_seconds": time.perf_counter() - started,
        },
        "results": {n: c for n, c in k_cells(res, TINY_IMPLS, skipped).items()},
        "ratios": ratios,
        "gradient_modes": {n: m for n, m in res.modes.items() if m},
    }
    text = "\n".join(
        [
            f"TorchJD's example network (10->5->3 shared MLP, two Linear(3,1) heads, batch 16, MSE, "
            f"inner SGD(lr=0.1)), {res.rounds} interleaved rounds, {args.threads} thread(s)",
            "",
            markdown_table({n: {"2": c} for n, c in doc["results"].items()}, TINY_IMPLS, [2]),
            "",
            ratio_table(ratios),
        ]
    )
    print("\n" + text)
    write_json(out / "speed_tiny.json", doc)
    write_text(out / "speed_tiny.md", text)
    print(f"\nwrote {out / 'speed_tiny.json'}, {out / 'speed_tiny.md'}")
    return doc
