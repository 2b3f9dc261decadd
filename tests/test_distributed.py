"""torch.distributed: two ranks on half a batch each equal one process on the whole batch
(gloo on the CPU; NCCL, one GPU per rank, where every rank has a GPU).

Two processes are spawned once for the module (``torch.multiprocessing``, start method
``spawn``, rendezvous through a file in ``tmp_path``: no network port). Each rank runs
every configuration below for 10 steps on its half of a fixed batch and saves its
parameters and the optimizer's ``"multitask"`` state with ``torch.save``; the parent
process runs the same configurations on the whole batch without a process group and
compares. The optimizer averages the per-task gradients and loss values across ranks in
one bucketed ``all_reduce`` before weighting, preconditioning and aggregation, so both
ranks compute the same Gram, coefficients and update, equal (up to float32 summation
order) to single-process training on the global batch; the ranks stay bitwise identical.

Configurations: PCGrad and GradVac with K = 2 and K = 3, each for a plain replicated
model and for the model wrapped in ``DistributedDataParallel`` whose forward runs
under ``ddp.no_sync()`` (DDP's own reducer is never used); plus GradVac with per-task
Adam preconditioning and uncertainty weighting, accumulation of two micro-batches per
rank, a NaN loss on one rank only (both ranks skip that step, no deadlock), and PCGrad
under DDP with an inner SGD without momentum (whose update is linear in the averaged
gradients, so a mis-scaled average cannot hide behind Adam's normalisation). Representation
mode (MGDA-UB) runs with Adam, and with an inner SGD alone and under GradNorm (whose weight
step reads the Gram's scale) for the same reason.

Tasks missing from a batch (issue 14): each rank labels a different number of rows per
task (none on some steps), so a task is present on some ranks only; its gradient is the
average over the ranks that had it, weighted by the sample counts passed as
``samples=`` (or unweighted), which equals one process on the union of the labelled
rows. One configuration also runs the surgery every other step (plain steps: one
collective for the loss values, one for the gradients) with uncertainty weighting and
gradient clipping.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from models import MultiHead
from ranks import HANG_TIMEOUT_S, backend, rank_device, tasks_on_one_rank
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer

WORLD = 2
STEPS = 10
BATCH = 16
IN_DIM = 6
HIDDEN = 12
TIMEOUT_S = HANG_TIMEOUT_S
#: Where this process's models and batches live: a rank's own GPU where every rank has
#: one (NCCL), else the CPU (gloo); the one-process references stay on the CPU.
DEVICE = torch.device("cpu")

# name -> settings. "wrap": "plain" or "ddp"; "micro": micro-batches per rank (accumulate);
# "nan_step": the step at which rank 1's first loss is NaN (both ranks must skip it).
CONFIGS: Dict[str, Dict[str, Any]] = {}
for _wrap in ("plain", "ddp"):
    for _surgery in ("pcgrad", "gradvac"):
        for _k in (2, 3):
            CONFIGS[f"{_wrap}-{_surgery}-k{_k}"] = {"wrap": _wrap, "surgery": _surgery, "k": _k}
CONFIGS["plain-gradvac-k3-adam-uncertainty"] = {
    "wrap": "plain",
    "surgery": "gradvac",
    "k": 3,
    "precondition": "adam",
    "weighting": "uncertainty",
}
CONFIGS["ddp-pcgrad-k2-accumulate"] = {"wrap": "ddp", "surgery": "pcgrad", "k": 2, "micro": 2}
CONFIGS["plain-pcgrad-k2-nan-on-rank1"] = {"wrap": "plain", "surgery": "pcgrad", "k": 2, "nan_step": 4}
# Inner SGD without momentum: the update is linear in the averaged gradients, so an
# average divided by the world size twice shows (Adam's normalisation would hide it).
CONFIGS["ddp-pcgrad-k2-sgd"] = {"wrap": "ddp", "surgery": "pcgrad", "k": 2, "inner": "sgd"}
# Tasks absent on some ranks: "samples" labels 0, 3 or 8 rows per task and rank (passed as
# samples=), "whole" labels all or none of a rank's rows.
CONFIGS["plain-gradvac-k3-absent-samples"] = {
    "wrap": "plain",
    "surgery": "gradvac",
    "k": 3,
    "precondition": "adam",
    "absent": "samples",
}
CONFIGS["ddp-pcgrad-k3-absent-every2"] = {
    "wrap": "ddp",
    "surgery": "pcgrad",
    "k": 3,
    "absent": "whole",
    "surgery_every": 2,
    "weighting": "uncertainty",
    "max_grad_norm": 0.3,
}


def labelled(cfg: Dict[str, Any], step: int, task: int, rank: int) -> int:
    """How many of its rows rank ``rank`` labels for ``task`` at ``step`` (every rank has a task)."""
    per_rank = BATCH // WORLD
    if "absent" not in cfg or step == 0:  # the first step discovers the partition: every task
        return per_rank
    kind = (step + task + 2 * rank) % 3
    if cfg["absent"] == "whole":
        return 0 if kind == 0 else per_rank
    return [0, 3, per_rank][kind]


def expected_collectives(cfg: Dict[str, Any]) -> List[int]:
    """One collective per step; a plain step under a process group needs two (values, then gradients)."""
    every = cfg.get("surgery_every", 1)
    if cfg.get("representation"):  # values and task gradients (two dtypes), the Grams, the trunk update
        return [4] * STEPS
    return [1 if step % every == 0 else 2 for step in range(STEPS)]


# the row-based surgeries: rows (and loss values) are averaged before them, and every
# random draw (GradDrop) comes from the optimizer's generator, the same on every rank
for _surgery in ("graddrop", "trimmed_mean", "excess_mtl", "db_mtl", "moco"):
    CONFIGS[f"ddp-{_surgery}-k3"] = {"wrap": "ddp", "surgery": _surgery, "k": 3}


# representation mode over linear heads (factored rows: HeadFactor) and MGDA-UB
CONFIGS["plain-mgda-k3-representation"] = {"wrap": "plain", "surgery": "mgda", "k": 3, "representation": True}
# ... with an inner SGD without momentum: the trunk update, the heads' gradients and the
# loss values averaged across the ranks show any uniform mis-scaling (Adam's normalisation
# hides it); GradNorm's weight step reads the Gram's scale (MGDA-UB's coefficients do not).
for _weighting in (None, "gradnorm"):
    CONFIGS[f"plain-mgda-k3-representation-sgd-{_weighting}"] = {
        "wrap": "plain",
        "surgery": "mgda",
        "k": 3,
        "representation": True,
        "inner": "sgd",
        "weighting": _weighting,
    }


def forward(model: nn.Module, x: Tensor, cfg: Dict[str, Any]) -> Tuple[List[Tensor], Optional[Tensor]]:
    """The outputs, and the trunk's output for representation mode (else None)."""
    if not cfg.get("representation"):
        return model(x), None
    z = model.trunk(x)
    return [head(z) for head in model.heads], z


