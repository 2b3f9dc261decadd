"""Training quality of every method: MultiDigits, scale imbalance and the conflict toy.

Trains and evaluates, for several seeds, each loss weighting, gradient surgery and
per-task preconditioning of ``multitask_optim`` (and useful combinations) on three
suites (see :mod:`benchmarks.quality_data`), plus single-task baselines on the same
architecture, and reports per-task test metrics and Delta_m% as mean +- std over seeds:

    python -m benchmarks.quality              # default grid, < 5 minutes on 2 CPU cores
    python -m benchmarks.quality --full       # more seeds, longer training, more methods
    python -m benchmarks.quality --suites toy --toy-methods equal,mgda,pcgrad

Delta_m% (Maninis et al. 2019; as used by Liu et al. 2021 and later work) is the mean
relative change of each task's metric against the single-task baseline, signed so that
**lower is better** (negative: the multi-task model beats the single-task models)::

    Delta_m% = 100 / T * sum_t (-1)^{l_t} (M_t - M_single_t) / M_single_t,
    l_t = 1 if higher is better for task t's metric, else 0.

``M_single_t`` is the single-task metric averaged over seeds; Delta_m% is computed per
seed and then summarised as mean +- sample std.

Training: every model of a suite (single-task baselines included) starts from the same
seeded initialisation and sees the same seeded batches. The inner optimizer is Adam with
the suite's learning rate (MultiDigits 5e-3, best of 2e-3 / 5e-3 / 1e-2; scale 3e-3,
better than 1e-3; chosen on seed 0 for the *single-task* baselines at the default budget,
so Delta_m% is not flattered by an under-trained reference), except the ``/sgd`` methods: SGD(1e-3,
momentum 0.9), with which per-task Adam preconditioning is exactly per-task Adam on the
trunk. Per-method settings (uncertainty's and GradNorm's own learning rates, PE-LTR's
bounds, ...) are in :class:`Config` and the JSON. Jobs run in ``--workers`` processes (one
torch thread each by default), each seeded, so results do not depend on scheduling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer
from multitask_optim.diagnostics import StatsHistory, plot_history

from .quality_data import (
    TOY_STARTS,
    DigitsConfig,
    MultiDigitsNet,
    ScaleConfig,
    ScaleNet,
    distance_to_set,
    make_multidigits,
    make_scale_data,
    toy_losses,
    toy_pareto_front,
    toy_pareto_set,
    toy_stationarity,
)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
SUITES = ("multidigits", "scale", "toy")

# ---------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One configuration of :class:`MultiTaskOptimizer`.

    Attributes:
        name: key used on the command line and in the JSON.
        label: human-readable description (the table's row label).
        surgery: ``surgery=`` argument.
        precondition: ``precondition=`` argument.
        weighting: ``weighting=`` argument (its kwargs are chosen per suite).
        representation: step in representation mode (``step(losses, representation=z)``).
        inner: the inner optimizer: ``"adam"`` (``Adam(lr)``, every method) or ``"sgd"``
            (``SGD(sgd_lr, momentum=0.9)``), with which per-task Adam preconditioning is
            exactly per-task Adam on the shared trunk (with an inner Adam a second, global
            normalisation follows it).
    """

    name: str
    label: str
    surgery: Optional[str] = None
    precondition: Optional[str] = None
    weighting: Optional[str] = None
    representation: bool = False
    inner: str = "adam"


