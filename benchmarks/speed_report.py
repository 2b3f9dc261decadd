"""Reports of the speed benchmark: Markdown tables and step-time plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence


def markdown_table(
    results: Dict[str, Dict[str, Any]],
    names: Sequence[str],
    ks: Sequence[int],
    value: str = "median_ms",
    ratio: str = "ratio_to_floor",
) -> str:
    """Rows implementations, columns K, cells ``"ms (ratio)"``."""
    head = "| impl | " + " | ".join(f"K={k}" for k in ks) + " |"
    lines = [head, "|" + " --- |" * (len(ks) + 1)]
    for name in names:
        row = results.get(name, {})
        cells = []
        for k in ks:
            cell = row.get(str(k), {})
            if value in cell:
                r = cell.get(ratio)
                cells.append(f"{cell[value]:.1f} ({r:.2f}x)" if r else f"{cell[value]:.1f}")
            else:
                cells.append("–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(memory: Dict[str, Dict[str, Any]], ks: Sequence[int], value: str = "delta_mb") -> str:
    """Rows implementations, columns K, cells ``value`` (MB) with the range of the runs."""
    lines = ["| impl | " + " | ".join(f"K={k} (MB)" for k in ks) + " |", "|" + " --- |" * (len(ks) + 1)]
    for name, row in memory.items():
        cells = []
        for k in ks:
            cell = row.get(str(k), {})
            runs = cell.get("delta_runs_mb") if value == "delta_mb" else None
            spread = f" ({min(runs):.0f}–{max(runs):.0f})" if runs and len(runs) > 1 else ""
            cells.append(f"{cell[value]:.1f}{spread}" if value in cell else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    results: Dict[str, Dict[str, Any]], names: Sequence[str], ks: Sequence[int], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name in names:
        pts = [
            (k, results[name][str(k)].get("ratio_to_floor")) for k in ks if str(k) in results.get(name, {})
        ]
        pts = [(k, r) for k, r in pts if r]
        if not pts:
            continue
        style = "-" if name.startswith("ours") else "--"
        lw = 2.2 if name == "ours-pcgrad" else 1.3
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", lw=lw, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("number of tasks K")
    ax.set_ylabel("median step time / floor (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def aggregation_table(aggregation: Mapping[str, Mapping[str, float]], ks: Sequence[int]) -> str:
    lines = ["| aggregation only (us) | " + " | ".join(f"K={k}" for k in ks) + " |"]
    lines.append("|" + " --- |" * (len(ks) + 1))
    for label, row in aggregation.items():
        cells = (f"{row[str(k)]:.0f}" if str(k) in row else "–" for k in ks)
        lines.append(f"| ours {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(ratios: Mapping[str, Mapping[str, Any]]) -> str:
    """Rows ``a / b``: median, best-of-rounds and paired-median ratios."""
    lines = ["| ratio | median | best of rounds | median of per-round ratios |", "| --- | --- | --- | --- |"]
    for label, r in ratios.items():
        if r.get("median") is None:
            lines.append(f"| {label} | – | – | – |")
            continue
        lines.append(f"| {label} | {r['median']:.2f}x | {r['best']:.2f}x | {r['paired']:.2f}x |")
    return "\n".join(lines)


def plot_scaling(
    trunks: Mapping[str, Mapping[str, Any]], names: Sequence[str], path: Path, title: str
) -> None:
    """Median ms per step against K (best of rounds dotted), one panel per trunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(trunks), figsize=(7 * len(trunks), 5.5), squeeze=False)
    for ax, (trunk, section) in zip(axes[0], trunks.items()):
        ks: List[int] = section["ks"]
        for name in names:
            row = section["results"].get(name, {})
            pts = [(k, row[str(k)]) for k in ks if "median_ms" in row.get(str(k), {})]
            if not pts:
                continue
            style = "-" if name.startswith("ours") else "--"
            line = ax.plot(
                [k for k, _ in pts], [c["median_ms"] for _, c in pts], style, marker="o", label=name
            )
            color = line[0].get_color()
            ax.plot([k for k, _ in pts], [c["min_ms"] for _, c in pts], ":", color=color, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(ks), [str(k) for k in ks])
        ax.set_xlabel("number of tasks K")
        ax.set_ylabel("ms per full step (median; dotted: best of rounds)")
        ax.set_title(f"{trunk}: {section['title']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
