"""``python -m benchmarks.speed --scaling``: step time and peak memory against K.

The 3x32x32 CNN at K = 8, 16, 40 and the MLP at K = 40 (``--quick``: tiny sizes), every
K timed with interleaved rounds (:func:`~benchmarks.speed_timing.time_steps`), its
memory measured (:func:`~benchmarks.speed_timing.run_memory`) and its aggregation-only
time; :func:`measure_trunk` is also the measuring loop of ``--gpu-table``
(:mod:`benchmarks.speed_gpu`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from .common import machine_info, write_json, write_text
from .speed_impls import SCALING_IMPLS, availability
from .speed_report import aggregation_table, markdown_table, memory_table, plot_scaling
from .speed_timing import k_cells, memory_repeats, probe_conflict, run_memory, time_steps
from .workloads import CNN32, WorkloadConfig

#: ``--quick``'s trunks: tiny sizes that run in seconds
QUICK_CNN = WorkloadConfig(kind="cnn", in_channels=3, image=8, channels=(4, 8), cnn_hidden=16, batch=8)
QUICK_MLP = WorkloadConfig(in_dim=16, width=32, depth=2, batch=8)


def trunk_workloads(args: argparse.Namespace) -> Dict[str, WorkloadConfig]:
    """The CNN and MLP workloads (``--quick``: tiny), on ``--device`` with ``--head-outputs``."""
    cnn, mlp = (QUICK_CNN, QUICK_MLP) if args.quick else (CNN32, WorkloadConfig())
    on = {"device": str(args.device), "head_outputs": args.head_outputs, "seed": args.seed}
    return {"cnn": replace(cnn, **on), "mlp": replace(mlp, **on)}


def scaling_workloads(args: argparse.Namespace) -> Dict[str, Tuple[WorkloadConfig, List[int]]]:
    """The trunks and Ks of the scaling sweep (``--quick``: tiny sizes that run in seconds)."""
    trunks = trunk_workloads(args)
    if args.quick:
        return {"cnn": (trunks["cnn"], args.cnn_ks or [2, 3]), "mlp": (trunks["mlp"], args.mlp_ks or [3])}
    return {"cnn": (trunks["cnn"], args.cnn_ks or [8, 16, 40]), "mlp": (trunks["mlp"], args.mlp_ks or [40])}


def measure_trunk(
    args: argparse.Namespace,
    cfg: WorkloadConfig,
    ks: Sequence[int],
    names: Sequence[str],
    rng: random.Random,
    save: Callable[[Dict[str, Any]], None],
) -> Dict[str, Any]:
    """Time (and memory, and aggregation-only time) at every K; ``save(section)`` after each K."""
    available = availability(names)
    skipped = {n: why for n, why in available.items() if why is not None}
    runnable = [n for n in names if available[n] is None]
    rounds = args.reps or (2 if args.quick else 5)
    # gradient_mode="auto" measures over its first TRIALS steps: warm-up covers them
    warmup = max(args.warmup, 2)
    section: Dict[str, Any] = {"config": cfg.to_dict(), "ks": [], "results": {n: {} for n in names}}
    section["title"] = f"{cfg.kind}, batch {cfg.batch}"
    section["modes"], section["rounds"], section["aggregation_us"] = {}, {}, {"pcgrad": {}, "gradvac": {}}
    mem_names = [n for n in (args.memory_impls or runnable) if n in runnable]
    for k in ks:
        t0 = time.perf_counter()
        _, agg = probe_conflict(cfg, k, args.agg_calls)
        for label, us in agg.items():
            section["aggregation_us"][label][str(k)] = us
        res = time_steps(runnable, cfg, k, rounds, warmup, rng, timer=args.timer)
        section["rounds"][str(k)] = res.rounds
        for n, cell in k_cells(res, names, skipped).items():
            section["results"][n][str(k)] = cell
        for n, mode in res.modes.items():
            if mode:
                detail = f" ({res.paths[n]})" if res.paths.get(n) else ""
                section["modes"].setdefault(n, {})[str(k)] = mode + detail
        section["ks"].append(k)
        print(f"  {cfg.kind} K={k}: {res.rounds} rounds in {time.perf_counter() - t0:.0f}s", flush=True)
        for n in names:
            cell = section["results"][n].get(str(k), {})
            if "median_ms" in cell:
                shown = f"median {cell['median_ms']:.0f} ms, best {cell['min_ms']:.0f} ms"
                print(f"    {n:30s} {shown} {section['modes'].get(n, {}).get(str(k), '')}", flush=True)
        if not args.no_memory:
            repeats = memory_repeats(args.memory_repeats, args.quick)
            memory = run_memory(mem_names, [k], cfg, args.memory_timeout, args.threads, repeats)
            for n, row in memory.items():
                section.setdefault("memory_mb", {}).setdefault(n, {}).update(row)
        save(section)  # partial runs keep every finished K
    return section


def ratio_rows(section: Dict[str, Any], names: Sequence[str], against: str) -> str:
    """``impl / against`` per K: median and best-of-rounds ratios (same run, same rounds)."""
    ks = section["ks"]
    head = "| impl / " + against + " | " + " | ".join(f"K={k} median / best" for k in ks) + " |"
    lines = [head, "|" + " --- |" * (len(ks) + 1)]
    base = section["results"].get(against, {})
    for name in names:
        row = section["results"].get(name, {})
        cells = []
        for k in ks:
            a, b = row.get(str(k), {}), base.get(str(k), {})
            if "median_ms" in a and "median_ms" in b:
                cells.append(f"{a['median_ms'] / b['median_ms']:.2f}x / {a['min_ms'] / b['min_ms']:.2f}x")
            else:
                cells.append("–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_vs_fastest(section: Dict[str, Any], default: str = "ours-pcgrad") -> str:
    """The default (auto) against the fastest explicit gradient_mode at each K (median and best)."""
    explicit = [n for n in section["results"] if n.startswith(default + "-") and "representation" not in n]
    cells = []
    for k in section["ks"]:
        own = section["results"].get(default, {}).get(str(k), {})
        rivals = [
            section["results"][n][str(k)]
            for n in explicit
            if "median_ms" in section["results"][n].get(str(k), {})
        ]
        if "median_ms" not in own or not rivals:
            cells.append("–")
            continue
        med = own["median_ms"] / min(c["median_ms"] for c in rivals)
        best = own["min_ms"] / min(c["min_ms"] for c in rivals)
        cells.append(f"{med:.2f}x / {best:.2f}x")
    return f"| {default} / fastest explicit mode | " + " | ".join(cells) + " |"


def _scaling_text(doc: Dict[str, Any], names: Sequence[str]) -> str:
    m = doc["machine"]
    cuda = m.get("device", "cpu").startswith("cuda")
    text = [f"{m['device_name'] if cuda else m['cpu_model']}, torch {m['torch']}, {m['threads']} threads"]
    if doc.get("kept_from_previous_run"):
        text.append(
            f"(sections kept from the previous run of this file: {', '.join(doc['kept_from_previous_run'])})"
        )
    for trunk, section in doc["trunks"].items():
        ks = section["ks"]
        if not ks:
            continue
        text += [
            "",
            f"### {trunk}: {section['title']}, rounds per K {section['rounds']}",
            "",
            "Median ms per full step (ratio to floor's median)",
            "",
            markdown_table(section["results"], names, ks),
            "",
            "Best of rounds (ratio to floor's best)",
            "",
            markdown_table(section["results"], names, ks, "min_ms", "ratio_min"),
            "",
            "Ratios to TorchJD's PCGrad step (mtl_backward), median / best of rounds",
            "",
            ratio_rows(section, [n for n in names if n != "torchjd-pcgrad"], "torchjd-pcgrad"),
            default_vs_fastest(section),
        ]
        if "memory_mb" in section and cuda:
            text += ["", "Peak torch.cuda.max_memory_allocated (MB), 3 steps", ""]
            text += [memory_table(section["memory_mb"], ks, "peak_mb")]
        elif "memory_mb" in section:
            text += ["", "Peak extra RSS (MB), 3 steps: median of 3 fresh processes (range)", ""]
            text += [memory_table(section["memory_mb"], ks)]
        text += ["", aggregation_table(section["aggregation_us"], ks)]
        text += ["", "Gradient paths: " + "; ".join(f"{n} {m}" for n, m in section["modes"].items())]
    return "\n".join(text)


def run_scaling(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """Step time and peak memory against K on the 3x32x32 CNN and the MLP; JSON, Markdown and a plot.

    The JSON and Markdown are rewritten after every K (an interrupted sweep keeps what it measured).
    """
    names = [n.strip() for n in args.impls.split(",")] if args.impls else list(SCALING_IMPLS)
    if "floor" not in names:
        names = ["floor", *names]
    rng = random.Random(args.seed)
    started = time.perf_counter()
    doc: Dict[str, Any] = {
        "machine": machine_info(args.device, threads=args.threads, timer=args.timer),
        "trunks": {},
    }
    doc["inner"] = "torch.optim.Adam(lr=1e-3)"
    wanted = [t.strip() for t in args.trunks.split(",") if t.strip()]
    previous = out / "speed_scaling.json"
    if previous.exists() and not args.quick:  # --trunks narrows a rerun: keep the other trunks' sections
        kept = json.loads(previous.read_text()).get("trunks", {})
        doc["trunks"] = {t: sec for t, sec in kept.items() if t not in wanted}
        doc["kept_from_previous_run"] = sorted(doc["trunks"])

    def save(trunk: str, section: Dict[str, Any]) -> None:
        doc["trunks"][trunk] = section
        doc["wall_seconds"] = time.perf_counter() - started
        write_json(out / "speed_scaling.json", doc)
        write_text(out / "speed_scaling.md", _scaling_text(doc, names))

    for trunk, (cfg, ks) in scaling_workloads(args).items():
        if not ks or trunk not in wanted:
            continue
        print(f"scaling: {trunk} trunk, K in {ks}", flush=True)
        measure_trunk(args, cfg, ks, names, rng, lambda sec, t=trunk: save(t, sec))  # type: ignore[misc]
    text = _scaling_text(doc, names)
    print("\n" + text)
    if not args.no_plot:
        plot_scaling(doc["trunks"], names, out / "speed_scaling.png", "full PCGrad step time against K")
    print(f"\nwrote speed_scaling.json, .md{'' if args.no_plot else ', .png'} in {out}")
    return doc