_ALL_METHODS = (
    Method("equal", "equal weights (plain sum)"),
    Method("static", "static weights 1/L_i(0)", weighting="static"),
    Method("uncertainty", "uncertainty (Kendall)", weighting="uncertainty"),
    Method("dwa", "DWA", weighting="dwa"),
    Method("gradnorm", "GradNorm", weighting="gradnorm"),
    Method("mgda", "MGDA", surgery="mgda"),
    Method("mgda-ub", "MGDA-UB (representation)", surgery="mgda", representation=True),
    Method("pe-ltr", "PE-LTR (pareto)", surgery="pareto"),
    Method("htw", "HTW", weighting="htw"),
    Method("pcgrad", "PCGrad", surgery="pcgrad"),
    Method("gradvac", "GradVac", surgery="gradvac"),
    Method("adam-pre", "per-task Adam precond.", precondition="adam"),
    Method("adam-pre+pcgrad", "per-task Adam + PCGrad", surgery="pcgrad", precondition="adam"),
    Method("adam-pre+gradvac", "per-task Adam + GradVac", surgery="gradvac", precondition="adam"),
    Method("adam-pre/sgd", "per-task Adam precond., inner SGD-m", precondition="adam", inner="sgd"),
    Method("rlw", "RLW (random weights)", weighting="rlw"),
    Method("uncertainty+pcgrad", "uncertainty + PCGrad", surgery="pcgrad", weighting="uncertainty"),
    Method(
        "adam-pre/sgd+pcgrad",
        "per-task Adam + PCGrad, inner SGD-m",
        "pcgrad",
        precondition="adam",
        inner="sgd",
    ),
    Method(
        "adam-pre/sgd+gradvac",
        "per-task Adam + GradVac, inner SGD-m",
        "gradvac",
        precondition="adam",
        inner="sgd",
    ),
)
METHODS: Dict[str, Method] = {m.name: m for m in _ALL_METHODS}
#: the run whose per-step diagnostics (multitask_optim.diagnostics) the demo plots
DIAGNOSED = ("multidigits", "pcgrad")
DEFAULT_METHODS = tuple(m.name for m in _ALL_METHODS[:15])
FULL_METHODS = tuple(METHODS)
#: Weightings are left out of the toy: its losses are negative (down to -20), where
#: loss-ratio weightings (DWA, GradNorm, HTW) are undefined and uncertainty diverges.
TOY_DEFAULT = ("equal", "mgda", "pcgrad", "gradvac", "adam-pre", "adam-pre+pcgrad")
TOY_FULL = ("equal", "mgda", "pe-ltr", "pcgrad", "gradvac", "adam-pre", "adam-pre+pcgrad", "adam-pre+gradvac")
TOY_ALLOWED = tuple(
    m.name for m in _ALL_METHODS if m.weighting is None and not m.representation and m.inner == "adam"
)

# ---------------------------------------------------------------------- configuration


@dataclass
class Config:
    """Everything a run depends on (recorded in the JSON)."""

    suites: Tuple[str, ...] = SUITES
    seeds: Tuple[int, ...] = (0, 1, 2)
    methods: Tuple[str, ...] = DEFAULT_METHODS
    toy_methods: Tuple[str, ...] = TOY_DEFAULT
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    digits_epochs: int = 5
    digits_batch: int = 64
    digits_lr: float = 5e-3
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    scale_epochs: int = 10
    scale_batch: int = 100
    scale_lr: float = 3e-3
    toy_steps: int = 2500
    toy_lr: float = 2.4e-2
    toy_points: int = 300
    toy_tolerance: float = 0.1
    uncertainty_lr: float = 2e-2
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 2e-2
    dwa_temperature: float = 2.0
    htw_warmup: float = 0.1
    pe_ltr_bound: float = 0.2
    workers: int = 2
    threads: int = 1
    #: where the diagnostics plot of one run (PCGrad on MultiDigits, first seed) goes
    diagnostics_png: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["digits"] = asdict(self.digits)
        out["scale"] = asdict(self.scale)
        return out


# ---------------------------------------------------------------------- suites


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool


class Suite:
    """A supervised suite: data, model, per-task losses and test metrics."""

    name = ""
    title = ""
    #: the metric Delta_m% is computed on
    primary: Metric
    #: every reported metric (primary first)
    metrics: Tuple[Metric, ...]
    kind = "regression"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    def tasks(self) -> List[str]:
        raise NotImplementedError

    def data(self, seed: int) -> Dict[str, Tensor]:
        raise NotImplementedError

    def model(self) -> nn.Module:
        raise NotImplementedError

    def losses(self, outs: Sequence[Tensor], y: Tensor) -> List[Tensor]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Mapping[str, Tensor]) -> Dict[str, Dict[str, float]]:
        raise NotImplementedError

    epochs = 1
    batch = 1
    lr = 1e-3
    #: learning rate of the inner SGD (momentum 0.9) of ``inner="sgd"`` methods
    sgd_lr = 1e-3
    #: methods not run on this suite, with the reason (recorded in the JSON)
    unsupported: Dict[str, str] = {}


