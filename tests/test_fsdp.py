"""FSDP2 (``fully_shard``): two ranks on half a batch each equal one process on the whole batch
(gloo on the CPU; NCCL, one GPU per rank, where every rank has a GPU).

Two processes are started once for the module (``torch.multiprocessing``, start method
``fork`` where available -- about 2 s instead of about 15 s for ``spawn``, which
re-imports torch -- rendezvous through a file in ``tmp_path``). Each rank builds the
model, shards every trunk layer and the root with ``fully_shard`` and wraps
``torch.optim.Adam(model.parameters())`` after sharding, then runs every configuration
below on its half of a fixed batch; rank 0 saves the gathered parameters. The parent
process runs the same configurations unsharded on the whole batch and compares.

The hidden width (11) and the one-output heads make the shards uneven: rank 1 holds
an empty shard of every head weight. Configurations: PCGrad (K = 2, 3), GradVac, MGDA,
UPGrad, PCGrad with per-task Adam preconditioning, uncertainty weighting, an explicit
partition, a NaN loss on rank 1 only (every rank skips that step), and a checkpoint
saved with ``torch.distributed.checkpoint`` and loaded into a fresh model and optimizer
(continuing bitwise like an uninterrupted run).
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from ranks import HANG_TIMEOUT_S, backend, rank_device, start_method, tasks_on_one_rank
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 6
BATCH = 16
IN_DIM = 6
HIDDEN = 11
TIMEOUT_S = HANG_TIMEOUT_S
#: Where this process's models and batches live: a rank's own GPU where every rank has
#: one (NCCL), else the CPU (gloo); the one-process references stay on the CPU.
DEVICE = torch.device("cpu")

CONFIGS: Dict[str, Dict[str, Any]] = {
    "pcgrad-k2": {"surgery": "pcgrad", "k": 2},
    "pcgrad-k3": {"surgery": "pcgrad", "k": 3},
    "gradvac-k3": {"surgery": "gradvac", "k": 3},
    "mgda-k3": {"surgery": "mgda", "k": 3},
    "upgrad-k3": {"surgery": "upgrad", "k": 3},
    "pcgrad-k3-adam": {"surgery": "pcgrad", "k": 3, "precondition": "adam"},
    "pcgrad-k3-uncertainty": {"surgery": "pcgrad", "k": 3, "weighting": "uncertainty"},
    "pcgrad-k3-explicit": {"surgery": "pcgrad", "k": 3, "explicit": True},
    "gradvac-k2-tensor-looped": {"surgery": "gradvac", "k": 2, "granularity": "tensor", "mode": "looped"},
    "pcgrad-k3-accumulate": {"surgery": "pcgrad", "k": 3, "micro": 2},
    "mgda-k3-gradnorm": {"surgery": "mgda", "k": 3, "weighting": "gradnorm"},
    "pcgrad-k2-nan-on-rank1": {"surgery": "pcgrad", "k": 2, "nan_step": 2},
    # FSDP's policies: CPU offload is exact; bf16 compute is compared loosely (bf16 rounding)
    "pcgrad-k3-offload": {"surgery": "pcgrad", "k": 3, "policy": "offload"},
    "pcgrad-k3-unsharded-between": {"surgery": "pcgrad", "k": 3, "policy": "keep"},
    "pcgrad-k3-bf16": {"surgery": "pcgrad", "k": 3, "policy": "bf16", "tol": 5e-2},
}
# Row surgeries: each rank runs the method on its shards of the rows (sums over a row's
# elements added over the ranks, GradDrop's draws made for the whole block).
ROW_SURGERIES = ("graddrop", "trimmed_mean", "excess_mtl", "db_mtl", "moco")
for _surgery in ROW_SURGERIES:
    CONFIGS[f"{_surgery}-k3"] = {"surgery": _surgery, "k": 3}
CONFIGS["graddrop-k3-tensor"] = {"surgery": "graddrop", "k": 3, "granularity": "tensor"}
CONFIGS["moco-k3-tensor-adam"] = {"surgery": "moco", "k": 3, "granularity": "tensor", "precondition": "adam"}
# Steps lacking tasks. "whole": task 1 is absent on every rank at steps 2 and 4, and rank
# 1 has none of its rows at step 3; "samples": each rank labels 0, 3 or all of its rows
# of each task, so a task often has rows on one rank only. Every rank must pass the same
# tasks under FSDP2: a rank without rows of a task that another rank has gives a zero
# loss through the task's head and samples= 0 for it (a task no rank has is left out).
CONFIGS["pcgrad-k3-uncertainty-absent"] = {
    "surgery": "pcgrad",
    "k": 3,
    "weighting": "uncertainty",
    "absent": "whole",
}
CONFIGS["gradvac-k3-adam-absent-samples"] = {
    "surgery": "gradvac",
    "k": 3,
    "precondition": "adam",
    "absent": "samples",
}
CONFIGS["excess_mtl-k3-absent"] = {"surgery": "excess_mtl", "k": 3, "absent": "whole"}
# Surgery on a schedule: the other steps are one backward through FSDP's own hooks
CONFIGS["pcgrad-k3-every2-uncertainty"] = {
    "surgery": "pcgrad",
    "k": 3,
    "every": 2,
    "weighting": "uncertainty",
}
CONFIGS["gradvac-k3-every3-adam-absent"] = {
    "surgery": "gradvac",
    "k": 3,
    "every": 3,
    "precondition": "adam",
    "absent": "whole",
}
CHECKPOINT = {"surgery": "gradvac", "k": 3, "precondition": "adam", "weighting": "uncertainty"}
SAVE_AFTER = 3


class MultiHead(nn.Module):
    """Tanh trunk (two layers) and ``k`` one-output heads; conflicting targets."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in range(k))

    def forward(self, x: Tensor) -> List[Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def build_model(k: int, seed: int = 1234) -> MultiHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultiHead(k).to(DEVICE)


def mesh(device_type: str) -> Any:
    """The 1-D mesh over every rank on ``device_type`` (FSDP's default mesh would be CUDA
    wherever CUDA exists, also for the checks that stay on the CPU)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard(model: MultiHead, policy: str = "") -> MultiHead:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: Dict[str, Any] = {"mesh": mesh(DEVICE.type)}
    if policy == "offload":
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)  # pinning needs an accelerator
    elif policy == "keep":  # parameters stay unsharded from forward to backward
        kwargs["reshard_after_forward"] = False
    elif policy == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.trunk:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def labelled(cfg: Dict[str, Any], step: int, task: int, rank: int) -> int:
    """How many of its rows rank ``rank`` labels for ``task`` at ``step`` (the first step: every task)."""
    per_rank = BATCH // WORLD
    if "absent" not in cfg or step == 0:
        return per_rank
    if cfg["absent"] == "whole":
        gone = (step in (2, 4)) or (step == 3 and rank == 1)
        return 0 if task == 1 and gone else per_rank
    return [0, 3, per_rank][(step + task + 2 * rank) % 3]


def full_batch(step: int, k: int) -> Tuple[Tensor, List[Tensor]]:
    g = torch.Generator().manual_seed(97 * step + 5)
    x = torch.randn(BATCH, IN_DIM, generator=g)
    base = torch.randn(BATCH, 1, generator=g) + 1.0
    targets = [(-1.0) ** i * base * (1.0 + i) + 0.3 * torch.randn(BATCH, 1, generator=g) for i in range(k)]
    return x.to(DEVICE), [t.to(DEVICE) for t in targets]


def make_optimizer(model: MultiHead, cfg: Dict[str, Any]) -> MultiTaskOptimizer:
    extra: Dict[str, Any] = {}
    if cfg.get("explicit"):
        extra["shared"] = list(model.trunk.parameters())
        extra["tasks"] = [list(h.parameters()) for h in model.heads]
    else:
        extra["num_tasks"] = cfg["k"]
    if cfg.get("weighting") == "gradnorm":  # balances the last trunk layer's gradient norms
        extra["weighting_kwargs"] = {"layer": list(model.trunk[2].parameters())}
    return MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        surgery=cfg["surgery"],
        precondition=cfg.get("precondition"),
        weighting=cfg.get("weighting"),
        granularity=cfg.get("granularity", "global"),
        gradient_mode=cfg.get("mode", "auto"),
        seed=7,
        surgery_every=cfg.get("every", 1),
        **extra,
    )


def train(
    model: nn.Module, opt: MultiTaskOptimizer, cfg: Dict[str, Any], steps: range, rank: int, world: int
) -> Dict[str, Any]:
    """Steps on this rank's contiguous share of each batch (the whole batch when world == 1).

    A task's loss is over the rows the covered ranks label for it (:func:`labelled`; all
    of them unless the configuration has absent tasks), None when there are none.
    """
    per_rank = BATCH // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    covered = [rank] if world > 1 else list(range(WORLD))  # the ranks whose rows this process holds
    half = BATCH // WORLD
    skipped, coefs, sent, modes, tasks = [], [], [], [], []
    for step in steps:
        x, targets = full_batch(step, cfg["k"])
        x, targets = x[rows], [t[rows] for t in targets]
        opt.zero_grad()
        micro = cfg.get("micro", 1)
        for idx in torch.arange(per_rank).chunk(micro):
            outputs = model(x[idx])
            losses: List[Optional[Tensor]] = [F.mse_loss(y, t[idx]) / micro for y, t in zip(outputs, targets)]
            if cfg.get("nan_step") == step and rank == 1:
                losses[0] = losses[0] * float("nan")
            if micro > 1:
                opt.accumulate(losses)
        counts = None
        if "absent" in cfg:  # (no micro-batches here: idx is every row)
            picks = [
                [(r - covered[0]) * half + n for r in covered for n in range(labelled(cfg, step, i, r))]
                for i in range(cfg["k"])
            ]
            anyone = [any(labelled(cfg, step, i, r) for r in range(WORLD)) for i in range(cfg["k"])]
            losses = [
                F.mse_loss(y[p], t[p]) if p else (0.0 * y.sum() if some else None)
                for y, t, p, some in zip(outputs, targets, picks, anyone)
            ]
            if world > 1:
                counts = [len(p) for p in picks]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(losses if micro == 1 else None, samples=counts)
        if opt.last_stats.get("skipped_step"):
            skipped.append(step)
        else:
            found = opt.last_stats["block_coefficients"]  # None for a method that reports none
            coefs.append(torch.tensor([] if found is None else found, dtype=torch.float64))
            sent.append(opt.last_stats.get("sent_bytes", 0))
            modes.append(opt.last_stats["gradient_mode"])
            tasks.append(opt.last_stats["tasks"])
    return {"skipped": skipped, "coefs": coefs, "sent": sent, "modes": modes, "tasks": tasks}


def full_params(model: nn.Module) -> List[Tensor]:
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone())
    return out


def run_config(cfg: Dict[str, Any], rank: int, world: int) -> Dict[str, Any]:
    model = shard(build_model(cfg["k"]), cfg.get("policy", ""))
    opt = make_optimizer(model, cfg)
    log = train(model, opt, cfg, range(STEPS), rank, world)
    return {"params": full_params(model), "multitask": opt.state_dict()["multitask"], **log}


def run_checkpoint(rank: int, world: int, root: str) -> Dict[str, Any]:
    """Uninterrupted run vs save after SAVE_AFTER steps, load into fresh objects, continue."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from multitask_optim import fsdp

    cfg = CHECKPOINT
    model = shard(build_model(cfg["k"]))
    opt = make_optimizer(model, cfg)
    train(model, opt, cfg, range(STEPS), rank, world)
    want = full_params(model)

    model = shard(build_model(cfg["k"]))
    opt = make_optimizer(model, cfg)
    train(model, opt, cfg, range(SAVE_AFTER), rank, world)
    path = os.path.join(root, "dcp")
    state = {
        "model": get_model_state_dict(model),
        "optim": fsdp.get_optimizer_state_dict(model, opt),
        "multitask": fsdp.MultiTaskState(opt),
    }
    dcp.save(state, checkpoint_id=path)
    del model, opt, state

    fresh = shard(build_model(cfg["k"], seed=99))  # other initial values: all must come from the checkpoint
    opt2 = make_optimizer(fresh, cfg)
    state = {
        "model": get_model_state_dict(fresh),
        "optim": fsdp.get_optimizer_state_dict(fresh, opt2),
        "multitask": fsdp.MultiTaskState(opt2),
    }
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(fresh, state["model"])
    fsdp.set_optimizer_state_dict(fresh, opt2, state["optim"])
    train(fresh, opt2, cfg, range(SAVE_AFTER, STEPS), rank, world)
    return {"want": want, "got": full_params(fresh)}


