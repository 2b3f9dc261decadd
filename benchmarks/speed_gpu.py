"""``python -m benchmarks.speed --gpu-table``: the speed and memory table of one device.

Made for a GPU (the default device is CUDA when there is one) and runnable on any
(``--device cpu``; ``--quick`` shrinks it to seconds). On the speed benchmark's MLP and
3x32x32 CNN at K in ``--ks`` (default 4, 16, 40), for the plain step, TorchJD's PCGrad
step (``mtl_backward``; autogram) and ours (default, representation mode):

- the median ms per full training step over interleaved rounds (``torch.cuda.synchronize``
  around every timed step; the warm-up rounds cover ``gradient_mode="auto"``'s measuring
  steps), and its ratios to TorchJD's PCGrad step and to the plain step of the same run;
- the peak memory of 3 steps: on CUDA ``torch.cuda.max_memory_allocated`` (the allocator
  reset before each implementation), on the CPU the peak extra RSS of fresh processes.

It writes ``<out>/speed_<device type>.json`` (with the device, its name and the torch,
CUDA and cuDNN versions) and ``.md``, rewritten after every K.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .common import machine_info, write_json, write_text
from .speed_scaling import measure_trunk, trunk_workloads
from .speed_timing import memory_measure

#: the table's rows: the plain step, TorchJD both ways, ours by default and in representation mode
GPU_IMPLS = (
    "floor",
    "torchjd-pcgrad",
    "torchjd-autogram-pcgrad",
    "ours-pcgrad",
    "ours-pcgrad-representation",
)
#: the Ks of the table (``--quick``: 2 and 3 on tiny trunks)
GPU_KS = (4, 16, 40)
TORCHJD = "torchjd-pcgrad"


def run_gpu_table(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """Measure every trunk of ``--trunks`` at every K; JSON and Markdown in ``out``."""
    names = [n.strip() for n in args.impls.split(",") if n.strip()] if args.impls else list(GPU_IMPLS)
    if "floor" not in names:
        names = ["floor", *names]
    ks = args.ks or ([2, 3] if args.quick else list(GPU_KS))
    device = torch.device(args.device)
    stem = out / f"speed_{device.type}"
    doc: Dict[str, Any] = {
        "machine": machine_info(device, threads=args.threads, timer=args.timer),
        "inner": "torch.optim.Adam(lr=1e-3)",
        "memory_measure": memory_measure(str(device)),
        "trunks": {},
    }
    started = time.perf_counter()

    def save(trunk: str, section: Dict[str, Any]) -> None:
        doc["trunks"][trunk] = section
        doc["wall_seconds"] = time.perf_counter() - started
        write_json(stem.with_suffix(".json"), doc)
        write_text(stem.with_suffix(".md"), gpu_table_text(doc, names))

    rng = random.Random(args.seed)
    wanted = [t.strip() for t in args.trunks.split(",") if t.strip()]
    for trunk, cfg in trunk_workloads(args).items():
        if trunk in wanted:
            print(f"{device} table: {trunk} trunk, K in {ks}", flush=True)
            measure_trunk(args, cfg, ks, names, rng, lambda sec, t=trunk: save(t, sec))  # type: ignore[misc]
    text = gpu_table_text(doc, names)
    print("\n" + text)
    print(f"\nwrote {stem.name}.json, .md in {out}")
    return doc


def _ratio(cell: Dict[str, Any], base: Dict[str, Any]) -> Optional[float]:
    if "median_ms" not in cell or "median_ms" not in base:
        return None
    return float(cell["median_ms"]) / float(base["median_ms"])


def _shown(value: Optional[float], fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table_rows(section: Dict[str, Any], names: Sequence[str], cuda: bool) -> List[str]:
    """One Markdown row per implementation and K."""
    rows = []
    memory = section.get("memory_mb", {})
    for k in section["ks"]:
        floor = section["results"].get("floor", {}).get(str(k), {})
        torchjd = section["results"].get(TORCHJD, {}).get(str(k), {})
        for name in names:
            cell = section["results"].get(name, {}).get(str(k), {})
            if "median_ms" not in cell:
                why = cell.get("skipped") or cell.get("failed") or "not run"
                rows.append(f"| {name} | {k} | {why} | | | | |")
                continue
            mem = memory.get(name, {}).get(str(k), {})
            peak = mem.get("peak_mb" if cuda else "delta_mb")
            rows.append(
                f"| {name} | {k} | {cell['median_ms']:.2f} | {cell['min_ms']:.2f} | "
                f"{_shown(_ratio(cell, floor), '.2f')}x | {_shown(_ratio(cell, torchjd), '.2f')}x | "
                f"{_shown(peak, '.1f')} |"
            )
    return rows


def gpu_table_text(doc: Dict[str, Any], names: Sequence[str]) -> str:
    """The Markdown table: one section per trunk, rows implementation x K."""
    m = doc["machine"]
    cuda = torch.device(m["device"]).type == "cuda"
    memory = "peak torch.cuda.max_memory_allocated (MB)" if cuda else "peak extra RSS (MB)"
    text = [
        f"{m['device']} ({m['device_name']}), torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
        f"{m['threads']} CPU thread(s), timer {m['timer']}; inner {doc['inner']}",
        f"Memory: {doc['memory_measure']}",
    ]
    for trunk, section in doc["trunks"].items():
        text += [
            "",
            f"### {trunk}: {section['title']}, rounds per K {section['rounds']}",
            "",
            f"| impl | K | median ms | best ms | / plain step | / TorchJD PCGrad | {memory} |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *table_rows(section, names, cuda),
        ]
        if section.get("modes"):
            text += ["", "Paths: " + "; ".join(f"{n} {mode}" for n, mode in section["modes"].items())]
    return "\n".join(text)
