"""Measurements of the speed benchmark: interleaved step timing, aggregation-only timing,
peak memory (CPU: peak RSS in fresh processes; CUDA: ``torch.cuda.max_memory_allocated``).

On CUDA every timed step is bracketed by ``torch.cuda.synchronize`` (kernels run
asynchronously: without it a step's time would be its launch time)."""

from __future__ import annotations

import gc
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .common import REPO
from .speed_impls import IMPLS, InnerFactory, Skip, StepFn, adam, check_ours, gradient_mode, path_detail
from .workloads import WorkloadConfig, build_model, conflict_stats, expected_conflict_fraction, make_data

#: ``--timer``: ``wall`` (latency; CUDA synchronised) or ``cpu`` (this process's CPU time,
#: every thread: the work done, insensitive to other jobs on a shared machine; CPU only)
TIMERS = ("wall", "cpu")


def step_timer(device: torch.device, kind: str = "wall") -> Callable[[Callable[[], object]], float]:
    """``timed(run) -> ms`` of one call of ``run``, by the ``kind`` clock (:data:`TIMERS`)."""
    if kind not in TIMERS:
        raise ValueError(f"timer must be one of {TIMERS}, got {kind!r}")
    if kind == "cpu" and device.type != "cpu":
        raise ValueError(f"--timer cpu counts this process's CPU time: it cannot time {device.type} kernels")
    clock = time.process_time if kind == "cpu" else time.perf_counter
    cuda = device.type == "cuda"

    def timed(run: Callable[[], object]) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = clock()
        run()
        if cuda:
            torch.cuda.synchronize(device)
        return (clock() - start) * 1e3

    return timed


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
    gc_every: int = 1,
    timer: str = "wall",
) -> KResult:
    """Interleaved timing of one full step per implementation per round, on ``cfg.device``.

    ``reps`` is the number of timed rounds, or a function of the duration (seconds) of
    the last warm-up round that returns it (to fit a time budget). The garbage collector
    runs, untimed, before every ``gc_every``-th round. ``timer``: see :data:`TIMERS`.
    """
    timed = step_timer(torch.device(cfg.device), timer)
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
        return timed(lambda: steps[name](batch))

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
    for r in range(result.rounds):
        rng.shuffle(order)
        if r % gc_every == 0:
            gc.collect()
        for name in order:
            result.times_ms[name].append(run(name))
    return result


def time_aggregation(gram: Tensor, calls: int = 300, warmup: int = 20) -> Dict[str, float]:
    """Median microseconds of ``Aggregator(gram (1, K, K), state, ctx)`` for PCGrad and GradVac."""
    from multitask_optim.aggregators import AggregationContext, GradVac, PCGrad

    k = gram.shape[-1]
    gram = gram.reshape(1, k, k).to("cpu", torch.float64)  # the K x K problems are solved on the host
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


def probe_conflict(cfg: WorkloadConfig, k: int, agg_calls: int) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """Task-gradient conflict at init, and the aggregation-only timings on its Gram."""
    stats = conflict_stats(build_model(cfg, k), make_data(cfg, k)[0])
    print(
        f"K={k}: {stats.conflicting}/{stats.pairs} task pairs conflict on the trunk at init "
        f"({stats.fraction:.0%}; cosine mean {stats.mean_cos:+.3f}, min {stats.min_cos:+.3f})",
        flush=True,
    )
    conflict = {**stats.to_dict(), "expected_fraction": expected_conflict_fraction(k)}
    return conflict, time_aggregation(stats.gram, agg_calls)


