"""Plots of the quality benchmark: Delta_m% bars, per-task metrics, the toy's trajectories.

Every function returns the written file names; the caller records them relative to the
output folder (never an absolute path).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, List, Mapping, Sequence

import torch

from .quality_data import toy_losses


def make_plots(doc: Mapping[str, Any], plot_dir: Path) -> List[str]:
    """Write the PNG plots; returns their paths (empty if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        print("matplotlib not installed: no plots (pip install -e .[bench])", file=sys.stderr)
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths: List[str] = []
    supervised = [n for n in ("multidigits", "scale") if n in doc["suites"]]
    if supervised:
        paths.append(_plot_delta_m(doc, supervised, plot_dir, plt))
        paths.append(_plot_tasks(doc, supervised, plot_dir, plt))
    if "toy" in doc["suites"]:
        paths += _plot_toy(doc["suites"]["toy"], plot_dir, plt)
    return paths


def _plot_tasks(doc: Mapping[str, Any], names: Sequence[str], plot_dir: Path, plt: Any) -> str:
    """Per-task primary metric of every method (bars, mean ± std) against the single-task one."""
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 3.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        section = doc["suites"][name]
        metric = section["primary_metric"]["name"]
        tasks = section["tasks"]
        entries = list(section["methods"].values())
        width = 0.8 / len(tasks)
        for t, task in enumerate(tasks):
            xs = [i + (t - (len(tasks) - 1) / 2) * width for i in range(len(entries))]
            means = [e["summary"][task][metric]["mean"] for e in entries]
            stds = [e["summary"][task][metric]["std"] for e in entries]
            bars = ax.bar(xs, means, width, yerr=stds, capsize=2, label=task, alpha=0.85)
            ref = section["single_task"][task][metric]["mean"]
            ax.axhline(ref, color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1.0)
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([e["label"] for e in entries], rotation=30, ha="right", fontsize=8)
        if metric == "accuracy":
            lo = min(e["summary"][t][metric]["mean"] for e in entries for t in tasks)
            ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        else:
            ax.set_yscale("log")
        arrow = "higher" if section["primary_metric"]["higher_is_better"] else "lower"
        ax.set_ylabel(f"test {metric} ({arrow} is better)")
        ax.set_title(f"{name}: per-task test {metric}; dashed = single-task baseline", fontsize=10)
        ax.legend(fontsize=8, ncol=len(tasks))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = plot_dir / "quality_tasks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_toy(section: Mapping[str, Any], plot_dir: Path, plt: Any) -> List[str]:
    import numpy as np

    n = 200
    lin = torch.linspace(-11.0, 11.0, n, dtype=torch.float64)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    with torch.no_grad():
        l1, l2 = toy_losses(torch.stack([gx, gy], dim=-1))
    avg = (0.5 * (l1 + l2)).numpy()
    pareto = np.array(section["pareto_set"])
    methods = list(section["methods"].items())
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:brown"]
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, (_, entry) in zip(axes.flat, methods):
        ax.contour(gx.numpy(), gy.numpy(), avg, levels=20, cmap="viridis", linewidths=0.7)
        ax.plot(pareto[:, 0], pareto[:, 1], color="gray", linewidth=5, alpha=0.6, zorder=1)
        for i, r in enumerate(entry["runs"]):
            t = np.array(r["trajectory"])
            c = colors[i % len(colors)]
            ax.plot(t[:, 0], t[:, 1], color=c, linewidth=1.2, zorder=3)
            ax.plot(*r["start"], "o", color="k", markersize=4, zorder=4)
            ax.plot(*r["final"], "*" if r["reached_pareto"] else "x", color=c, markersize=9, zorder=5)
        ax.set_title(f"{entry['label']}: {entry['reached']}/{len(entry['runs'])} reached", fontsize=9)
        ax.set_xlim(-11, 11)
        ax.set_ylim(-11, 11)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.suptitle(
        f"CAGrad toy: contours of (L1+L2)/2, Pareto set (gray), {section['steps']} Adam steps "
        f"(lr={section['lr']:g}); ★ reached, × not",
        fontsize=10,
    )
    fig.tight_layout()
    path = plot_dir / "quality_toy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path), _plot_toy_objectives(section, methods, plot_dir, plt)]


def _plot_delta_m(doc: Mapping[str, Any], supervised: Sequence[str], plot_dir: Path, plt: Any) -> str:
    """Delta_m% of every method (bars, mean ± std over seeds), one panel per supervised suite."""
    fig, axes = plt.subplots(1, len(supervised), figsize=(6.5 * len(supervised), 5.5), squeeze=False)
    for ax, name in zip(axes[0], supervised):
        section = doc["suites"][name]
        entries = list(section["methods"].values())
        labels = [e["label"] for e in entries]
        means = [e["delta_m"]["mean"] for e in entries]
        stds = [e["delta_m"]["std"] for e in entries]
        colors = ["tab:green" if m < 0 else "tab:red" for m in means]
        pos = list(range(len(entries)))
        ax.barh(pos, means, xerr=stds, color=colors, alpha=0.8, capsize=3)
        ax.set_yticks(pos)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0.0, color="k", linewidth=0.8)
        ax.set_xlabel("Δm% vs single-task (lower is better)")
        ax.set_title(f"{name}: {len(section['seeds'])} seed(s)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = plot_dir / "quality_delta_m.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_toy_objectives(section: Mapping[str, Any], methods: Sequence[Any], plot_dir: Path, plt: Any) -> str:
    """Objective space: the Pareto front and where each run ended."""
    import numpy as np

    front = np.array(section["pareto_front"])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(front[:, 0], front[:, 1], color="gray", linewidth=4, alpha=0.6, label="Pareto front")
    markers = "osD^vP*X"
    for i, (_, entry) in enumerate(methods):
        pts = np.array([r["losses"] for r in entry["runs"]])
        ax.scatter(
            pts[:, 0], pts[:, 1], marker=markers[i % len(markers)], s=30, label=entry["label"], alpha=0.8
        )
    ax.set_xlabel("L1")
    ax.set_ylabel("L2")
    ax.set_title("CAGrad toy: final losses from every start", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = plot_dir / "quality_toy_objectives.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