def refusals(rank: int, world: int) -> Dict[str, str]:
    """What a sharded model refuses, with which message (each before any state changes).

    A user's own row surgery (:class:`RowAggregator`) used to be refused ("rows"); it is
    accepted now (it sees this rank's shards and ``ctx.shards``), so "rows" must be empty.
    """
    from multitask_optim.aggregators import RowAggregator

    class RowSum(RowAggregator):
        name = "test_row_sum"

        def aggregate_rows(self, rows, gram, state, ctx):  # type: ignore[no-untyped-def]
            return [r.sum(dim=0) for r in rows], None, state

    out: Dict[str, str] = {}
    model = shard(build_model(2))
    attempts = {
        "lean": lambda: MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradient_mode="lean"),
        "rows": lambda: MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery=RowSum()),
        "mixed": lambda: MultiTaskOptimizer(
            torch.optim.SGD([*model.parameters(), nn.Parameter(torch.zeros(2))], lr=0.1)
        ),
    }
    for key, attempt in attempts.items():
        try:
            attempt()
            out[key] = ""
        except ValueError as error:
            out[key] = str(error)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, targets = full_batch(0, 2)
    outputs = model(x)
    losses = [F.mse_loss(y, t) for y, t in zip(outputs, targets)]
    before = full_params(model)
    try:
        opt.step(losses, representation=outputs[0])
        out["representation"] = ""
    except ValueError as error:
        out["representation"] = str(error)
    out["unchanged"] = str(all(torch.equal(a, b) for a, b in zip(before, full_params(model))))

    # a task on one rank only: refused on every rank before any backward (FSDP's own
    # collectives would not match), nothing changed, and the next full step is taken
    opt.step(losses)  # every task: the partition is known
    split: List[Optional[Tensor]] = [F.mse_loss(y, t) for y, t in zip(model(x), targets)]
    if rank == 1:
        split[1] = None
    before, steps = full_params(model), opt.state_dict()["multitask"]["steps"]
    try:
        opt.step(split)
        out["split"] = ""
    except ValueError as error:
        out["split"] = str(error)
    same = all(torch.equal(a, b) for a, b in zip(before, full_params(model)))
    out["split_unchanged"] = str(same and opt.state_dict()["multitask"]["steps"] == steps)
    opt.zero_grad()
    opt.step([F.mse_loss(y, t) for y, t in zip(model(x), targets)])
    out["split_then"] = ",".join(opt.last_stats["tasks"])
    return out


