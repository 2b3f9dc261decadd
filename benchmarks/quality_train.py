"""Training runs of the quality benchmark: the run config, one run per job, the job pool.

Every model of a suite (single-task baselines included) starts from the same seeded
initialisation and sees the same seeded batches; jobs run in ``Config.workers``
processes (one torch thread each by default), each seeded, so results do not depend on
scheduling.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer
from multitask_optim.diagnostics import StatsHistory, plot_history

from .common import default_device
from .quality_data import (
    TOY_STARTS,
    distance_to_set,
    toy_losses,
    toy_pareto_front,
    toy_pareto_set,
    toy_stationarity,
)
from .quality_methods import (
    DEFAULT_METHODS,
    METHODS,
    TOY_ALLOWED,
    TOY_DEFAULT,
    Method,
    MethodContext,
    MethodSettings,
)
from .quality_suites import (
    DEFAULT_SUITES,
    SUITE_CLASSES,
    SUITES,
    SUPERVISED,
    ZERO,
    DigitsSuiteConfig,
    PartialSuiteConfig,
    ScaleSuiteConfig,
    Suite,
    ToyConfig,
)

#: the run whose per-step diagnostics (multitask_optim.diagnostics) the demo plots
DIAGNOSED = ("multidigits", "pcgrad")
#: its file name, in the output folder
DIAGNOSTICS_PNG = "quality_diagnostics.png"


@dataclass
class Config:
    """Everything a run depends on (recorded in the JSON, but for where plots go)."""

    suites: Tuple[str, ...] = DEFAULT_SUITES
    seeds: Tuple[int, ...] = (0, 1, 2)
    methods: Tuple[str, ...] = DEFAULT_METHODS
    toy_methods: Tuple[str, ...] = TOY_DEFAULT
    multidigits: DigitsSuiteConfig = field(default_factory=DigitsSuiteConfig)
    scale: ScaleSuiteConfig = field(default_factory=ScaleSuiteConfig)
    partial: PartialSuiteConfig = field(default_factory=PartialSuiteConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    settings: MethodSettings = field(default_factory=MethodSettings)
    workers: int = 2
    threads: int = 1
    #: where the supervised suites train (models, data, optimizers); they are evaluated on
    #: the CPU, and the toy's 2-D points always run there (a device would only add launches)
    device: str = field(default_factory=default_device)
    #: folder of the diagnostics plot of one run (PCGrad on MultiDigits, first seed); None: no plot
    plot_dir: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        del out["plot_dir"]  # a local folder: not part of the result
        out["diagnostics_png"] = DIAGNOSTICS_PNG if self.plot_dir else None
        return out

    def suite(self, name: str) -> Suite:
        return SUITE_CLASSES[name](getattr(self, name))


def make_optimizer(
    method: Method,
    model: nn.Module,
    suite: Suite,
    seed: int,
    first_losses: Sequence[float],
    total_steps: int,
    settings: MethodSettings,
) -> MultiTaskOptimizer:
    """``MultiTaskOptimizer`` over the method's inner optimizer for ``method`` on ``suite``."""
    ctx = MethodContext(
        num_tasks=len(suite.tasks),
        settings=settings,
        kind=suite.kind,
        first_losses=first_losses,
        total_steps=total_steps,
        last_shared=getattr(model, "last_shared", None),
    )
    inner = method.make_inner(model.parameters(), suite.lr, suite.sgd_lr)
    kwargs = method.optimizer_kwargs(ctx)
    if suite.explicit_partition:
        heads = model.heads  # type: ignore[union-attr]
        kwargs["shared"] = list(model.trunk.parameters())  # type: ignore[union-attr]
        kwargs["tasks"] = {t: list(h.parameters()) for t, h in zip(suite.tasks, heads)}
        return MultiTaskOptimizer(inner, seed=seed, **kwargs)
    return MultiTaskOptimizer(inner, seed=seed, task_names=suite.tasks, **kwargs)