def maxrss_mb() -> float:
    """Peak resident memory of this process image (MB).

    ``VmHWM`` from ``/proc/self/status`` where there is one: ``ru_maxrss`` survives
    ``fork`` + ``exec``, so a child started by a process that had grown to gigabytes
    reports the parent's peak as its own (every memory probe then reads 0 extra MB).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def memory_measure(device: str) -> str:
    """What a memory cell measures on ``device``."""
    if torch.device(device).type == "cuda":
        return (
            "torch.cuda.max_memory_allocated over 3 steps (reset_peak_memory_stats before each "
            "implementation, in this process); delta: over what the model and data hold"
        )
    return (
        "ru_maxrss after 3 steps minus ru_maxrss after imports + model/data + one forward "
        "(no backward), fresh subprocess per implementation and K"
    )


def cuda_memory(
    name: str, cfg: WorkloadConfig, k: int, steps: int = 3, inner: InnerFactory = adam
) -> Dict[str, Any]:
    """Peak ``torch.cuda.max_memory_allocated`` (MB) of ``steps`` steps of ``name`` on ``cfg.device``."""
    impl = IMPLS[name]
    try:
        impl.check()
    except Skip as why:
        return {"impl": name, "k": k, "skipped": str(why)}
    device = torch.device(cfg.device)
    model = build_model(cfg, k)
    data = make_data(cfg, k)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step = impl.setup(model, inner)
    for n in range(steps):
        step(data[n % len(data)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    mb = 2.0**20
    return {
        "impl": name,
        "k": k,
        "baseline_mb": base / mb,
        "peak_mb": peak / mb,
        "delta_mb": (peak - base) / mb,
    }


def memory_child(
    name: str, cfg: WorkloadConfig, k: int, steps: int = 3, inner: InnerFactory = adam
) -> Dict[str, Any]:
    """Peak extra RSS of ``steps`` steps of ``name``, over a forward-only baseline (on CUDA:
    :func:`cuda_memory`)."""
    if torch.device(cfg.device).type == "cuda":
        return cuda_memory(name, cfg, k, steps, inner)
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
    step = impl.setup(model, inner)
    for n in range(steps):
        step(data[n % len(data)])
    peak = maxrss_mb()
    return {"impl": name, "k": k, "baseline_mb": base, "peak_mb": peak, "delta_mb": peak - base}


def memory_in_subprocess(
    name: str, cfg: WorkloadConfig, k: int, timeout: float, threads: int
) -> Dict[str, Any]:
    """:func:`memory_child` of ``name`` at ``k`` in a fresh interpreter (``--memory-child``)."""
    cmd = [sys.executable, "-m", "benchmarks.speed", "--one", name, "--k", str(k), "--memory-child"]
    cmd += ["--workload-json", json.dumps(cfg.to_dict()), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"impl": name, "k": k, "failed": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"impl": name, "k": k, "failed": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1][len("MEMORY_RESULT ") :])


#: Fresh processes per memory cell: one process's peak RSS moves by tens of MB with the
#: allocator's state (glibc's heap and mmap thresholds), so the median of three is reported
#: (with every run's figure beside it).
MEMORY_REPEATS = 3


def memory_repeats(given: Optional[int], quick: bool) -> int:
    """Fresh processes per memory cell (their median is reported): ``given``, else 3 (quick: 1)."""
    return given or (1 if quick else MEMORY_REPEATS)


def run_memory(
    names: Sequence[str],
    ks: Sequence[int],
    cfg: WorkloadConfig,
    timeout: float,
    threads: int,
    repeats: int = MEMORY_REPEATS,
) -> Dict[str, Dict[str, Any]]:
    """Peak memory per implementation and K (:func:`memory_measure`).

    CPU: peak extra RSS, the median of ``repeats`` fresh processes. CUDA: the allocator's
    exact peak, one in-process run each (:func:`cuda_memory`).
    """
    out: Dict[str, Dict[str, Any]] = {}
    cuda = torch.device(cfg.device).type == "cuda"
    for name in names:
        for k in ks:
            if cuda:
                runs = [cuda_memory(name, cfg, k)]
            else:
                runs = [memory_in_subprocess(name, cfg, k, timeout, threads) for _ in range(repeats)]
            measured = [r["delta_mb"] for r in runs if "delta_mb" in r]
            record = dict(runs[0]) if len(measured) < len(runs) else dict(runs[-1])
            if len(measured) == len(runs):
                record["delta_mb"] = statistics.median(measured)
                record["delta_runs_mb"] = measured
            out.setdefault(name, {})[str(k)] = record
            shown = (
                f"{record['delta_mb']:.1f} MB (runs {', '.join(f'{m:.0f}' for m in measured)})"
                if "delta_mb" in record
                else record.get("skipped") or record.get("failed")
            )
            if "peak_mb" in record and cuda:
                shown += f", peak {record['peak_mb']:.1f} MB"
            print(f"  memory {cfg.kind} {name:30s} K={k:<3d} {shown}", flush=True)
    return out


def cell_stats(times: Sequence[float], floor_times: Sequence[float]) -> Dict[str, Any]:
    """Median and best of the rounds, and their ratios to the floor's in the same run."""
    med = statistics.median(times)
    floor = statistics.median(floor_times) if floor_times else None
    paired = [t / f for t, f in zip(times, floor_times)]
    return {
        "median_ms": med,
        "ratio_to_floor": med / floor if floor else None,
        # median over rounds of (this step / floor's step in the same round)
        "ratio_paired": statistics.median(paired) if paired else None,
        "min_ms": min(times),
        # best-of-R ratio: robust to bursts of CPU contention from other jobs
        "ratio_min": min(times) / min(floor_times) if floor_times else None,
        "reps": len(times),
        "times_ms": list(times),
    }


def k_cells(res: KResult, names: Sequence[str], skipped: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    """``{impl: cell}`` at one K: timings, or why the implementation failed or was skipped."""
    floor_times = res.times_ms.get("floor") or []
    out: Dict[str, Dict[str, Any]] = {}
    for n in names:
        if n in res.times_ms:
            out[n] = cell_stats(res.times_ms[n], floor_times)
        elif n in res.failed:
            out[n] = {"failed": res.failed[n]}
        elif n in skipped:
            out[n] = {"skipped": skipped[n]}
    return out
