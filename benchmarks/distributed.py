"""Two ranks on the speed benchmark's MLP: DDP and FSDP2, ours vs the plain step on ``sum(losses)``.

    python -m benchmarks.speed --distributed            # K = 4, 10 timed rounds
    python -m benchmarks.speed --distributed --k 8 --reps 5 --width 512
    python -m benchmarks.speed --distributed --device cuda   # NCCL, one GPU per rank (needs 2)

On the CPU the ranks talk over gloo; with ``--device cuda`` rank ``r`` runs on
``cuda:r`` over NCCL, and every timed step is bracketed by ``torch.cuda.synchronize``.

Four implementations, each on its own copy of the model (same init), each rank on half
of every batch, one thread per rank:

- ``ddp-floor``: ``DistributedDataParallel`` + ``sum(losses).backward()`` + Adam.
- ``ddp-ours``: the replicated model (forward under ``no_sync``) + ``MultiTaskOptimizer``
  (PCGrad), which all-reduces the K per-task gradients.
- ``fsdp-floor``: ``fully_shard`` (every trunk layer and the root) + ``sum(losses).backward()``.
- ``fsdp-ours``: ``fully_shard`` + ``MultiTaskOptimizer`` (PCGrad): one reduce-scatter of
  the K per-task gradients, one K x K all-reduce.

Timing is interleaved (every round runs one step of each, in an order shuffled per
round by a seeded RNG shared by the ranks, after a barrier); we report rank 0's median
ms/step and its ratio to the floor of the same parallelism. Bytes are what one rank
sends per step in every collective, counted at the Python entry points
(``torch.distributed.all_reduce`` / ``reduce_scatter_*`` / ``all_gather_*``, and a
DDP comm hook for DDP's buckets), with the ring-algorithm volumes: an all-reduce of ``n``
bytes sends ``2 (W-1)/W n``, a reduce-scatter or all-gather of ``n`` bytes in total
sends ``(W-1)/W n``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .common import git_info, machine_info
from .speed_timing import step_timer
from .workloads import WorkloadConfig, build_model, make_data

WORLD = 2
IMPLS = ("ddp-floor", "ddp-ours", "fsdp-floor", "fsdp-ours")


class Counter:
    """Bytes this rank sends in collectives (ring volumes), by collective kind."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.sent: Dict[str, int] = {}

    def add(self, kind: str, nbytes: int) -> None:
        share = (self.world - 1) / self.world
        volume = 2 * share * nbytes if kind == "all_reduce" else share * nbytes
        self.sent[kind] = self.sent.get(kind, 0) + int(volume)

    def install(self) -> None:
        def wrap(name: str, kind: str, which: int, keyword: str) -> None:
            real = getattr(dist, name, None)
            if real is None:
                return

            def counted(*args: Any, **kwargs: Any) -> Any:
                t = args[which] if len(args) > which else kwargs.get(keyword)
                if isinstance(t, torch.Tensor):
                    self.add(kind, t.numel() * t.element_size())
                return real(*args, **kwargs)

            setattr(dist, name, counted)

        wrap("all_reduce", "all_reduce", 0, "tensor")
        wrap("reduce_scatter_single", "reduce_scatter", 1, "input")  # the input holds every rank's chunk
        wrap("reduce_scatter_tensor", "reduce_scatter", 1, "input")
        wrap("all_gather_single", "all_gather", 0, "output")  # the output holds every rank's chunk
        wrap("all_gather_into_tensor", "all_gather", 0, "output_tensor")

    def ddp_hook(self) -> Callable[..., Any]:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            buffer = bucket.buffer()
            self.add("all_reduce", buffer.numel() * buffer.element_size())
            return allreduce_hook(state, bucket)

        # DDP checks the annotations as objects (not the strings of postponed evaluation)
        hook.__annotations__ = {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
        return hook


class _Losses(nn.Module):
    """``forward(batch) -> losses``, for DDP."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> List[torch.Tensor]:
        return self.model.losses(batch)


def _shard(model: nn.Module) -> nn.Module:
    """Every trunk Linear its own FSDP unit; the root (``forward`` = the losses) holds the heads."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.trunk:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    net = _Losses(model)
    fully_shard(net)
    return net


def _setup(name: str, cfg: WorkloadConfig, k: int, counter: Counter) -> Callable[[Any], None]:
    from multitask_optim import MultiTaskOptimizer

    model = build_model(cfg, k)
    net = _shard(model) if name.startswith("fsdp") else _Losses(model)
    inner = torch.optim.Adam(net.parameters(), lr=1e-4)
    if name == "ddp-floor":
        ddp = nn.parallel.DistributedDataParallel(net)
        ddp.register_comm_hook(None, counter.ddp_hook())

        def step(batch: Any) -> None:
            inner.zero_grad()
            sum(ddp(batch)).backward()
            inner.step()

        return step
    if name == "fsdp-floor":

        def step(batch: Any) -> None:
            inner.zero_grad()
            sum(net(batch)).backward()
            inner.step()

        return step
    opt = MultiTaskOptimizer(inner, surgery="pcgrad", seed=0)

    def step(batch: Any) -> None:
        opt.zero_grad()
        opt.step(net(batch))

    return step


def _rank_config(cfg: WorkloadConfig, rank: int) -> WorkloadConfig:
    """The rank's workload: on ``cuda:rank`` when the benchmark runs on CUDA."""
    if torch.device(cfg.device).type == "cuda":
        return replace(cfg, device=f"cuda:{rank}")
    return cfg


def _worker(rank: int, world: int, root: str, args: Dict[str, Any]) -> None:
    torch.set_num_threads(1)
    cfg = _rank_config(WorkloadConfig.from_dict(args["cfg"]), rank)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        timed = step_timer(device)
        k = args["k"]
        data = make_data(cfg, k)
        per = cfg.batch // world
        local = [(x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]) for x, y in data]
        counter = Counter(world)
        counter.install()
        steps = {name: _setup(name, cfg, k, counter) for name in IMPLS}
        times: Dict[str, List[float]] = {name: [] for name in IMPLS}
        sent: Dict[str, Dict[str, int]] = {}
        order = list(IMPLS)
        rng = random.Random(args["seed"])
        for rnd in range(args["warmup"] + args["reps"]):
            rng.shuffle(order)
            for name in order:
                dist.barrier()
                counter.sent = {}
                batch = local[rnd % len(local)]
                elapsed = timed(lambda: steps[name](batch)) / 1e3  # noqa: B023 (called at once)
                if rnd >= args["warmup"]:
                    times[name].append(elapsed)
                    sent[name] = dict(counter.sent)
        dist.barrier()
        if rank == 0:
            with open(os.path.join(root, "result.json"), "w") as f:
                json.dump({"times": times, "sent": sent}, f)
    finally:
        dist.destroy_process_group()


