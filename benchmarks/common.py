"""What every benchmark records the same way: the machine, the commit, portable paths."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

#: the repository root (the parent of ``benchmarks/``)
REPO = Path(__file__).resolve().parent.parent
#: where the benchmarks write by default: git-ignored, so a demo run leaves the checkout clean
DEFAULT_OUT = REPO / "benchmarks" / "out"
#: the committed figures the README shows (written only when asked: ``--out benchmarks/results``)
RESULTS = REPO / "benchmarks" / "results"


def portable_path(path: Union[str, Path], base: Optional[Path] = None) -> str:
    """``path`` as a result file may record it: never absolute.

    Relative to ``base`` (the output folder) when inside it, else to the repository when
    inside it, else only the file name.
    """
    resolved = Path(path).resolve()
    for root in (base, REPO):
        if root is None:
            continue
        try:
            return resolved.relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return resolved.name


def git_info() -> Dict[str, Any]:
    """The commit measured, and whether ``multitask_optim/`` had uncommitted changes."""

    def git(*cmd: str) -> Optional[str]:
        try:
            proc = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=REPO, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "multitask_optim")
    return {"commit": git("rev-parse", "HEAD"), "library_dirty": bool(status) if status is not None else None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for dist in ("torchjd", "pytorch_optimizer", "LibMTL", "multitask_optim"):
        try:
            out[dist] = version(dist)
        except Exception:
            out[dist] = None
    return out


def machine_info(**extra: Any) -> Dict[str, Any]:
    """Python, torch, platform, CPU, load and library versions, plus ``extra`` (threads, workers)."""
    return {
        "git": git_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "versions": _versions(),
        **extra,
    }