class DigitsSuite(Suite):
    name = "multidigits"
    title = "MultiDigits (two overlapped sklearn digits, small CNN)"
    primary = Metric("accuracy", True)
    metrics = (Metric("accuracy", True), Metric("loss", False))
    kind = "classification"

    @property
    def tasks(self) -> List[str]:
        return ["left", "right"]

    @property
    def epochs(self) -> int:  # type: ignore[override]
        return self.cfg.digits_epochs

    @property
    def batch(self) -> int:  # type: ignore[override]
        return self.cfg.digits_batch

    @property
    def lr(self) -> float:  # type: ignore[override]
        return self.cfg.digits_lr

    def data(self, seed: int) -> Dict[str, Tensor]:
        return make_multidigits(seed, self.cfg.digits)

    def model(self) -> nn.Module:
        return MultiDigitsNet(self.cfg.digits, num_tasks=2)

    def losses(self, outs: Sequence[Tensor], y: Tensor) -> List[Tensor]:
        return [F.cross_entropy(o, y[:, t]) for t, o in enumerate(outs)]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Mapping[str, Tensor]) -> Dict[str, Dict[str, float]]:
        x, y = data["x_test"], data["y_test"]
        correct = torch.zeros(2)
        loss = torch.zeros(2, dtype=torch.float64)
        for i in range(0, x.shape[0], 1000):
            _, outs = model(x[i : i + 1000])
            for t, o in enumerate(outs):
                yt = y[i : i + 1000, t]
                correct[t] += (o.argmax(1) == yt).sum()
                loss[t] += F.cross_entropy(o, yt, reduction="sum").double()
        n = x.shape[0]
        return {
            task: {"accuracy": float(correct[t]) / n, "loss": float(loss[t]) / n}
            for t, task in enumerate(self.tasks)
        }


class ScaleSuite(Suite):
    name = "scale"
    title = "Scale imbalance (GradNorm synthetic regression, sigma_i spread widely)"
    primary = Metric("nmse", False)
    metrics = (Metric("nmse", False),)
    kind = "regression"
    unsupported = {
        m.name: (
            "inner SGD: precondition= rescales only the shared rows, so the task heads get raw "
            "gradients ~sigma_i^2 (up to 1e6 apart) and SGD diverges at any learning rate that still "
            "trains the sigma=1 task"
        )
        for m in _ALL_METHODS
        if m.inner == "sgd"
    }

    @property
    def tasks(self) -> List[str]:
        return [f"sigma={s:g}" for s in self.cfg.scale.sigmas]

    @property
    def epochs(self) -> int:  # type: ignore[override]
        return self.cfg.scale_epochs

    @property
    def batch(self) -> int:  # type: ignore[override]
        return self.cfg.scale_batch

    @property
    def lr(self) -> float:  # type: ignore[override]
        return self.cfg.scale_lr

    def data(self, seed: int) -> Dict[str, Tensor]:
        return make_scale_data(seed, self.cfg.scale)

    def model(self) -> nn.Module:
        return ScaleNet(self.cfg.scale)

    def losses(self, outs: Sequence[Tensor], y: Tensor) -> List[Tensor]:
        return [F.mse_loss(o, y[:, t]) for t, o in enumerate(outs)]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Mapping[str, Tensor]) -> Dict[str, Dict[str, float]]:
        _, outs = model(data["x_test"])
        y = data["y_test"]
        out = {}
        for t, (task, sigma) in enumerate(zip(self.tasks, self.cfg.scale.sigmas)):
            mse = float(F.mse_loss(outs[t], y[:, t]).double())
            out[task] = {"nmse": mse / (sigma * sigma)}
        return out


SUITE_CLASSES: Dict[str, type] = {"multidigits": DigitsSuite, "scale": ScaleSuite}

# ---------------------------------------------------------------------- training


def make_optimizer(
    method: Method,
    model: nn.Module,
    suite: Suite,
    seed: int,
    first_losses: Sequence[float],
    total_steps: int,
) -> MultiTaskOptimizer:
    """``MultiTaskOptimizer`` over an inner Adam for ``method`` on ``suite``."""
    cfg = suite.cfg
    names = suite.tasks
    k = len(names)
    kwargs: Dict[str, Any] = {
        "surgery": method.surgery,
        "precondition": method.precondition,
        "seed": seed,
        "task_names": names,
    }
    if method.surgery == "pareto":
        kwargs["surgery_kwargs"] = {"lower_bounds": cfg.pe_ltr_bound / k}
    w = method.weighting
    if w is not None:
        kwargs["weighting"] = w
        if w == "static":
            inv = [1.0 / max(v, 1e-12) for v in first_losses]
            kwargs["weighting_kwargs"] = {"weights": [k * v / sum(inv) for v in inv]}
        elif w == "uncertainty":
            kwargs["weighting_kwargs"] = {"kind": suite.kind, "lr": cfg.uncertainty_lr}
        elif w == "dwa":
            kwargs["weighting_kwargs"] = {"temperature": cfg.dwa_temperature}
        elif w == "gradnorm":
            kwargs["weighting_kwargs"] = {
                "alpha": cfg.gradnorm_alpha,
                "lr": cfg.gradnorm_lr,
                "layer": model.last_shared(),  # type: ignore[operator]
            }
        elif w == "htw":
            kwargs["weighting_kwargs"] = {
                "main_task": 0,
                "total_steps": total_steps,
                "warmup": cfg.htw_warmup,
            }
        elif w == "rlw":
            kwargs["weighting_kwargs"] = {"scale": "sumK"}
    if method.inner == "sgd":
        inner: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=suite.sgd_lr, momentum=0.9)
    else:
        inner = torch.optim.Adam(model.parameters(), lr=suite.lr)
    return MultiTaskOptimizer(inner, **kwargs)


