"""Accelerate: the loop of examples/accelerate_multitask.py on two CPU processes equals one.

Two processes are spawned (``torch.multiprocessing``, start method ``spawn``) with the
environment Accelerate reads to run on several CPU processes (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); the gloo process group is initialised through a
file in ``tmp_path`` (no network port), which ``Accelerator(cpu=True)`` then uses. Each
process runs the example's ``train`` -- ``accelerator.prepare`` on the model (DDP), the
data (each process gets half of every global batch) and the ``MultiTaskOptimizer`` --
once with the full step ``mt.step(losses)`` and once in weights-only mode
(``accelerator.backward(mt.weighted_loss(losses))``). Both must equal one process, with
no Accelerate at all, stepping on the global batches in the same mode (an inner SGD: a
mis-scaled average shows).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import HANG_TIMEOUT_S

pytest.importorskip("accelerate")

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3
PER_PROCESS = 8
TIMEOUT_S = HANG_TIMEOUT_S
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "accelerate_multitask.py"


def _example():
    spec = importlib.util.spec_from_file_location("accelerate_multitask_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _worker(rank: int, world: int, root: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}
    )
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        assert accelerator.num_processes == world and accelerator.process_index == rank
        example = _example()
        results = {}
        for mode in ("step", "weights_only"):
            model = example.train(accelerator, mode, STEPS, PER_PROCESS)
            results[mode] = [p.detach().clone() for p in model.parameters()]
        dist.barrier()
        torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> List[Dict[str, Any]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    root = tmp_path_factory.mktemp("accelerate")
    context = mp.start_processes(
        _worker, args=(WORLD, str(root)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"accelerate workers did not finish within {TIMEOUT_S:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def reference(mode: str) -> List[torch.Tensor]:
    """One process, no Accelerate, the same mode, on each global batch (both processes'
    halves). (Weights-only mode gives the heads ``c_i w_i grad L_i``: not the full step.)"""
    example = _example()
    model, mt = example.build()
    loader = torch.utils.data.DataLoader(example.data(), batch_size=WORLD * PER_PROCESS, shuffle=False)
    for step, (x, depth, label) in enumerate(loader):
        if step == STEPS:
            break
        mt.zero_grad()
        if mode == "step":
            mt.step(model(x, depth, label))
        else:
            mt.weighted_loss(model(x, depth, label)).backward()
            mt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["step", "weights_only"])
def test_two_processes_equal_one(ranks: List[Dict[str, Any]], mode: str) -> None:
    want = reference(mode)
    start = [p.detach() for p in _example().build()[0].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(want, start)), "the run moved the parameters"
    for rank in ranks:
        for n, (got, ref) in enumerate(zip(rank[mode], want)):
            torch.testing.assert_close(
                got, ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"parameter #{n}: {m}"
            )
    for a, b in zip(ranks[0][mode], ranks[1][mode]):
        assert torch.equal(a, b)  # the processes stay identical