def build_model(k: int) -> MultiHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return MultiHead(k, IN_DIM, HIDDEN).to(DEVICE)


def full_batch(step: int, k: int) -> Tuple[Tensor, List[Tensor]]:
    g = torch.Generator().manual_seed(97 * step + 5)
    x = torch.randn(BATCH, IN_DIM, generator=g)
    base = torch.randn(BATCH, 2, generator=g) + 1.0
    targets = [(-1.0) ** i * base + 0.3 * torch.randn(BATCH, 2, generator=g) for i in range(k)]
    return x.to(DEVICE), [t.to(DEVICE) for t in targets]


def make_optimizer(model: nn.Module, cfg: Dict[str, Any]) -> MultiTaskOptimizer:
    if cfg.get("inner") == "sgd":
        inner: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    return MultiTaskOptimizer(
        inner,
        surgery=cfg["surgery"],
        precondition=cfg.get("precondition"),
        weighting=cfg.get("weighting"),
        num_tasks=cfg["k"],
        seed=7,
        surgery_every=cfg.get("surgery_every", 1),
        max_grad_norm=cfg.get("max_grad_norm"),
    )


def run_config(cfg: Dict[str, Any], rank: int, world: int) -> Dict[str, Any]:
    """Train one configuration for ``STEPS`` steps, this rank on its contiguous share of each batch.

    Also counts the ``all_reduce`` calls of every step (the optimizer's only collective).
    """
    k = cfg["k"]
    model = build_model(k)
    net: nn.Module = model
    if cfg["wrap"] == "ddp":
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[DEVICE.index] if DEVICE.index is not None else None
        )
    opt = make_optimizer(model, cfg)
    conflicts = 0
    skipped_steps: List[int] = []
    per_rank = BATCH // world
    micro = cfg.get("micro", 1)
    collectives: List[int] = []
    calls = [0]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        for step in range(STEPS):
            calls[0] = 0
            conflicts += _train_step(net, opt, cfg, rank, step, per_rank, micro, skipped_steps)
            collectives.append(calls[0])
    finally:
        dist.all_reduce = real_all_reduce
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "multitask": opt.state_dict()["multitask"],
        "skipped": opt.skipped,
        "conflicts": conflicts,
        "skipped_steps": skipped_steps,
        "collectives": collectives,
    }