def train_run(suite_name: str, method_name: str, seed: int, cfg: Config) -> Dict[str, Any]:
    """Train one model (multi-task with ``method_name``, or ``"single:<t>"``) and evaluate it."""
    _init_worker(cfg.threads)
    suite: Suite = SUITE_CLASSES[suite_name](cfg)
    data = suite.data(seed)
    torch.manual_seed(seed)
    model = suite.model()
    x, y = data["x_train"], data["y_train"]
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / suite.batch)
    total = steps_per_epoch * suite.epochs
    gen = torch.Generator().manual_seed(10_007 * (seed + 1))
    single = method_name.startswith("single:")
    task = int(method_name.split(":")[1]) if single else -1
    stats: Dict[str, Any] = {}
    if single:
        params = list(model.trunk.parameters()) + list(model.heads[task].parameters())  # type: ignore[index]
        inner = torch.optim.Adam(params, lr=suite.lr)
        opt: Optional[MultiTaskOptimizer] = None
        method = None
    else:
        method = METHODS[method_name]
        with torch.no_grad():
            _, outs = model(x[: suite.batch])
            first = [float(v) for v in suite.losses(outs, y[: suite.batch])]
        opt = make_optimizer(method, model, suite, seed, first, total)
    conflicts = 0
    pairs = 0
    cos_sum = 0.0
    diagnosed = (suite_name, method_name, seed) == (DIAGNOSED[0], DIAGNOSED[1], cfg.seeds[0])
    history = StatsHistory() if diagnosed and cfg.diagnostics_png and opt is not None else None
    t0 = time.perf_counter()
    for _ in range(suite.epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * suite.batch : (b + 1) * suite.batch]
            z, outs = model(x[idx])
            if single:
                loss = suite.losses([outs[task]], y[idx][:, task : task + 1])[0]
                inner.zero_grad()
                loss.backward()
                inner.step()
                continue
            assert opt is not None and method is not None
            losses = dict(zip(suite.tasks, suite.losses(outs, y[idx])))
            opt.zero_grad()
            if method.representation:
                opt.step(losses, representation=z)
            else:
                opt.step(losses)
            st = opt.last_stats
            if history is not None:
                history.record(opt)
            if "cosine" in st:
                k = len(st["cosine"])
                pairs += k * (k - 1) // 2
                conflicts += st["conflicts"]
                cos_sum += sum(st["cosine"][i][j] for i in range(k) for j in range(i + 1, k))
        if opt is not None:
            opt.epoch_end()
    elapsed = time.perf_counter() - t0
    if history is not None and cfg.diagnostics_png:
        title = f"{method_name} on {suite_name}, seed {seed}: task-gradient conflict over the run"
        stats["diagnostics_png"] = plot_history(history, cfg.diagnostics_png, title=title)
    model.eval()
    metrics = suite.evaluate(model, data)
    if single:
        metrics = {suite.tasks[task]: metrics[suite.tasks[task]]}
    elif opt is not None:
        stats = {
            **stats,
            "conflict_fraction": conflicts / pairs if pairs else None,
            "mean_cosine": cos_sum / pairs if pairs else None,
            "final_weights": opt.last_stats.get("weights"),
            "skipped_steps": opt.last_stats.get("skipped", 0),
            "gradient_mode": opt.last_stats.get("gradient_mode"),
        }
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
    method = METHODS[method_name]
    if method_name not in TOY_ALLOWED:
        raise ValueError(f"method {method_name!r} is not run on the toy (its losses are negative)")
    points = [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in TOY_STARTS]
    kwargs: Dict[str, Any] = {
        "surgery": method.surgery,
        "precondition": method.precondition,
        "seed": 0,
        "granularity": [[p] for p in points],
        "gradient_mode": "looped",  # two scalar losses of 2-vectors: the cheapest exact path
    }
    if method.surgery == "pareto":
        kwargs["surgery_kwargs"] = {"lower_bounds": cfg.pe_ltr_bound / 2}
    opt = MultiTaskOptimizer(torch.optim.Adam(points, lr=cfg.toy_lr), **kwargs)
    every = max(1, cfg.toy_steps // max(cfg.toy_points, 1))
    traj: List[List[List[float]]] = []
    t0 = time.perf_counter()
    for step in range(cfg.toy_steps):
        if step % every == 0:
            traj.append([[round(v, 5) for v in p.detach().tolist()] for p in points])
        l1, l2 = toy_losses(torch.stack(points))
        opt.zero_grad()
        opt.step([l1.sum(), l2.sum()])
    elapsed = time.perf_counter() - t0
    pareto = toy_pareto_set()
    front = toy_pareto_front()
    out = []
    for s, p in enumerate(points):
        final = p.detach().tolist()
        with torch.no_grad():
            f1, f2 = toy_losses(p.detach())
        losses = [float(f1), float(f2)]
        dist = distance_to_set(final, pareto)
        gap = distance_to_set(losses, front)
        out.append(
            {
                "suite": "toy",
                "method": method_name,
                "start": list(TOY_STARTS[s]),
                "final": final,
                "losses": losses,
                "mean_loss": 0.5 * (losses[0] + losses[1]),
                "distance_to_pareto_set": dist,
                "distance_to_pareto_front": gap,
                "stationarity": toy_stationarity(final),
                "reached_pareto": gap <= cfg.toy_tolerance,
                "trajectory": [t[s] for t in traj] + [final],
                "train_seconds": elapsed,
                "ms_per_step": 1e3 * elapsed / max(cfg.toy_steps, 1),
            }
        )
    return out


_THREADS_SET: Optional[int] = None


def _init_worker(threads: int) -> None:
    global _THREADS_SET
    if _THREADS_SET != threads:
        torch.set_num_threads(threads)
        _THREADS_SET = threads


# ---------------------------------------------------------------------- statistics


def delta_m(
    metrics: Mapping[str, float], baseline: Mapping[str, float], higher_is_better: Mapping[str, bool]
) -> float:
    """Delta_m% = 100/T sum_t (-1)^{l_t} (M_t - B_t) / B_t, l_t = 1 if higher is better.

    Lower is better; negative means the multi-task model beats the baseline on average.

    Raises:
        ValueError: if the tasks differ or a baseline value is 0.
    """
    if set(metrics) != set(baseline) or set(metrics) != set(higher_is_better):
        raise ValueError(
            f"delta_m: tasks differ: {sorted(metrics)} / {sorted(baseline)} / {sorted(higher_is_better)}"
        )
    if not metrics:
        raise ValueError("delta_m: no tasks")
    total = 0.0
    for task, value in metrics.items():
        base = baseline[task]
        if base == 0:
            raise ValueError(f"delta_m: baseline of task {task!r} is 0")
        sign = -1.0 if higher_is_better[task] else 1.0
        total += sign * (value - base) / base
    return 100.0 * total / len(metrics)


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def summarise_suite(
    suite: Suite, runs: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> Dict[str, Any]:
    """Group the runs of one supervised suite into the JSON section (with Delta_m%)."""
    tasks = suite.tasks
    seeds = sorted({r["seed"] for r in runs})
    single: Dict[str, Dict[str, Any]] = {}
    for t, task in enumerate(tasks):
        rs = [r for r in runs if r["method"] == f"single:{t}"]
        single[task] = {m.name: mean_std([r["metrics"][task][m.name] for r in rs]) for m in suite.metrics} | {
            "per_seed": {str(r["seed"]): r["metrics"][task] for r in rs}
        }
    baseline = {task: single[task][suite.primary.name]["mean"] for task in tasks}
    higher = {task: suite.primary.higher_is_better for task in tasks}
    out_methods: Dict[str, Any] = {}
    for name in methods:
        rs = sorted((r for r in runs if r["method"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        per_seed = []
        for r in rs:
            prim = {task: r["metrics"][task][suite.primary.name] for task in tasks}
            entry = {k: v for k, v in r.items() if k not in ("suite", "method")}
            entry["delta_m"] = delta_m(prim, baseline, higher)
            per_seed.append(entry)
        summary = {
            task: {m.name: mean_std([p["metrics"][task][m.name] for p in per_seed]) for m in suite.metrics}
            for task in tasks
        }
        out_methods[name] = {
            "label": METHODS[name].label,
            "options": {
                "surgery": METHODS[name].surgery,
                "precondition": METHODS[name].precondition,
                "weighting": METHODS[name].weighting,
                "representation": METHODS[name].representation,
            },
            "summary": summary,
            "delta_m": mean_std([p["delta_m"] for p in per_seed]),
            "ms_per_step": statistics.fmean(p["ms_per_step"] for p in per_seed),
            "conflict_fraction": _mean_or_none([p.get("conflict_fraction") for p in per_seed]),
            "per_seed": per_seed,
        }
    return {
        "title": suite.title,
        "not_run": {name: suite.unsupported[name] for name in methods if name in suite.unsupported},
        "tasks": tasks,
        "primary_metric": asdict(suite.primary),
        "metrics": [asdict(m) for m in suite.metrics],
        "seeds": seeds,
        "single_task": single,
        "methods": out_methods,
    }


def summarise_toy(runs: Sequence[Mapping[str, Any]], methods: Sequence[str], cfg: Config) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in methods:
        rs = sorted(
            (r for r in runs if r["method"] == name), key=lambda r: TOY_STARTS.index(tuple(r["start"]))
        )
        if not rs:
            continue
        out[name] = {
            "label": METHODS[name].label,
            "reached": sum(1 for r in rs if r["reached_pareto"]),
            "runs": [{k: v for k, v in r.items() if k not in ("suite", "method")} for r in rs],
        }
    return {
        "title": "Conflict toy (CAGrad paper, 2-D parameter, inner Adam)",
        "starts": [list(s) for s in TOY_STARTS],
        "steps": cfg.toy_steps,
        "lr": cfg.toy_lr,
        "tolerance": cfg.toy_tolerance,
        "pareto_set": [list(p) for p in toy_pareto_set()],
        "pareto_front": [list(p) for p in toy_pareto_front()],
        "methods": out,
    }


def _mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


# ---------------------------------------------------------------------- tables


def _pm(stat: Mapping[str, float], digits: int = 2, scale: float = 1.0) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _fmt_metric(metric: str, stat: Mapping[str, float]) -> str:
    if metric == "accuracy":
        return _pm(stat, 2, 100.0)
    if metric == "nmse":
        return f"{stat['mean']:.3g} ± {stat['std']:.2g}"
    return _pm(stat, 3)


def suite_table(section: Mapping[str, Any]) -> str:
    """Markdown table: per-task metrics and Delta_m% (mean ± std), one row per method."""
    tasks = section["tasks"]
    metrics = [m["name"] for m in section["metrics"]]
    unit = {"accuracy": "acc. %", "loss": "loss", "nmse": "MSE/σ²"}
    head = [f"{t} {unit.get(m, m)}" for t in tasks for m in metrics]
    lines = [
        "| method | " + " | ".join(head) + " | Δm% ↓ | conflict % | ms/step |",
        "|---|" + "---:|" * (len(head) + 3),
    ]
    single = section["single_task"]
    cells = [_fmt_metric(m, single[t][m]) for t in tasks for m in metrics]
    lines.append("| single-task baselines | " + " | ".join(cells) + " | 0 (reference) | | |")
    for entry in section["methods"].values():
        cells = [_fmt_metric(m, entry["summary"][t][m]) for t in tasks for m in metrics]
        conflict = entry.get("conflict_fraction")
        conflict_s = f"{100 * conflict:.0f}" if conflict is not None else ""
        lines.append(
            f"| {entry['label']} | "
            + " | ".join(cells)
            + f" | {_pm(entry['delta_m'], 2)} | {conflict_s} | {entry['ms_per_step']:.1f} |"
        )
    return "\n".join(lines)


def toy_table(section: Mapping[str, Any]) -> str:
    starts = section["starts"]
    head = [f"({s[0]:g}, {s[1]:g})" for s in starts]
    lines = [
        "| method | " + " | ".join(head) + " | reached Pareto set |",
        "|---|" + "---|" * len(head) + "---:|",
    ]
    for entry in section["methods"].values():
        by_start = {tuple(r["start"]): r for r in entry["runs"]}
        cells = []
        for s in starts:
            r = by_start.get(tuple(s))
            if r is None:
                cells.append("")
                continue
            mark = "✓" if r["reached_pareto"] else "✗"
            cells.append(f"{r['losses'][0]:.2f}, {r['losses'][1]:.2f} {mark}")
        lines.append(
            f"| {entry['label']} | " + " | ".join(cells) + f" | {entry['reached']}/{len(entry['runs'])} |"
        )
    return "\n".join(lines)


def report(doc: Mapping[str, Any]) -> str:
    parts = []
    for name in SUITES:
        section = doc["suites"].get(name)
        if section is None:
            continue
        if name == "toy":
            parts.append(
                f"### {section['title']}\n\nFinal (L1, L2) from each start, {section['steps']} steps of "
                f"Adam(lr={section['lr']:g}) on the 2-D point; ✓ = the final (L1, L2) is within "
                f"{section['tolerance']:g} of the Pareto front (Euclidean, loss space).\n\n"
                + toy_table(section)
            )
        else:
            seeds = len(section["seeds"])
            parts.append(
                f"### {section['title']}\n\nTest metrics, mean ± std over {seeds} seed(s); "
                "Δm% against the single-task baselines (lower is better). "
                "conflict % = share of steps×task pairs whose gradients on the shared trunk have a "
                "negative inner product (for MGDA-UB: on the shared features).\n\n"
                + suite_table(section)
                + "".join(
                    f"\n\nNot run here: {METHODS[n].label}: {why}."
                    for n, why in section.get("not_run", {}).items()
                )
            )
    return "\n\n".join(parts)


# ---------------------------------------------------------------------- plots


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
        paths.append(str(path))
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
    paths = [str(path)]

    # objective space: the Pareto front and where each run ended
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
    paths.append(str(path))
    return paths


# ---------------------------------------------------------------------- driver


Job = Tuple[str, Tuple[Any, ...]]


def build_jobs(cfg: Config) -> List[Job]:
    """Every run of the grid, the slowest first (better packing over workers)."""
    jobs: List[Job] = []
    for suite in ("multidigits", "scale"):
        if suite not in cfg.suites:
            continue
        tasks = SUITE_CLASSES[suite](cfg).tasks
        for seed in cfg.seeds:
            unsupported = SUITE_CLASSES[suite].unsupported
            for name in cfg.methods:
                if name in unsupported:
                    continue
                jobs.append(("train", (suite, name, seed)))
            for t in range(len(tasks)):
                jobs.append(("train", (suite, f"single:{t}", seed)))
    if "toy" in cfg.suites:
        for name in cfg.toy_methods:
            jobs.append(("toy", (name,)))
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
    results: List[Dict[str, Any]] = []
    try:
        if cfg.workers <= 1:
            for job in jobs:
                if bar is not None:
                    bar.set_postfix_str(_job_label(job), refresh=False)
                results.extend(_run_job(job, cfg))
                if bar is not None:
                    bar.update()
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
                futures = {pool.submit(_run_job, job, cfg): job for job in jobs}
                for fut in as_completed(futures):
                    results.extend(fut.result())
                    if bar is not None:
                        bar.set_postfix_str(_job_label(futures[fut]), refresh=False)
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


def run(cfg: Config, progress: bool = True) -> Dict[str, Any]:
    """Run the grid of ``cfg`` and return the JSON document."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    unknown += [m for m in cfg.toy_methods if m not in TOY_ALLOWED]
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; known: {', '.join(METHODS)} (toy: {', '.join(TOY_ALLOWED)})"
        )
    bad = [s for s in cfg.suites if s not in SUITES]
    if bad:
        raise ValueError(f"unknown suite(s) {bad}; known: {', '.join(SUITES)}")
    t0 = time.perf_counter()
    if "toy" in cfg.suites:
        toy_pareto_set()  # computed once here rather than in every worker's first job
    results = run_jobs(build_jobs(cfg), cfg, progress)
    doc: Dict[str, Any] = {
        "benchmark": "quality",
        "config": cfg.to_dict(),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "workers": cfg.workers,
            "threads_per_worker": cfg.threads,
        },
        "suites": {},
    }
    for name in ("multidigits", "scale"):
        if name in cfg.suites:
            suite = SUITE_CLASSES[name](cfg)
            runs = [r for r in results if r["suite"] == name]
            doc["suites"][name] = summarise_suite(suite, runs, cfg.methods)
    if "toy" in cfg.suites:
        doc["suites"]["toy"] = summarise_toy(
            [r for r in results if r["suite"] == "toy"], cfg.toy_methods, cfg
        )
    doc["wall_seconds"] = time.perf_counter() - t0
    return doc


_NUMBER_LIST = re.compile(
    r"\[\s*((?:-?[0-9][0-9.eE+-]*|true|false|null)(?:,\s*(?:-?[0-9][0-9.eE+-]*|true|false|null))*)\s*\]"
)


def dumps(doc: Any) -> str:
    """JSON with an indent, but every innermost list of numbers on one line."""
    text = json.dumps(doc, indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def _csv(value: str) -> Tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="complete grid: 5 seeds, longer training, all methods")
    p.add_argument("--suites", type=_csv, default=None, help=f"comma-separated, from {','.join(SUITES)}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --full 5)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument(
        "--methods", type=_csv, default=None, help=f"supervised suites; 'all' or from {','.join(METHODS)}"
    )
    p.add_argument("--toy-methods", type=_csv, default=None, help=f"from {','.join(TOY_ALLOWED)}")
    p.add_argument("--digits-epochs", type=int, default=None)
    p.add_argument("--digits-train", type=int, default=None, help="training images")
    p.add_argument("--digits-test", type=int, default=None, help="test images")
    p.add_argument("--scale-epochs", type=int, default=None)
    p.add_argument("--scale-train", type=int, default=None, help="training samples")
    p.add_argument("--scale-test", type=int, default=None, help="test samples")
    p.add_argument("--toy-steps", type=int, default=None)
    p.add_argument("--toy-lr", type=float, default=None)
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    p.add_argument("--json", type=Path, default=RESULTS / "quality.json")
    p.add_argument("--markdown", type=Path, default=RESULTS / "quality.md")
    p.add_argument("--plot-dir", type=Path, default=RESULTS)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config()
    if args.full:
        cfg = replace(
            cfg,
            seeds=(0, 1, 2, 3, 4),
            methods=FULL_METHODS,
            toy_methods=TOY_FULL,
            digits=replace(cfg.digits, n_train=10000, n_test=3000),
            digits_epochs=15,
            scale_epochs=40,
            toy_steps=100000,  # the CAGrad paper's setting: Adam(lr=1e-3), 100k steps
            toy_lr=1e-3,
        )
    n_seeds = args.seeds if args.seeds is not None else len(cfg.seeds)
    cfg.seeds = tuple(range(args.first_seed, args.first_seed + n_seeds))
    if args.suites is not None:
        cfg.suites = args.suites
    if args.methods is not None:
        cfg.methods = FULL_METHODS if args.methods == ("all",) else args.methods
    if args.toy_methods is not None:
        cfg.toy_methods = TOY_ALLOWED if args.toy_methods == ("all",) else args.toy_methods
    digits, scale = cfg.digits, cfg.scale
    if args.digits_train is not None:
        digits = replace(digits, n_train=args.digits_train)
    if args.digits_test is not None:
        digits = replace(digits, n_test=args.digits_test)
    if args.scale_train is not None:
        scale = replace(scale, n_train=args.scale_train)
    if args.scale_test is not None:
        scale = replace(scale, n_test=args.scale_test)
    cfg.digits, cfg.scale = digits, scale
    for attr in ("digits_epochs", "scale_epochs", "toy_steps", "toy_lr"):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg, attr, value)
    cfg.workers = args.workers if args.workers is not None else max(1, min(2, os.cpu_count() or 1))
    cfg.threads = args.threads if args.threads is not None else 1
    if not args.no_plots:
        cfg.diagnostics_png = str(args.plot_dir / "quality_diagnostics.png")
    return cfg


def _shown(path: str) -> str:
    """``path`` relative to the repository when inside it (as the JSON records it)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    cfg = config_from(args)
    command = "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = run(cfg, progress=not args.no_progress)
    doc["command"] = command.strip()
    text = report(doc)
    print(text)
    print(f"\nwall time: {doc['wall_seconds']:.1f} s ({cfg.workers} worker(s) x {cfg.threads} thread(s))")
    if not args.no_plots:
        doc["plots"] = [_shown(p) for p in make_plots(doc, args.plot_dir)]
        if cfg.diagnostics_png and Path(cfg.diagnostics_png).exists():
            doc["plots"].append(_shown(cfg.diagnostics_png))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(dumps(doc) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        md = (
            f"<!-- written by `{doc['command']}`; wall time {doc['wall_seconds']:.0f} s on "
            f"{doc['machine']['cpus']} CPU(s), torch {doc['machine']['torch']} -->\n\n" + text + "\n"
        )
        args.markdown.write_text(md)
    return doc


if __name__ == "__main__":
    main()