def run(cfg: WorkloadConfig, k: int, reps: int, warmup: int, seed: int, out: Path) -> Dict[str, Any]:
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda and torch.cuda.device_count() < WORLD:
        raise SystemExit(
            f"--distributed --device cuda needs {WORLD} GPUs, this machine has {torch.cuda.device_count()}"
        )
    with tempfile.TemporaryDirectory() as root:
        args = {"cfg": cfg.to_dict(), "k": k, "reps": reps, "warmup": warmup, "seed": seed}
        # CUDA cannot be used again in a forked child: spawn the ranks there
        method = "fork" if "fork" in mp.get_all_start_methods() and not cuda else "spawn"
        mp.start_processes(_worker, args=(WORLD, root, args), nprocs=WORLD, join=True, start_method=method)
        with open(os.path.join(root, "result.json")) as f:
            raw = json.load(f)
    model = build_model(cfg, k)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    rows = []
    for name in IMPLS:
        median = statistics.median(raw["times"][name]) * 1e3
        floor = statistics.median(raw["times"][name.split("-")[0] + "-floor"]) * 1e3
        rows.append(
            {
                "impl": name,
                "median_ms": round(median, 2),
                "ratio_to_floor": round(median / floor, 2),
                "sent_bytes": raw["sent"][name],
                "sent_total": sum(raw["sent"][name].values()),
            }
        )
    doc = {
        "world": WORLD,
        "k": k,
        "workload": cfg.to_dict(),
        "trunk_params": trunk,
        "reps": reps,
        "rows": rows,
        "backend": "nccl" if cuda else "gloo",
        "machine": machine_info(cfg.device),
        "git": git_info(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_distributed.json").write_text(json.dumps(doc, indent=2))
    print(
        f"{WORLD} {'nccl' if cuda else 'gloo'} ranks, K={k}, trunk P={trunk:,} params, batch {cfg.batch} ({cfg.batch // WORLD} per rank)"
    )
    print(f"{'impl':12s} {'ms/step':>9s} {'x floor':>8s} {'MB sent/step/rank':>18s}  by collective (MB)")
    for r in rows:
        parts = ", ".join(f"{kind} {v / 1e6:.2f}" for kind, v in sorted(r["sent_bytes"].items()))
        print(
            f"{r['impl']:12s} {r['median_ms']:9.1f} {r['ratio_to_floor']:8.2f} {r['sent_total'] / 1e6:18.2f}  {parts}"
        )
    return doc


def main(args: argparse.Namespace, cfg: WorkloadConfig) -> Dict[str, Any]:
    reps = args.reps or 10
    return run(cfg, args.k, reps, max(1, args.warmup), args.seed, args.out)