class ConflictCounter:
    """Share of steps x task pairs with a negative gradient cosine, and their mean cosine."""

    def __init__(self) -> None:
        self.pairs = 0
        self.conflicts = 0
        self.cos_sum = 0.0

    def record(self, stats: Mapping[str, Any]) -> None:
        if "cosine" not in stats:
            return
        cos = stats["cosine"]
        k = len(cos)
        self.pairs += k * (k - 1) // 2
        self.conflicts += stats["conflicts"]
        self.cos_sum += sum(cos[i][j] for i in range(k) for j in range(i + 1, k))

    def summary(self) -> Dict[str, Optional[float]]:
        return {
            "conflict_fraction": self.conflicts / self.pairs if self.pairs else None,
            "mean_cosine": self.cos_sum / self.pairs if self.pairs else None,
        }


def _batches(n: int, batch: int, epochs: int, gen: torch.Generator):  # type: ignore[no-untyped-def]
    """``(epoch_end, indices)`` of every step: a fresh permutation per epoch."""
    steps = math.ceil(n / batch)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(steps):
            yield b == steps - 1, perm[b * batch : (b + 1) * batch]


def _train_single(
    suite: Suite, model: nn.Module, data: Mapping[str, Tensor], task: int, gen: torch.Generator
) -> None:
    """The single-task baseline of task ``task``: inner Adam on the trunk and that head."""
    params = list(model.trunk.parameters()) + list(model.heads[task].parameters())  # type: ignore[index]
    inner = torch.optim.Adam(params, lr=suite.lr)
    x, y = data["x_train"], data["y_train"]
    if "labels" in data:  # partially labelled: the samples labelled for this task
        x, y = x[data["labels"][:, task]], y[data["labels"][:, task]]
    for _, idx in _batches(x.shape[0], suite.batch, suite.epochs, gen):
        _, outs = model(x[idx])
        loss = suite.losses([outs[task]], y[idx][:, task : task + 1])[0]
        inner.zero_grad()
        loss.backward()
        inner.step()


def _train_multitask(
    suite: Suite,
    model: nn.Module,
    data: Mapping[str, Tensor],
    opt: MultiTaskOptimizer,
    method: Method,
    gen: torch.Generator,
    history: Optional[StatsHistory],
    zero: bool = False,
) -> Dict[str, Any]:
    """Multi-task training with ``opt``; returns the conflict statistics of the run."""
    x, y = data["x_train"], data["y_train"]
    counter = ConflictCounter()
    for epoch_end, idx in suite.batches(data, gen):
        z, outs = model(x[idx])
        losses = suite.step_losses(outs, y[idx], idx, data, zero)
        opt.zero_grad()
        opt.step(losses, representation=z) if method.representation else opt.step(losses)
        counter.record(opt.last_stats)
        if history is not None:
            history.record(opt)
        if epoch_end:
            opt.epoch_end()
    return counter.summary()


def train_run(suite_name: str, method_name: str, seed: int, cfg: Config) -> Dict[str, Any]:
    """Train one model (multi-task with ``method_name``, or ``"single:<t>"``) and evaluate it."""
    _init_worker(cfg.threads)
    suite = cfg.suite(suite_name)
    data = suite.data(seed)
    torch.manual_seed(seed)
    model = suite.model().to(cfg.device)  # initialised on the CPU: the same weights on any device
    # the inputs and targets the model reads go to the device; the batching metadata stays
    placed = {**data, "x_train": data["x_train"].to(cfg.device), "y_train": data["y_train"].to(cfg.device)}
    total = math.ceil(data["x_train"].shape[0] / suite.batch) * suite.epochs
    gen = torch.Generator().manual_seed(10_007 * (seed + 1))
    stats: Dict[str, Any] = {}
    t0 = time.perf_counter()
    if method_name.startswith("single:"):
        task = int(method_name.split(":")[1])
        _train_single(suite, model, placed, task, gen)
    else:
        stats = _run_multitask(suite, model, placed, method_name, seed, total, gen, cfg)
    _synchronize(cfg.device)
    elapsed = time.perf_counter() - t0
    model.cpu().eval()
    metrics = suite.evaluate(model, data)
    if method_name.startswith("single:"):
        name = suite.tasks[int(method_name.split(":")[1])]
        metrics = {name: metrics[name]}
    return {
        "suite": suite_name,
        "method": method_name,
        "seed": seed,
        "metrics": metrics,
        "steps": total,
        "train_seconds": elapsed,
        "ms_per_step": 1e3 * elapsed / max(total, 1),
        **stats,
    }