def _train_step(
    net: nn.Module,
    opt: MultiTaskOptimizer,
    cfg: Dict[str, Any],
    rank: int,
    step: int,
    per_rank: int,
    micro: int,
    skipped_steps: List[int],
) -> int:
    """One optimizer step on this rank's rows; returns the step's conflict count."""
    x, targets = full_batch(step, cfg["k"])
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    x, targets = x[rows], [t[rows] for t in targets]
    opt.zero_grad()
    for idx in torch.arange(per_rank).chunk(micro):
        # DDP: no_sync() keeps DDP's reducer out; the optimizer does the all_reduce.
        sync = net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) else nullcontext()
        with sync:
            outputs, z = forward(net, x[idx], cfg)
        losses = [F.mse_loss(y, t[idx]) for y, t in zip(outputs, targets)]
        counts = [labelled(cfg, step, i, rank) for i in range(cfg["k"])]
        if "absent" in cfg:
            losses = [
                None if m == 0 else F.mse_loss(y[:m], t[idx][:m]) for m, y, t in zip(counts, outputs, targets)
            ]
        if cfg.get("nan_step") == step and rank == 1:
            losses[0] = losses[0] * float("nan")
        if micro > 1:
            opt.accumulate([loss / micro for loss in losses])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warning of the NaN configuration
        if micro > 1:
            opt.step()
        else:
            opt.step(losses, samples=counts if cfg.get("absent") == "samples" else None, representation=z)
    if opt.last_stats.get("skipped_step"):
        skipped_steps.append(step)
    return int(opt.last_stats.get("conflicts", 0))


