"""FSDP2 (``fully_shard``): two gloo ranks on half a batch each equal one process on the whole batch.

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

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 6
BATCH = 16
IN_DIM = 6
HIDDEN = 11
TIMEOUT_S = 180.0

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
        return MultiHead(k)


def shard(model: MultiHead, policy: str = "") -> MultiHead:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: Dict[str, Any] = {}
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


def full_batch(step: int, k: int) -> Tuple[Tensor, List[Tensor]]:
    g = torch.Generator().manual_seed(97 * step + 5)
    x = torch.randn(BATCH, IN_DIM, generator=g)
    base = torch.randn(BATCH, 1, generator=g) + 1.0
    targets = [(-1.0) ** i * base * (1.0 + i) + 0.3 * torch.randn(BATCH, 1, generator=g) for i in range(k)]
    return x, targets


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
        **extra,
    )


def train(
    model: nn.Module, opt: MultiTaskOptimizer, cfg: Dict[str, Any], steps: range, rank: int, world: int
) -> Dict[str, Any]:
    """Steps on this rank's contiguous share of each batch (the whole batch when world == 1)."""
    per_rank = BATCH // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    skipped, coefs, sent, modes = [], [], [], []
    for step in steps:
        x, targets = full_batch(step, cfg["k"])
        x, targets = x[rows], [t[rows] for t in targets]
        opt.zero_grad()
        micro = cfg.get("micro", 1)
        for idx in torch.arange(per_rank).chunk(micro):
            outputs = model(x[idx])
            losses = [F.mse_loss(y, t[idx]) / micro for y, t in zip(outputs, targets)]
            if cfg.get("nan_step") == step and rank == 1:
                losses[0] = losses[0] * float("nan")
            if micro > 1:
                opt.accumulate(losses)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(losses if micro == 1 else None)
        if opt.last_stats.get("skipped_step"):
            skipped.append(step)
        else:
            coefs.append(torch.tensor(opt.last_stats["block_coefficients"], dtype=torch.float64))
            sent.append(opt.last_stats.get("sent_bytes", 0))
            modes.append(opt.last_stats["gradient_mode"])
    return {"skipped": skipped, "coefs": coefs, "sent": sent, "modes": modes}


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
    """What a sharded model refuses, with which message (each before any state changes)."""
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
    return out


def _worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        results: Dict[str, Any] = {}
        for name, cfg in CONFIGS.items():
            start = time.perf_counter()
            results[name] = run_config(cfg, rank, world)
            results[name]["seconds"] = time.perf_counter() - start
        results["checkpoint"] = run_checkpoint(rank, world, root)
        results["refusals"] = refusals(rank, world)
        dist.barrier()
        torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(root: Path, world: int, timeout: float) -> None:
    """Start ``world`` ranks, wait at most ``timeout`` seconds, always reap them."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
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
        return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
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
    if tol <= 1e-6:
        for a, b in zip(got["coefs"], want["coefs"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the same exact gradient path as without FSDP (auto: looped on a step this small)
    assert set(got["modes"]) == {cfg.get("mode", "looped")}
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
    one, two = first["multitask"], second["multitask"]
    assert torch.equal(one["generator"], two["generator"])
    assert one["steps"] == two["steps"]
    for key in ("surgery", "weighting"):
        for name_, value in one["states"][key].items():
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


def test_communication_per_step(ranks) -> None:
    """One reduce-scatter of K x P (+ loss values and flag) and one K x K Gram all-reduce:
    what rank r sends, as counted by the optimizer, matches the layout."""
    cfg = CONFIGS["pcgrad-k3"]
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
    scatter = 4 * (k * padded + padded_own + WORLD * (k + 1)) // WORLD
    gram = 2 * 8 * (k * k + 1) // WORLD
    assert padded >= params and padded_own >= own
    for result in ranks:
        assert result["pcgrad-k3"]["sent"] == [scatter + gram] * STEPS


def test_refusals_name_the_argument(ranks) -> None:
    got = ranks[0]["refusals"]
    assert "gradient_mode='lean'" in got["lean"]
    assert "test_row_sum" in got["rows"] and "Gram-based" in got["rows"]
    assert "not sharded" in got["mixed"] and "fully_shard" in got["mixed"]
    assert "representation=" in got["representation"]
    assert got["unchanged"] == "True"


def test_refusals_without_a_process_group() -> None:
    from multitask_optim.fsdp import is_sharded

    assert not is_sharded(torch.zeros(2))