def _run_multitask(
    suite: Suite,
    model: nn.Module,
    data: Mapping[str, Tensor],
    method_name: str,
    seed: int,
    total: int,
    gen: torch.Generator,
    cfg: Config,
) -> Dict[str, Any]:
    base, zero = method_name.removesuffix(ZERO), method_name.endswith(ZERO)
    method = METHODS[base]
    x, y = data["x_train"], data["y_train"]
    with torch.no_grad():
        _, outs = model(x[: suite.batch])
        first = [float(v) for v in suite.losses(outs, y[: suite.batch])]
    opt = make_optimizer(method, model, suite, seed, first, total, cfg.settings)
    diagnosed = cfg.plot_dir is not None and (suite.name, method_name, seed) == (*DIAGNOSED, cfg.seeds[0])
    history = StatsHistory() if diagnosed else None
    stats: Dict[str, Any] = _train_multitask(suite, model, data, opt, method, gen, history, zero)
    if history is not None and cfg.plot_dir is not None:
        title = f"{method_name} on {suite.name}, seed {seed}: task-gradient conflict over the run"
        plot_dir = Path(cfg.plot_dir)
        plot_dir.mkdir(parents=True, exist_ok=True)  # a fresh clone has no benchmarks/out/ yet
        plot_history(history, str(plot_dir / DIAGNOSTICS_PNG), title=title)
        stats = {"diagnostics_png": DIAGNOSTICS_PNG, **stats}
    return {
        **stats,
        "final_weights": opt.last_stats.get("weights"),
        "skipped_steps": opt.last_stats.get("skipped", 0),
        "gradient_mode": opt.last_stats.get("gradient_mode"),
    }