def _worker(rank: int, world: int, root: str) -> None:
    global DEVICE
    torch.set_num_threads(1)
    DEVICE = rank_device(rank, world)
    dist.init_process_group(
        backend(world), init_method=f"file://{root}/rendezvous", rank=rank, world_size=world
    )
    try:
        results = {name: run_config(cfg, rank, world) for name, cfg in CONFIGS.items()}
        dist.barrier()
        torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_spawned(root: Path, world: int, timeout: float) -> None:
    """Spawn ``world`` ranks, wait at most ``timeout`` seconds, always reap them."""
    context = mp.start_processes(
        _worker, args=(world, str(root)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def reference(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One process, the whole batch, no process group (a NaN step is simply not taken)."""
    assert not (dist.is_available() and dist.is_initialized())
    k = cfg["k"]
    model = build_model(k)
    opt = make_optimizer(model, cfg)
    for step in range(STEPS):
        if cfg.get("nan_step") == step:
            continue
        x, targets = full_batch(step, k)
        opt.zero_grad()
        per_rank = BATCH // WORLD
        losses: List[Optional[Tensor]] = []
        outputs, z = forward(model, x, cfg)
        for i, (y, t) in enumerate(zip(outputs, targets)):  # the union of the rows the ranks labelled
            rows = [r * per_rank + n for r in range(WORLD) for n in range(labelled(cfg, step, i, r))]
            losses.append(F.mse_loss(y[rows], t[rows]) if rows else None)
        opt.step(losses, representation=z)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "multitask": opt.state_dict()["multitask"],
        "skipped": opt.skipped,
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> List[Dict[str, Any]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    root = tmp_path_factory.mktemp("ddp")
    run_spawned(root, WORLD, TIMEOUT_S)
    return [torch.load(root / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(WORLD)]


def _tensors(obj: Any, prefix: str = "") -> Dict[str, Tensor]:
    """Every tensor in a nested dict/list, keyed by its path."""
    out: Dict[str, Tensor] = {}
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_tensors(value, f"{prefix}/{key}"))
    elif isinstance(obj, (list, tuple)):
        for n, value in enumerate(obj):
            out.update(_tensors(value, f"{prefix}/{n}"))
    return out


def _assert_close_relative(got: Sequence[Tensor], want: Sequence[Tensor], rtol: float, what: str) -> None:
    for n, (a, b) in enumerate(zip(got, want)):
        scale = float(b.abs().max())
        err = float((a - b).abs().max())
        assert err <= rtol * max(scale, 1e-12), (
            f"{what}: parameter #{n}: max |diff| {err:.3e} vs scale {scale:.3e}"
        )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one_process_on_the_whole_batch(ranks, name: str) -> None:
    cfg = CONFIGS[name]
    want = reference(cfg)
    for rank, result in enumerate(ranks):
        got = result[name]
        _assert_close_relative(got["params"], want["params"], 1e-5, f"{name}, rank {rank}")
        # GradVac targets, preconditioning accumulators, weighting state: the same as well
        theirs, ours = _tensors(got["multitask"]), _tensors(want["multitask"])
        assert theirs.keys() == ours.keys()
        for key in ours:
            if key == "/generator":
                assert torch.equal(theirs[key], ours[key]), f"{name}: generator state differs"
            else:
                torch.testing.assert_close(theirs[key].double(), ours[key].double(), rtol=1e-4, atol=1e-6)
    # the surgery really acted: some pairs conflicted during the run
    assert ranks[0][name]["conflicts"] > 0
    # the run moved the parameters
    fresh = build_model(cfg["k"])
    assert any(not torch.allclose(p, q) for p, q in zip(want["params"], fresh.parameters()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_stay_bitwise_identical(ranks, name: str) -> None:
    first, second = ranks[0][name], ranks[1][name]
    for n, (a, b) in enumerate(zip(first["params"], second["params"])):
        assert torch.equal(a, b), f"{name}: parameter #{n} differs between the ranks"
    ta, tb = _tensors(first["multitask"]), _tensors(second["multitask"])
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{name}: optimizer state {key} differs between the ranks"
    assert first["multitask"]["steps"] == second["multitask"]["steps"]
    assert first["skipped_steps"] == second["skipped_steps"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_collective_per_step(ranks, name: str) -> None:
    """Per-task gradients and loss values travel in one bucketed all_reduce per step
    (one dtype and device here), also with accumulation and for a skipped step."""
    for result in ranks:
        assert result[name]["collectives"] == expected_collectives(CONFIGS[name])


def test_nan_on_one_rank_skips_the_step_on_every_rank(ranks) -> None:
    cfg = CONFIGS["plain-pcgrad-k2-nan-on-rank1"]
    for result in ranks:
        got = result["plain-pcgrad-k2-nan-on-rank1"]
        assert got["skipped_steps"] == [cfg["nan_step"]]
        assert got["skipped"] == 1
        assert got["multitask"]["steps"] == STEPS - 1


def test_absent_configurations_really_lack_tasks() -> None:
    """The absent-task configurations have steps where a task is on one rank only."""
    for name, cfg in CONFIGS.items():
        if "absent" in cfg:
            assert tasks_on_one_rank(cfg, labelled, STEPS, WORLD), name


def test_world_size_is_one_without_a_process_group() -> None:
    from multitask_optim._distributed import all_average, world_size

    assert world_size() == 1
    t = [torch.ones(3)]
    assert all_average(t)[0] is t[0]
