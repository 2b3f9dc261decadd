"""Speed and memory of full multi-task training steps: ours vs textbook vs third-party.

Each implementation is a small setup function ``setup(model, inner) -> step(batch)``;
``step`` runs one FULL training step (forward, per-task gradients, aggregation, inner
optimizer step) on its own copy of the model (bitwise-identical init for everyone).
Timing is interleaved: after warm-up, every round runs one timed step of every
implementation, in an order shuffled per round by a seeded RNG, so machine drift
affects all implementations alike; we report the median ms/step and its ratio to the
``floor`` (inner Adam on ``sum(losses)``) median of the same run.

    python -m benchmarks.speed                       # MLP trunk, K in {2, 4, 8, 16}
    python -m benchmarks.speed --quick               # 1-minute smoke run
    python -m benchmarks.speed --memory --ks 2,8,16  # peak extra RSS, fresh process each
    python -m benchmarks.speed --cnn                 # small conv trunk
    python -m benchmarks.speed --one ours-pcgrad --k 8 --steps 20   # e.g. under cProfile

Anchors that are not importable (TorchJD, pytorch_optimizer, LibMTL) are skipped with
the reason printed and recorded in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .baselines import textbook_pcgrad_step
from .workloads import (
    Batch,
    MultiHeadModel,
    WorkloadConfig,
    build_model,
    conflict_stats,
    expected_conflict_fraction,
    make_data,
)

StepFn = Callable[[Batch], None]
InnerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]
RESULTS = Path(__file__).resolve().parent / "results"


def adam(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class Skip(Exception):
    """An implementation cannot run here (anchor missing, option not supported yet)."""


@dataclass
class Impl:
    """One implementation under test.

    Attributes:
        name: row label.
        setup: builds ``step(batch)`` over a model and an inner-optimizer factory.
        check: raises :class:`Skip` (with the reason) when the implementation cannot run;
            it also imports whatever the implementation needs, so that a memory child can
            take its baseline after the imports.
        kinds: workloads the implementation is benchmarked on by default.
    """

    name: str
    setup: Callable[[MultiHeadModel, InnerFactory], StepFn]
    check: Callable[[], None] = lambda: None
    kinds: Sequence[str] = ("mlp",)


# ---------------------------------------------------------------------- floor, textbook
def setup_floor(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
    opt = inner(model.parameters())

    def step(batch: Batch) -> None:
        opt.zero_grad(set_to_none=True)
        sum(model.losses(batch)).backward()
        opt.step()

    return step


def setup_textbook_pcgrad(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
    return textbook_pcgrad_step(model, inner(model.parameters()), torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- ours
def check_ours() -> None:
    try:
        importlib.import_module("multitask_optim")
    except ImportError as error:  # pragma: no cover - the package is this repo
        raise Skip(f"multitask_optim is not importable: {error}") from error


def _ours(surgery: str, mode: str = "auto", representation: bool = False) -> Callable[..., StepFn]:
    def setup(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
        from multitask_optim import MultiTaskOptimizer

        opt = MultiTaskOptimizer(inner(model.parameters()), surgery=surgery, gradient_mode=mode, seed=0)

        def step(batch: Batch) -> None:
            opt.zero_grad(set_to_none=True)
            if representation:
                x, y = batch
                z = model.features(x)
                opt.step(model.task_losses(z, y), representation=z)
            else:
                opt.step(model.losses(batch))

        step.optimizer = opt  # type: ignore[attr-defined]
        return step

    return setup


def check_lean() -> None:
    check_ours()
    from multitask_optim import MultiTaskOptimizer

    probe = torch.zeros(1, requires_grad=True)
    try:
        MultiTaskOptimizer(torch.optim.SGD([probe], lr=0.0), gradient_mode="lean")
    except (ValueError, TypeError) as error:
        raise Skip(f"MultiTaskOptimizer does not accept gradient_mode='lean' yet ({error})") from error


# ---------------------------------------------------------------------- pytorch_optimizer
def check_pytorch_optimizer() -> None:
    try:
        module = importlib.import_module("pytorch_optimizer")
    except Exception as error:
        raise Skip(f"pytorch_optimizer is not importable: {error}") from error
    if not hasattr(module, "PCGrad"):
        raise Skip("pytorch_optimizer has no PCGrad")


def setup_pytorch_optimizer_pcgrad(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
    from pytorch_optimizer import PCGrad

    # reduction="sum" as in the paper (and ours); its default is "mean"
    opt = PCGrad(inner(model.parameters()), reduction="sum")

    def step(batch: Batch) -> None:
        opt.zero_grad()
        opt.pc_backward(model.losses(batch))
        opt.step()

    return step


# ---------------------------------------------------------------------- TorchJD
def check_torchjd() -> None:
    try:
        autojac = importlib.import_module("torchjd.autojac")
        aggregation = importlib.import_module("torchjd.aggregation")
        autogram = importlib.import_module("torchjd.autogram")
    except Exception as error:
        raise Skip(f"torchjd is not importable: {error}") from error
    for module, names in (
        (autojac, ("mtl_backward", "jac_to_grad")),
        (aggregation, ("PCGrad", "GradVac", "UPGrad", "PCGradWeighting")),
        (autogram, ("Engine",)),
    ):
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            raise Skip(f"{module.__name__} has no {missing} (this harness targets torchjd 0.18)")


def _torchjd_autojac(aggregator_name: str) -> Callable[..., StepFn]:
    def setup(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
        import torchjd.aggregation as aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = getattr(aggregation, aggregator_name)()
        opt = inner(model.parameters())
        shared = model.shared_parameters()
        heads = model.head_parameters()

        def step(batch: Batch) -> None:
            opt.zero_grad(set_to_none=True)
            x, y = batch
            z = model.features(x)
            losses = model.task_losses(z, y)
            # .jac on the shared params, .grad on each head; then aggregate .jac -> .grad
            mtl_backward(losses, features=z, tasks_params=heads, shared_params=shared)
            jac_to_grad(shared, aggregator)
            opt.step()

        return step

    return setup


def setup_torchjd_autogram_pcgrad(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
    from torchjd.aggregation import PCGradWeighting
    from torchjd.autogram import Engine

    # The Gramian is over the trunk's parameters only (the heads are per-task). The
    # losses are K scalars, not a batch of per-sample values: batch_dim=None.
    engine = Engine(model.trunk, batch_dim=None)
    weighting = PCGradWeighting()
    opt = inner(model.parameters())

    def step(batch: Batch) -> None:
        opt.zero_grad(set_to_none=True)
        losses = torch.stack(model.losses(batch))
        gramian = engine.compute_gramian(losses)
        weights = weighting(gramian)
        losses.backward(weights)  # = (losses @ weights).backward()
        opt.step()

    return step


# ---------------------------------------------------------------------- LibMTL
def load_libmtl_weighting(name: str) -> Any:
    """The LibMTL weighting class ``name`` (e.g. ``"PCGrad"``) without LibMTL/__init__.py.

    ``import LibMTL`` pulls in torchvision (its model zoo); the weighting classes only
    need torch and numpy. We register bare package modules for ``LibMTL`` and
    ``LibMTL.weighting`` (path only, their ``__init__`` not executed) and import the
    one submodule.
    """
    full = f"LibMTL.weighting.{name}"
    if full in sys.modules:
        return getattr(sys.modules[full], name)
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        raise Skip("LibMTL is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    for package, path in (("LibMTL", root), ("LibMTL.weighting", root / "weighting")):
        if package in sys.modules:
            continue
        module = types.ModuleType(package)
        module.__path__ = [str(path)]
        module.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        module.__spec__.submodule_search_locations = [str(path)]
        sys.modules[package] = module
    try:
        return getattr(importlib.import_module(full), name)
    except Exception as error:
        raise Skip(f"cannot load {full}: {error}") from error


def check_libmtl() -> None:
    load_libmtl_weighting("PCGrad")
    load_libmtl_weighting("GradVac")


def _libmtl(name: str, **kwargs: Any) -> Callable[..., StepFn]:
    def setup(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
        cls = load_libmtl_weighting(name)
        weighting = cls()
        # What LibMTL's trainer model (AbsWeighting mixed into the architecture) provides.
        weighting.task_num = model.num_tasks
        weighting.device = torch.device("cpu")
        weighting.rep_grad = False
        weighting.get_share_params = model.trunk.parameters
        # LibMTL calls encoder.zero_grad() and later writes param.grad.data; with
        # torch >= 2.0's set_to_none=True default the .grad would be None by then, so
        # zero in place (what torch < 2.0 did, which LibMTL 1.1.5 was written for).
        weighting.zero_grad_share_params = lambda: model.trunk.zero_grad(set_to_none=False)
        opt = inner(model.parameters())
        random.seed(0)  # LibMTL draws task orders from Python's global RNG

        def step(batch: Batch) -> None:
            opt.zero_grad(set_to_none=False)
            weighting.backward(model.losses(batch), **kwargs)
            opt.step()

        return step

    return setup


# ---------------------------------------------------------------------- the registry
IMPLS: Dict[str, Impl] = {
    impl.name: impl
    for impl in [
        Impl("floor", setup_floor, kinds=("mlp", "cnn")),
        Impl("textbook-pcgrad", setup_textbook_pcgrad),
        Impl("pytorch_optimizer-pcgrad", setup_pytorch_optimizer_pcgrad, check_pytorch_optimizer),
        Impl("torchjd-pcgrad", _torchjd_autojac("PCGrad"), check_torchjd, ("mlp", "cnn")),
        Impl("torchjd-gradvac", _torchjd_autojac("GradVac"), check_torchjd),
        Impl("torchjd-upgrad", _torchjd_autojac("UPGrad"), check_torchjd),
        Impl("torchjd-autogram-pcgrad", setup_torchjd_autogram_pcgrad, check_torchjd),
        Impl("libmtl-pcgrad", _libmtl("PCGrad"), check_libmtl),
        Impl("libmtl-gradvac", _libmtl("GradVac", beta=0.5), check_libmtl),
        Impl("ours-pcgrad", _ours("pcgrad"), check_ours, ("mlp", "cnn")),
        Impl("ours-pcgrad-frontier", _ours("pcgrad", "frontier"), check_ours),
        Impl("ours-pcgrad-batched", _ours("pcgrad", "batched"), check_ours, ("mlp", "cnn")),
        Impl("ours-pcgrad-looped", _ours("pcgrad", "looped"), check_ours, ("mlp", "cnn")),
        Impl("ours-gradvac", _ours("gradvac"), check_ours),
        Impl("ours-pcgrad-representation", _ours("pcgrad", representation=True), check_ours, ("mlp", "cnn")),
        Impl("ours-pcgrad-lean", _ours("pcgrad", "lean"), check_lean),
    ]
}


def gradient_mode(step: StepFn) -> Optional[str]:
    opt = getattr(step, "optimizer", None)
    if opt is None:
        return None
    return opt.last_stats.get("gradient_mode")


def path_detail(step: StepFn) -> Optional[str]:
    """Which shared tensors took the factored linear rule and which Jacobian rows."""
    opt = getattr(step, "optimizer", None)
    if opt is None or "factored_params" not in opt.last_stats:
        return None
    st = opt.last_stats
    return f"{st['factored_params']} tensors factored, {st['jacobian_params']} via Jacobian rows"


def availability(names: Sequence[str]) -> Dict[str, Optional[str]]:
    """``{name: None}`` for runnable implementations, ``{name: reason}`` for skipped ones."""
    out: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            IMPLS[name].check()
            out[name] = None
        except Skip as why:
            out[name] = str(why)
    return out


# ---------------------------------------------------------------------- measurements
@dataclass
class KResult:
    times_ms: Dict[str, List[float]] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)
    modes: Dict[str, Optional[str]] = field(default_factory=dict)
    paths: Dict[str, Optional[str]] = field(default_factory=dict)
    rounds: int = 0


def time_steps(
    names: Sequence[str],
    cfg: WorkloadConfig,
    k: int,
    reps: Union[int, Callable[[float], int]],
    warmup: int,
    rng: random.Random,
    inner: InnerFactory = adam,
) -> KResult:
    """Interleaved timing of one full step per implementation per round.

    ``reps`` is the number of timed rounds, or a function of the duration (seconds) of
    the last warm-up round that returns it (to fit a time budget).
    """
    data = make_data(cfg, k)
    result = KResult()
    steps: Dict[str, StepFn] = {}
    for name in names:
        try:
            steps[name] = IMPLS[name].setup(build_model(cfg, k), inner)
        except Exception as error:  # an anchor that cannot drive this model
            result.failed[name] = f"setup failed: {type(error).__name__}: {error}"
    counter = {name: 0 for name in steps}

    def run(name: str) -> float:
        batch = data[counter[name] % len(data)]
        counter[name] += 1
        start = time.perf_counter()
        steps[name](batch)
        return (time.perf_counter() - start) * 1e3

    round_seconds = 0.0
    for _ in range(max(warmup, 1)):
        round_start = time.perf_counter()
        for name in list(steps):
            try:
                run(name)
            except Exception as error:
                result.failed[name] = f"step failed: {type(error).__name__}: {error}"
                del steps[name]
        round_seconds = time.perf_counter() - round_start
    result.rounds = reps(round_seconds) if callable(reps) else reps
    for name, step in steps.items():
        result.modes[name] = gradient_mode(step)
        result.paths[name] = path_detail(step)
        result.times_ms[name] = []
    order = list(steps)
    for _ in range(result.rounds):
        rng.shuffle(order)
        gc.collect()
        for name in order:
            result.times_ms[name].append(run(name))
    return result


def time_aggregation(gram: Tensor, calls: int = 300, warmup: int = 20) -> Dict[str, float]:
    """Median microseconds of ``Aggregator(gram (1, K, K), state, ctx)`` for PCGrad and GradVac."""
    from multitask_optim.aggregators import AggregationContext, GradVac, PCGrad

    k = gram.shape[-1]
    gram = gram.reshape(1, k, k).to(torch.float64)
    out: Dict[str, float] = {}
    for label, aggregator in (("pcgrad", PCGrad()), ("gradvac", GradVac())):
        ctx = AggregationContext(torch.Generator().manual_seed(0), torch.ones(k, dtype=torch.float64))
        state = aggregator.init_state(k, 1)
        samples = []
        for n in range(warmup + calls):
            start = time.perf_counter_ns()
            _, state = aggregator(gram, state, ctx)
            if n >= warmup:
                samples.append((time.perf_counter_ns() - start) / 1e3)
        out[label] = statistics.median(samples)
    return out


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def memory_child(name: str, cfg: WorkloadConfig, k: int, steps: int = 3) -> Dict[str, Any]:
    """Peak extra RSS of ``steps`` steps of ``name``, over a forward-only baseline."""
    impl = IMPLS[name]
    check_ours()  # every child imports the same modules before its baseline
    try:
        impl.check()
    except Skip as why:
        return {"impl": name, "k": k, "skipped": str(why)}
    model = build_model(cfg, k)
    data = make_data(cfg, k)
    loss = sum(model.losses(data[0]))  # one floor forward, no backward
    del loss
    gc.collect()
    base = maxrss_mb()
    step = impl.setup(model, adam)
    for n in range(steps):
        step(data[n % len(data)])
    peak = maxrss_mb()
    return {"impl": name, "k": k, "baseline_mb": base, "peak_mb": peak, "delta_mb": peak - base}


def run_memory(
    names: Sequence[str], ks: Sequence[int], argv_cfg: List[str], timeout: float
) -> Dict[str, Any]:
    out: Dict[str, Dict[str, Any]] = {}
    for name in names:
        for k in ks:
            cmd = [sys.executable, "-m", "benchmarks.speed", "--one", name, "--k", str(k), "--memory-child"]
            cmd += argv_cfg
            root = Path(__file__).resolve().parent.parent
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
            except subprocess.TimeoutExpired:
                record: Dict[str, Any] = {"impl": name, "k": k, "failed": f"timed out after {timeout:.0f}s"}
            else:
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_RESULT ")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    record = {"impl": name, "k": k, "failed": f"exit {proc.returncode}: {tail}"}
                else:
                    record = json.loads(lines[-1][len("MEMORY_RESULT ") :])
            out.setdefault(name, {})[str(k)] = record
            shown = (
                f"{record['delta_mb']:.1f} MB"
                if "delta_mb" in record
                else record.get("skipped") or record.get("failed")
            )
            print(f"  memory {name:30s} K={k:<3d} {shown}", flush=True)
    return out


# ---------------------------------------------------------------------- reporting
def git_info() -> Dict[str, Any]:
    """The commit measured, and whether multitask_optim/ had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> Optional[str]:
        try:
            proc = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=root, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "multitask_optim")
    return {"commit": git("rev-parse", "HEAD"), "library_dirty": bool(status) if status is not None else None}