def toy_run(method_name: str, cfg: Config) -> List[Dict[str, Any]]:
    """Optimise the CAGrad toy's 2-D point from every start in ``TOY_STARTS`` with ``method_name``.

    All starts run in one optimizer: each start is its own parameter ``x_s`` and its own
    Gram block (``granularity=[[x_0], [x_1], ...]``), both losses are sums over the
    starts, ``L_i = sum_s L_i(x_s)``. Block ``s`` of the Jacobian is then exactly
    ``(grad L_1(x_s), grad L_2(x_s))``; surgery, per-task preconditioning and the inner
    Adam all act per block or per element, so every start follows exactly the trajectory
    it would follow alone (checked in ``tests/test_quality_smoke.py``), at one step's cost.
    """
    _init_worker(cfg.threads)
    if method_name not in TOY_ALLOWED:
        raise ValueError(f"method {method_name!r} is not run on the toy (its losses are negative)")
    method, toy = METHODS[method_name], cfg.toy
    points = [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in TOY_STARTS]
    opt = MultiTaskOptimizer(
        torch.optim.Adam(points, lr=toy.lr),
        seed=0,
        granularity=[[p] for p in points],
        gradient_mode="looped",  # two scalar losses of 2-vectors: the cheapest exact path
        **method.optimizer_kwargs(MethodContext(num_tasks=2, settings=cfg.settings)),
    )
    every = max(1, toy.steps // max(toy.points, 1))
    traj: List[List[List[float]]] = []
    t0 = time.perf_counter()
    for step in range(toy.steps):
        if step % every == 0:
            traj.append([[round(v, 5) for v in p.detach().tolist()] for p in points])
        l1, l2 = toy_losses(torch.stack(points))
        opt.zero_grad()
        opt.step([l1.sum(), l2.sum()])
    elapsed = time.perf_counter() - t0
    timing = {"train_seconds": elapsed, "ms_per_step": 1e3 * elapsed / max(toy.steps, 1)}
    return [
        {
            **_toy_result(method_name, s, p.detach().tolist(), toy),
            "trajectory": [t[s] for t in traj] + [p.detach().tolist()],
            **timing,
        }
        for s, p in enumerate(points)
    ]


def _toy_result(method_name: str, start: int, final: List[float], toy: ToyConfig) -> Dict[str, Any]:
    with torch.no_grad():
        f1, f2 = toy_losses(torch.tensor(final, dtype=torch.float64))
    losses = [float(f1), float(f2)]
    gap = distance_to_set(losses, toy_pareto_front())
    return {
        "suite": "toy",
        "method": method_name,
        "start": list(TOY_STARTS[start]),
        "final": final,
        "losses": losses,
        "mean_loss": 0.5 * (losses[0] + losses[1]),
        "distance_to_pareto_set": distance_to_set(final, toy_pareto_set()),
        "distance_to_pareto_front": gap,
        "stationarity": toy_stationarity(final),
        "reached_pareto": gap <= toy.tolerance,
    }


def _synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a run's time is its own."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


_THREADS_SET: Optional[int] = None


def _init_worker(threads: int) -> None:
    global _THREADS_SET
    if _THREADS_SET != threads:
        torch.set_num_threads(threads)
        _THREADS_SET = threads


# ---------------------------------------------------------------------- the job pool

Job = Tuple[str, Tuple[Any, ...]]


def build_jobs(cfg: Config) -> List[Job]:
    """Every run of the grid: per supervised suite and seed, its methods and single-task runs; toy methods."""
    jobs: List[Job] = []
    for name in SUPERVISED:
        if name not in cfg.suites:
            continue
        suite = cfg.suite(name)
        for seed in cfg.seeds:
            jobs += [
                ("train", (name, m, seed)) for m in suite.variants(cfg.methods) if m not in suite.unsupported
            ]
            jobs += [("train", (name, f"single:{t}", seed)) for t in range(len(suite.tasks))]
    if "toy" in cfg.suites:
        jobs += [("toy", (name,)) for name in cfg.toy_methods]
    return jobs


def _run_job(job: Job, cfg: Config) -> List[Dict[str, Any]]:
    kind, args = job
    if kind == "train":
        return [train_run(args[0], args[1], args[2], cfg)]
    return toy_run(args[0], cfg)


def _job_label(job: Job) -> str:
    kind, args = job
    return f"{args[0]}/{args[1]}/seed{args[2]}" if kind == "train" else f"toy/{args[0]}"


def run_jobs(jobs: Sequence[Job], cfg: Config, progress: bool = True) -> List[Dict[str, Any]]:
    """Run every job, in ``cfg.workers`` processes (in-process for 1), with a progress bar."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        tqdm = None
    bar = (
        tqdm(total=len(jobs), desc="quality", unit="run", file=sys.stderr, disable=not progress)
        if tqdm
        else None
    )

    def done(job: Job) -> None:
        if bar is not None:
            bar.set_postfix_str(_job_label(job), refresh=False)
            bar.update()

    results: List[Dict[str, Any]] = []
    try:
        if cfg.workers <= 1:
            for job in jobs:
                results.extend(_run_job(job, cfg))
                done(job)
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
                futures = {pool.submit(_run_job, job, cfg): job for job in jobs}
                for fut in as_completed(futures):
                    results.extend(fut.result())
                    done(futures[fut])
    finally:
        if bar is not None:
            bar.close()
    return results


def validate(cfg: Config) -> None:
    """Raise ``ValueError`` on an unknown method or suite."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    unknown += [m for m in cfg.toy_methods if m not in TOY_ALLOWED]
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; known: {', '.join(METHODS)} (toy: {', '.join(TOY_ALLOWED)})"
        )
    bad = [s for s in cfg.suites if s not in SUITES]
    if bad:
        raise ValueError(f"unknown suite(s) {bad}; known: {', '.join(SUITES)}")
