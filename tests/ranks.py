"""Helpers shared by the multi-process tests (DDP, FSDP2, Accelerate, fresh interpreters)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Labelled = Callable[[Dict[str, Any], int, int, int], int]

#: How long the worker processes of a multi-process test may run before the test calls
#: them hung: a guard against a deadlock, never a speed check, so generous enough for a
#: 2-core machine busy with other jobs (the workers take seconds alone; 120 s was
#: exceeded beside two CPU-bound processes and a second test run).
HANG_TIMEOUT_S = 900.0


def on_gpus(world: int) -> bool:
    """Whether the ranks run on GPUs: one CUDA device per rank and NCCL available."""
    return torch.cuda.is_available() and torch.cuda.device_count() >= world and dist.is_nccl_available()


def backend(world: int) -> str:
    """The process group's backend: gloo, plus NCCL for CUDA tensors where :func:`on_gpus`.

    Gloo stays for the CPU tensors that some checks use on a GPU machine too.
    """
    return "cpu:gloo,cuda:nccl" if on_gpus(world) else "gloo"


def rank_device(rank: int, world: int) -> torch.device:
    """The device rank ``rank`` trains on: its own GPU where :func:`on_gpus`, else the CPU."""
    if on_gpus(world):
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def start_method(world: int) -> str:
    """``fork`` where available (about 2 s instead of about 15 s to start: no re-import of
    torch), ``spawn`` where the ranks use CUDA (a forked process cannot)."""
    return "fork" if "fork" in mp.get_all_start_methods() and not on_gpus(world) else "spawn"


def tasks_on_one_rank(
    cfg: Dict[str, Any], labelled: Labelled, steps: int, world: int
) -> List[Tuple[int, int]]:
    """``(step, task)`` pairs where exactly one rank has rows of the task."""
    return [
        (step, i)
        for step in range(steps)
        for i in range(cfg["k"])
        if sum(labelled(cfg, step, i, r) > 0 for r in range(world)) == 1
    ]