def machine_info(threads: int) -> Dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: Dict[str, Optional[str]] = {}
    for dist in ("torchjd", "pytorch_optimizer", "LibMTL", "multitask_optim"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = None
    return {
        "git": git_info(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "loadavg_start": list(os.getloadavg()),
        "versions": versions,
    }


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


def memory_table(memory: Dict[str, Dict[str, Any]], ks: Sequence[int]) -> str:
    lines = ["| impl | " + " | ".join(f"K={k} (MB)" for k in ks) + " |", "|" + " --- |" * (len(ks) + 1)]
    for name, row in memory.items():
        cells = []
        for k in ks:
            cell = row.get(str(k), {})
            cells.append(f"{cell['delta_mb']:.1f}" if "delta_mb" in cell else "–")
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
    p.add_argument("--list", action="store_true", help="list implementations and whether they can run")
    p.add_argument("--quick", action="store_true", help="1-minute smoke run: K in {2,4}, 3 reps")
    p.add_argument("--cnn", action="store_true", help="convolutional trunk instead of the MLP")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="model/data seed and the round-order RNG seed")
    p.add_argument("--width", type=int, default=1024, help="MLP hidden width")
    p.add_argument("--in-dim", type=int, default=512, help="MLP input width")
    p.add_argument("--depth", type=int, default=3, help="MLP trunk layers")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--agg-calls", type=int, default=300, help="calls per aggregation-only timing")
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/speed[_cnn].json")
    p.add_argument("--plot", type=Path, default=None, help="default benchmarks/results/speed[_cnn].png")
    p.add_argument("--markdown", type=Path, default=None, help="default benchmarks/results/speed[_cnn].md")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--memory", action="store_true", help="peak extra RSS per implementation and K")
    p.add_argument("--memory-timeout", type=float, default=900.0)
    p.add_argument("--one", default=None, help="run one implementation only (with --k)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="steps for --one (e.g. under cProfile)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p


def config_from(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        kind="cnn" if args.cnn else "mlp",
        in_dim=args.in_dim,
        width=args.width,
        depth=args.depth,
        batch=args.batch,
        seed=args.seed,
    )


def config_argv(args: argparse.Namespace) -> List[str]:
    out = ["--width", str(args.width), "--in-dim", str(args.in_dim), "--depth", str(args.depth)]
    out += ["--batch", str(args.batch), "--seed", str(args.seed), "--threads", str(args.threads)]
    return out + (["--cnn"] if args.cnn else [])


def _load(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    cfg = config_from(args)
    suffix = "_cnn" if args.cnn else ""
    json_path = args.json or RESULTS / f"speed{suffix}.json"
    plot_path = args.plot or RESULTS / f"speed{suffix}.png"
    md_path = args.markdown or RESULTS / f"speed{suffix}.md"

    if args.one is not None:
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
        start = time.perf_counter()
        for n in range(args.steps):
            step(data[n % len(data)])
        ms = (time.perf_counter() - start) * 1e3 / max(args.steps, 1)
        print(f"{args.one} K={args.k}: {ms:.1f} ms/step over {args.steps} steps (mode {gradient_mode(step)})")
        return {"impl": args.one, "k": args.k, "mean_ms": ms}

    if args.quick:
        ks = args.ks or [2, 4]
        reps = args.reps or 3
        args.warmup = min(args.warmup, 1)
    else:
        ks = args.ks or [2, 4, 8, 16]
        reps = args.reps or 15
    fixed = args.quick or not args.budget
    if args.reps_at is not None:
        reps_at: Dict[int, int] = args.reps_at
    else:
        reps_at = {}
    if args.impls:
        names = [n.strip() for n in args.impls.split(",") if n.strip()]
        unknown = [n for n in names if n not in IMPLS]
        if unknown:
            raise SystemExit(f"unknown implementation(s) {unknown}; known: {', '.join(IMPLS)}")
    else:
        names = [n for n, impl in IMPLS.items() if cfg.kind in impl.kinds]
    if "floor" not in names:
        names = ["floor", *names]

    available = availability(names)
    skipped = {n: why for n, why in available.items() if why is not None}
    runnable = [n for n in names if available[n] is None]
    if args.list:
        for n in names:
            print(f"{n:30s} {'ok' if available[n] is None else 'SKIP: ' + str(available[n])}")
        return {"available": available}
    for n, why in skipped.items():
        print(f"skip {n}: {why}", flush=True)

    if args.memory:
        print(f"memory ({cfg.kind}), fresh subprocess per implementation and K", flush=True)
        memory = run_memory(runnable, ks, config_argv(args), args.memory_timeout)
        for n, why in skipped.items():
            memory[n] = {str(k): {"impl": n, "k": k, "skipped": why} for k in ks}
        doc = _load(json_path)
        doc.setdefault("machine", machine_info(args.threads))
        doc["memory"] = {
            "config": cfg.to_dict(),
            "ks": ks,
            "steps": 3,
            "git": git_info(),
            "measure": "ru_maxrss after 3 steps minus ru_maxrss after imports + model/data + one "
            "forward (no backward), fresh subprocess per implementation and K",
            "delta_mb": memory,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1))
        table = memory_table({n: memory[n] for n in names if n in memory}, ks)
        print("\npeak extra RSS (MB) over a forward-only baseline, 3 steps, fresh process each\n")
        print(table)
        return doc

    machine = machine_info(args.threads)
    print(
        f"torch {machine['torch']}, {args.threads} threads, {machine['cpu_model']}, "
        f"load {machine['loadavg_start'][0]:.2f}; workload {cfg.kind}, batch {cfg.batch}",
        flush=True,
    )
    rng = random.Random(args.seed)
    results: Dict[str, Dict[str, Any]] = {n: {} for n in names}
    conflicts: Dict[str, Any] = {}
    aggregation: Dict[str, Dict[str, float]] = {"pcgrad": {}, "gradvac": {}}
    modes: Dict[str, Dict[str, Optional[str]]] = {}
    paths: Dict[str, Dict[str, Optional[str]]] = {}
    rounds: Dict[str, int] = {}
    loads: Dict[str, Dict[str, float]] = {}
    started = time.perf_counter()

    def rounds_for(k: int, index: int) -> Union[int, Callable[[float], int]]:
        if k in reps_at:
            return reps_at[k]
        if fixed:
            return reps

        def fit(round_seconds: float) -> int:
            remaining = args.budget - (time.perf_counter() - started)
            later = sum(round_seconds * k2 / k for k2 in ks[index + 1 :])  # their warm-up rounds
            per_round = round_seconds * sum(k2 / k for k2 in ks[index:])
            fitted = int((remaining - later * max(args.warmup, 1)) // max(per_round, 1e-9))
            return max(args.min_reps, min(reps, fitted))

        return fit

    for index, k in enumerate(ks):
        probe = build_model(cfg, k)
        batch = make_data(cfg, k)[0]
        stats = conflict_stats(probe, batch)
        conflicts[str(k)] = {**stats.to_dict(), "expected_fraction": expected_conflict_fraction(k)}
        print(
            f"K={k}: {stats.conflicting}/{stats.pairs} task pairs conflict on the trunk at init "
            f"({stats.fraction:.0%}; cosine mean {stats.mean_cos:+.3f}, min {stats.min_cos:+.3f})",
            flush=True,
        )
        for label, us in time_aggregation(stats.gram, args.agg_calls).items():
            aggregation[label][str(k)] = us
        del probe
        t0 = time.perf_counter()
        load_before = os.getloadavg()[0]
        res = time_steps(runnable, cfg, k, rounds_for(k, index), args.warmup, rng)
        rounds[str(k)] = res.rounds
        loads[str(k)] = {"before": load_before, "after": os.getloadavg()[0]}
        floor_times = res.times_ms.get("floor") or []
        floor = statistics.median(floor_times) if floor_times else None
        for n in names:
            if n in res.times_ms:
                med = statistics.median(res.times_ms[n])
                paired = [t / f for t, f in zip(res.times_ms[n], floor_times)]
                results[n][str(k)] = {
                    "median_ms": med,
                    "ratio_to_floor": med / floor if floor else None,
                    # median over rounds of (this step / floor's step in the same round)
                    "ratio_paired": statistics.median(paired) if paired else None,
                    "min_ms": min(res.times_ms[n]),
                    # best-of-R ratio: robust to bursts of CPU contention from other jobs
                    "ratio_min": min(res.times_ms[n]) / min(floor_times) if floor_times else None,
                    "reps": len(res.times_ms[n]),
                    "times_ms": res.times_ms[n],
                }
                if res.modes.get(n):
                    modes.setdefault(n, {})[str(k)] = res.modes[n]
                    if res.paths.get(n):
                        paths.setdefault(n, {})[str(k)] = res.paths[n]
            elif n in res.failed:
                results[n][str(k)] = {"failed": res.failed[n]}
                print(f"  {n} failed at K={k}: {res.failed[n]}", flush=True)
            elif n in skipped:
                results[n][str(k)] = {"skipped": skipped[n]}
        print(
            f"  K={k}: {res.rounds} rounds in {time.perf_counter() - t0:.0f}s (load "
            f"{loads[str(k)]['before']:.1f} -> {loads[str(k)]['after']:.1f}); agg-only "
            f"pcgrad {aggregation['pcgrad'][str(k)]:.0f} us, gradvac {aggregation['gradvac'][str(k)]:.0f} us",
            flush=True,
        )
        for n in names:
            if n in res.modes and res.modes[n]:
                detail = f" ({res.paths[n]})" if res.paths.get(n) else ""
                print(f"    {n}: gradient_mode {res.modes[n]}{detail}", flush=True)

    table = markdown_table(results, names, ks)
    doc: Dict[str, Any] = {
        "machine": {**machine, "loadavg_end": list(os.getloadavg())},
        "config": {
            "workload": cfg.to_dict(),
            "ks": ks,
            "reps": rounds,
            "max_reps": reps,
            "budget_seconds": None if fixed else args.budget,
            "warmup": max(args.warmup, 1),
            "inner": "torch.optim.Adam(lr=1e-3)",
            "order": "interleaved round-robin, shuffled per round (random.Random(seed))",
            "wall_seconds": time.perf_counter() - started,
            "loadavg_1min_per_k": loads,
        },
        "conflict": conflicts,
        "results": results,
        "skipped": skipped,
        "gradient_modes": modes,
        "gradient_paths": paths,
        "aggregation_us": aggregation,
    }
    previous = _load(json_path)
    if previous.get("memory", {}).get("config") == cfg.to_dict():
        doc["memory"] = previous["memory"]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1))
    agg_lines = ["| aggregation only (us) | " + " | ".join(f"K={k}" for k in ks) + " |"]
    agg_lines.append("|" + " --- |" * (len(ks) + 1))
    for label, row in aggregation.items():
        agg_lines.append(f"| ours {label} | " + " | ".join(f"{row[str(k)]:.0f}" for k in ks) + " |")
    text = [
        f"Median ms per full training step (ratio to floor's median), {cfg.kind} trunk, batch "
        f"{cfg.batch}, torch {machine['torch']}, {args.threads} threads, {machine['cpu_model']}; "
        f"rounds per K {rounds}",
        "",
        table,
        "",
        "Best-of-rounds ms per step (ratio to floor's best; robust to bursts of load from other jobs)",
        "",
        markdown_table(results, names, ks, "min_ms", "ratio_min"),
        "",
        "\n".join(agg_lines),
    ]
    if skipped:
        text += ["", "Skipped:"] + [f"- {n}: {why}" for n, why in skipped.items()]
    rendered = "\n".join(text)
    print("\n" + rendered)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(rendered + "\n")
    if not args.no_plot:
        plot(results, names, ks, plot_path, f"full step time / floor ({cfg.kind} trunk, batch {cfg.batch})")
    print(f"\nwrote {json_path}" + ("" if args.no_plot else f", {plot_path}") + f", {md_path}")
    return doc


if __name__ == "__main__":
    main()