def _worker(rank: int, world: int, root: str) -> None:
    global DEVICE
    torch.set_num_threads(1)
    DEVICE = rank_device(rank, world)
    dist.init_process_group(
        backend(world), init_method=f"file://{root}/rendezvous", rank=rank, world_size=world
    )
    try:
        results: Dict[str, Any] = {}
        for name, cfg in CONFIGS.items():
            start = time.perf_counter()
            results[name] = run_config(cfg, rank, world)
            results[name]["seconds"] = time.perf_counter() - start
        results["checkpoint"] = run_checkpoint(rank, world, root)
        results["refusals"] = refusals(rank, world)
        results["edges"] = edge_cases()
        dist.barrier()
        torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class TwoHeads(nn.Module):
    def __init__(self, width: int, head_in: int, bias: bool = True) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, width, bias=bias)
        self.h0 = nn.Linear(head_in, 1, bias=bias)
        self.h1 = nn.Linear(head_in, 1, bias=bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        z = self.trunk(x)
        return self.h0(z), self.h1(z)


def edge_cases() -> Dict[str, Any]:
    """Corner cases found by review, each a few steps on a tiny sharded model.

    - ``fp16_samples``: float16 parameters (FSDP's policy) and large ``samples=``: the
      sample weights must not overflow the half-precision rows on one rank only;
    - ``accumulated_plain``: accumulated micro-batches on steps ``surgery_every`` leaves
      out, with huge static weights: the ranks must skip (or not) together;
    - ``scaler``: a float16 model with a GradScaler on steps left out by the schedule:
      the backward runs at the scaler's scale (no overflow, no drop of the scale);
    - ``empty_shard``: a trunk ``Linear(4, 1)`` whose weight shard is empty on a rank.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    out: Dict[str, Any] = {}
    cpu = {"mesh": mesh("cpu")}  # these checks are of the CPU's float16 and GradScaler
    half = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32), **cpu}

    torch.manual_seed(0)
    model = TwoHeads(4, 4, bias=False)
    fully_shard(model.trunk, **half)
    fully_shard(model, **half)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), surgery="pcgrad")
    x = torch.tensor([[0.0, 0.0, 0.0, 200.0]]).half()
    for _ in range(2):
        o0, o1 = model(x)
        opt.step({"a": o0.sum().float(), "b": -0.5 * o1.sum().float()}, samples={"a": 1000, "b": 1000})
    out["fp16_samples"] = opt.skipped

    torch.manual_seed(0)
    model = TwoHeads(4, 4, bias=False)
    fully_shard(model.trunk, **cpu)
    fully_shard(model, **cpu)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        surgery="pcgrad",
        surgery_every=2,
        weighting="static",
        weighting_kwargs={"weights": [1e30, 1e30]},
    )
    x = torch.tensor([[0.0, 0.0, 0.0, 1e9]])
    skipped = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            o0, o1 = model(x)
            opt.accumulate({"a": o0.sum(), "b": -0.5 * o1.sum()})
            opt.step()
            skipped.append(opt.skipped)
    out["accumulated_plain"] = skipped

    torch.manual_seed(0)
    model = TwoHeads(4, 4)
    fully_shard(model.trunk, **half)
    fully_shard(model, **half)
    scaler = torch.amp.GradScaler("cpu", init_scale=80000.0, growth_interval=1000)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01),
        surgery="pcgrad",
        surgery_every=1000,
        surgery_start=1000,  # every step here is a plain one
        grad_scaler=scaler,
    )
    x = torch.randn(1, 4).half()
    for _ in range(3):
        o0, o1 = model(x)
        opt.step({"a": o0.sum().float(), "b": o1.sum().float()})
    out["scaler"] = (opt.skipped, scaler.get_scale(), opt.last_stats["path"])

    torch.manual_seed(0)
    model = TwoHeads(1, 1)
    fully_shard(model.trunk, **cpu)
    fully_shard(model, **cpu)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery="pcgrad")
    o0, o1 = model(torch.randn(4, 4))
    opt.step({"a": o0.pow(2).mean(), "b": o1.pow(2).mean()})
    out["empty_shard"] = (opt.skipped, opt.last_stats["path"])
    return out


def run_ranks(root: Path, world: int, timeout: float) -> None:
    """Start ``world`` ranks, wait at most ``timeout`` seconds, always reap them."""
    method = start_method(world)
    context = mp.start_processes(
        _worker, args=(world, str(root)), nprocs=world, join=False, start_method=method
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"FSDP workers did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> List[Dict[str, Any]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    pytest.importorskip("torch.distributed.fsdp")
    root = tmp_path_factory.mktemp("fsdp")
    try:
        run_ranks(root, WORLD, TIMEOUT_S)
        return [torch.load(root / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(WORLD)]
    finally:
        shutil.rmtree(root / "dcp", ignore_errors=True)


def reference(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One process, the whole batch, an unsharded model (a NaN step is simply not taken)."""
    assert not (dist.is_available() and dist.is_initialized())
    model = build_model(cfg["k"])
    opt = make_optimizer(model, cfg)
    steps = [s for s in range(STEPS) if s != cfg.get("nan_step")]
    log = train(model, opt, cfg, steps, 0, 1)  # type: ignore[arg-type]
    return {"params": full_params(model), "multitask": opt.state_dict()["multitask"], **log}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_sharded_ranks_equal_one_process_on_the_whole_batch(ranks, name: str) -> None:
    cfg = CONFIGS[name]
    want = reference(cfg)
    got = ranks[0][name]
    tol = cfg.get("tol", 1e-6)
    assert len(got["params"]) == len(want["params"])
    for n, (a, b) in enumerate(zip(got["params"], want["params"])):
        err = float((a - b).abs().max())
        assert err <= tol, f"{name}: parameter #{n} differs by {err:.2e}"
    assert len(got["coefs"]) == len(want["coefs"])
    assert got["tasks"] == want["tasks"]
    if tol <= 1e-6:
        for a, b in zip(got["coefs"], want["coefs"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the same exact gradient path as without FSDP (auto: looped on a step this small)
    plain = {"plain"} if cfg.get("every", 1) > 1 else set()  # the steps the schedule leaves out
    assert set(got["modes"]) == {cfg.get("mode", "looped")} | plain
    # the run moved the parameters
    fresh = build_model(cfg["k"])
    assert any(not torch.allclose(p, q) for p, q in zip(want["params"], fresh.parameters()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_agree_bitwise_on_coefficients_and_state(ranks, name: str) -> None:
    first, second = ranks[0][name], ranks[1][name]
    assert first["skipped"] == second["skipped"]
    for a, b in zip(first["coefs"], second["coefs"]):
        assert torch.equal(a, b), f"{name}: coefficients differ between the ranks"
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)
    assert first["tasks"] == second["tasks"]
    one, two = first["multitask"], second["multitask"]
    assert torch.equal(one["generator"], two["generator"])
    assert one["steps"] == two["steps"]
    for key in ("surgery", "weighting"):
        for name_, value in one["states"][key].items():
            if key == "surgery" and name_.startswith(SHARDED_STATE):
                continue  # per-element buffers of a row surgery: each rank holds its shard
            assert torch.equal(value, two["states"][key][name_]), f"{name}: {key} state {name_} differs"


def test_precondition_accumulators_stay_sharded(ranks) -> None:
    """Rank r keeps only its shard of each task's accumulator: the ranks' shards
    concatenate to the single-process accumulator (uneven shards, one empty)."""
    want = reference(CONFIGS["pcgrad-k3-adam"])["multitask"]["states"]["precondition"]
    parts = [r["pcgrad-k3-adam"]["multitask"]["states"]["precondition"] for r in ranks]
    assert parts[0].keys() == want.keys()
    for key, value in want.items():
        if key.endswith(".step"):
            assert all(torch.equal(p[key], value) for p in parts)
            continue
        joined = torch.cat([p[key] for p in parts], dim=1)
        assert joined.shape == value.shape
        torch.testing.assert_close(joined, value, rtol=1e-4, atol=1e-9)
        assert parts[0][key].shape[1] + parts[1][key].shape[1] == value.shape[1]


#: State keys of the row surgeries that hold one value per element of the rows (sharded).
SHARDED_STATE = ("root.", "ema.", "y.")


def whole_rows(parts: List[Tensor], shapes: List[Tuple[int, ...]]) -> Tensor:
    """The ``(K, P)`` block buffer from the ranks' ``(K, n_r)`` shards: each rank's buffer is
    its dim-0 chunk of every parameter of the block, flattened, in block order."""
    offsets = [0] * len(parts)
    pieces = []
    for shape in shapes:
        chunk, inner = -(-shape[0] // WORLD), math.prod(shape[1:])
        per_rank = []
        for r, part in enumerate(parts):
            n = max(0, min(chunk, shape[0] - r * chunk)) * inner
            per_rank.append(part[:, offsets[r] : offsets[r] + n])
            offsets[r] += n
        pieces.append(torch.cat(per_rank, dim=1))
    assert offsets == [p.shape[1] for p in parts]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("name", [n for n in CONFIGS if CONFIGS[n]["surgery"] in ROW_SURGERIES])
def test_row_surgery_buffers_stay_sharded(ranks, name: str) -> None:
    """Each rank keeps only its shard of a row surgery's per-element state (EMAs, tracked
    gradients, accumulated squares); the shards put back together are one process's."""
    cfg = CONFIGS[name]
    want = reference(cfg)["multitask"]["states"]["surgery"]
    parts = [r[name]["multitask"]["states"]["surgery"] for r in ranks]
    trunk = [tuple(p.shape) for p in build_model(cfg["k"]).trunk.parameters()]  # the shared parameters
    blocks = [[s] for s in trunk] if cfg.get("granularity") == "tensor" else [trunk]
    buffers = [key for key in want if key.startswith(SHARDED_STATE)]
    assert bool(buffers) == (cfg["surgery"] in ("excess_mtl", "db_mtl", "moco"))
    for key in buffers:
        block = blocks[int(key.split(".")[1])]
        local = [p[key] for p in parts]
        assert sum(t.shape[1] for t in local) == want[key].shape[1] and local[0].shape != local[1].shape
        torch.testing.assert_close(whole_rows(local, block), want[key], rtol=1e-4, atol=1e-6)


def test_absent_configurations_really_lack_tasks(ranks) -> None:
    """Every absent-task run has a task with rows on one rank only; the "whole" runs also
    have steps that lack a task on every rank (and report it in ``last_stats["tasks"]``)."""
    for name, cfg in CONFIGS.items():
        if "absent" not in cfg:
            continue
        assert tasks_on_one_rank(cfg, labelled, STEPS, WORLD), name
        lacking = [n for n, tasks in enumerate(ranks[0][name]["tasks"]) if len(tasks) < cfg["k"]]
        assert lacking == ([2, 4] if cfg["absent"] == "whole" else []), name


def test_nan_on_one_rank_skips_the_step_on_every_rank(ranks) -> None:
    cfg = CONFIGS["pcgrad-k2-nan-on-rank1"]
    for result in ranks:
        got = result["pcgrad-k2-nan-on-rank1"]
        assert got["skipped"] == [cfg["nan_step"]]
        assert got["multitask"]["steps"] == STEPS - 1


def test_checkpoint_resumes_bitwise(ranks) -> None:
    for rank, result in enumerate(ranks):
        got = result["checkpoint"]
        for n, (a, b) in enumerate(zip(got["got"], got["want"])):
            assert torch.equal(a, b), f"rank {rank}: parameter #{n} differs after the restored run"


#: What a row surgery sums over the ranks per step (float64 entries, B blocks, K tasks),
#: on top of the flag saying whether every rank's update shard is finite.
ROW_SUMS = {
    "graddrop": lambda b, k: 0,
    "trimmed_mean": lambda b, k: 0,
    "excess_mtl": lambda b, k: b * k,  # partial excess risks
    "db_mtl": lambda b, k: b * k,  # squared norms of the EMAs
    "moco": lambda b, k: b * k + b * k * k,  # squared norms of the rows, Grams of the tracked y
}


@pytest.mark.parametrize("name", ["pcgrad-k3", *(f"{s}-k3" for s in ROW_SURGERIES), "moco-k3-tensor-adam"])
def test_communication_per_step(ranks, name: str) -> None:
    """One all-reduce of K presence flags (before the backward), one reduce-scatter of
    K x P (+ a tail: loss values, sample weights, reach flags, skip flag, bound) and one
    B x K x K Gram all-reduce; a row surgery adds its sums and one flag, preconditioning
    one flag: what rank r sends, as counted by the optimizer, matches the layout."""
    cfg = CONFIGS[name]
    k = cfg["k"]
    model = build_model(k)
    params = sum(p.numel() for p in model.trunk.parameters())
    own = sum(p.numel() for p in model.heads.parameters())
    # padded to whole chunks: every weight/bias of the model has an odd or unit first dim
    padded = sum(
        -(-p.shape[0] // WORLD) * WORLD * (p.numel() // p.shape[0]) for p in model.trunk.parameters()
    )
    padded_own = sum(
        -(-p.shape[0] // WORLD) * WORLD * (p.numel() // p.shape[0]) for p in model.heads.parameters()
    )
    tensors = len(list(model.parameters()))
    tail = 2 * k + tensors + 2
    scatter = 4 * (k * padded + padded_own + WORLD * tail) // WORLD
    blocks = len(list(model.trunk.parameters())) if cfg.get("granularity") == "tensor" else 1
    gram = 2 * 8 * (blocks * k * k + 1) // WORLD
    presence = 2 * 8 * k // WORLD
    rows = 0
    if cfg["surgery"] in ROW_SUMS:
        rows = 2 * 8 * (ROW_SUMS[cfg["surgery"]](blocks, k) + 1) // WORLD
    vote = 2 * 8 // WORLD if cfg.get("precondition") else 0  # "would an accumulator overflow?"
    assert padded >= params and padded_own >= own
    for result in ranks:
        assert result[name]["sent"] == [presence + scatter + gram + rows + vote] * STEPS


def test_refusals_name_the_argument(ranks) -> None:
    got = ranks[0]["refusals"]
    assert "gradient_mode='lean'" in got["lean"]
    assert got["rows"] == ""  # row surgeries run on FSDP2 shards now (no longer refused)
    assert "['1']" in got["split"] and "absent on some ranks" in got["split"] and "samples=" in got["split"]
    assert got["split_unchanged"] == "True" and got["split_then"] == "0,1"
    assert "not sharded" in got["mixed"] and "fully_shard" in got["mixed"]
    assert "representation=" in got["representation"]
    assert got["unchanged"] == "True"


def test_refusals_without_a_process_group() -> None:
    from multitask_optim.fsdp import is_sharded

    assert not is_sharded(torch.zeros(2))


def test_edge_cases_found_by_review(ranks) -> None:
    """Each would have made one rank skip while the other stepped (then hung), skipped
    steps for nothing, or raised (see :func:`edge_cases`)."""
    edges = [result["edges"] for result in ranks]
    assert edges[0] == edges[1], "the ranks must agree"
    assert edges[0]["fp16_samples"] == 0
    assert edges[0]["accumulated_plain"] == [1, 2, 3]  # 1e30 x 1e9 overflows float32: every rank skips
    assert edges[0]["scaler"] == (0, 80000.0, "plain")
    assert edges[0]["empty_shard"] == (0, "full")
