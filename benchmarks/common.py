"""What every benchmark records the same way: the machine, the device, the commit, portable paths."""

from __future__ import annotations

import argparse
import json
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


def default_device() -> str:
    """Where the benchmarks run unless told: CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(text: str) -> torch.device:
    """``--device``: a torch device string; CUDA only when this torch build sees a GPU."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"--device {text!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise argparse.ArgumentTypeError(
            f"--device {text!r}: CUDA is not available here (torch {torch.__version__}, built {built})"
        )
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` option every benchmark takes (default: CUDA when available)."""
    parser.add_argument(
        "--device",
        type=parse_device,
        default=default_device(),
        help=f"where models, data and optimizers live, e.g. cpu, cuda, cuda:1 (default here: {default_device()})",
    )


def device_info(device: Union[str, torch.device]) -> Dict[str, Any]:
    """The device measured: its type and name, and the torch, CUDA and cuDNN versions."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
    }


def machine_info(device: Union[str, torch.device] = "cpu", **extra: Any) -> Dict[str, Any]:
    """Python, torch, platform, CPU, load and library versions, the device (:func:`device_info`),
    plus ``extra`` (threads, workers)."""
    return {
        "git": git_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "versions": _versions(),
        **device_info(device),
        **extra,
    }


def write_json(path: Path, doc: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def load_json(path: Path) -> Dict[str, Any]:
    """The JSON document at ``path``, or ``{}`` when there is none (or it does not parse)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
