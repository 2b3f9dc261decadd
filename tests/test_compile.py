"""torch.compile: compiled models train through ``step(losses)`` on CPU.

A compiled region is one opaque autograd node (AOTAutograd's ``CompiledFunctionBackward``).
The gradient engine differentiates through it like any other node, with the batched
(vmap) paths where the compiled backward supports them and K plain backward passes
where it does not; the path used is recorded in ``opt.engine.mode`` and
``last_stats["gradient_mode"]``. The ``aot_eager`` backend is used: it runs the whole
dynamo + AOTAutograd pipeline (graph capture, functionalisation, the compiled
autograd.Function) without inductor's C++ code generation, whose first compile of even
a tiny model takes about 50 s on this 2-core machine (about 15 s with a warm cache) --
too slow for the suite. With inductor the engine falls back to ``looped`` (measured).

Every comparison is against an uncompiled twin with the same weights and data.
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from models import MultiHead
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles afresh: a compiled backward first run without retain_graph (the
    plain path) donates its buffers, and a cached copy then refuses the per-task paths."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


BATCH = 16
IN_DIM = 5
HIDDEN = 16
BACKEND = "aot_eager"


def build(k: int = 2) -> MultiHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2024)
        return MultiHead(k, IN_DIM, HIDDEN)


def batch(step: int, k: int = 2) -> Tuple[Tensor, List[Tensor]]:
    g = torch.Generator().manual_seed(13 * step + 1)
    x = torch.randn(BATCH, IN_DIM, generator=g)
    base = torch.randn(BATCH, 2, generator=g) + 1.0
    return x, [(-1.0) ** i * base + 0.3 * torch.randn(BATCH, 2, generator=g) for i in range(k)]


def train(forward, opt: MultiTaskOptimizer, steps: int, k: int = 2) -> List[int]:
    conflicts = []
    for step in range(steps):
        x, targets = batch(step, k)
        losses = [F.mse_loss(y, t) for y, t in zip(forward(x), targets)]
        opt.zero_grad()
        opt.step(losses)
        conflicts.append(opt.last_stats.get("conflicts", 0))  # the plain path has no per-task stats
    return conflicts


def assert_relative(a: nn.Module, b: nn.Module, rtol: float = 1e-5) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        err = float((p - q).detach().abs().max())
        scale = float(q.detach().abs().max())
        assert err <= rtol * scale, f"{name}: max |diff| {err:.3e}, scale {scale:.3e}"


def make_opt(model: MultiHead, **kw) -> MultiTaskOptimizer:
    kw.setdefault("surgery", "pcgrad")
    return MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), seed=3, **kw)


def compiled_trunk_forward(model: MultiHead):
    trunk = torch.compile(model.trunk, backend=BACKEND)

    def forward(x: Tensor) -> List[Tensor]:
        h = trunk(x)
        return [head(h) for head in model.heads]

    return forward


@pytest.mark.parametrize(
    "surgery,precondition,mode",
    [
        ("pcgrad", None, "auto"),
        ("gradvac", "adam", "auto"),
        ("pcgrad", None, "batched"),
        ("pcgrad", None, "looped"),
    ],
)
def test_compiled_trunk_matches_the_uncompiled_twin(surgery, precondition, mode) -> None:
    """The usual pattern: compile the trunk (the expensive part); the partition is
    discovered from the graph as without compilation."""
    model = build()
    eager = copy.deepcopy(model)
    opt = make_opt(model, surgery=surgery, precondition=precondition, gradient_mode=mode)
    eager_opt = make_opt(eager, surgery=surgery, precondition=precondition, gradient_mode=mode)
    # the partition cannot see inside a compiled region, so it warns (here needlessly: the
    # region is the trunk, which is shared anyway)
    with pytest.warns(UserWarning, match="pass through a torch.compile region"):
        conflicts = train(compiled_trunk_forward(model), opt, 5)
    train(eager, eager_opt, 5)
    assert_relative(model, eager)
    assert sum(conflicts) > 0, "the surgery must have acted"
    # the path the engine settled on is recorded (batched paths run through the compiled backward here)
    assert opt.engine.mode in ("frontier", "batched", "looped")
    assert opt.last_stats["gradient_mode"] == opt.engine.mode
    if mode != "auto":
        assert opt.engine.mode == mode
    assert [len(t) for t in opt.partition.tasks] == [len(t) for t in eager_opt.partition.tasks] == [2, 2]
    assert len(opt.partition.shared) == 4


def test_compiled_whole_model_trains_plain_sum() -> None:
    """The whole model compiled (one opaque node): with the plain sum the result is the
    inner optimizer's on sum(losses), compiled or not."""
    model = build()
    eager = copy.deepcopy(model)
    opt = make_opt(model, surgery=None)
    eager_opt = make_opt(eager, surgery=None)
    compiled = torch.compile(model, backend=BACKEND)
    train(compiled, opt, 5)
    train(eager, eager_opt, 5)
    assert_relative(model, eager)
    assert opt.last_stats["gradient_mode"] == "plain"  # one backward of the sum, as the inner optimizer


@pytest.mark.parametrize("surgery", ["pcgrad", "gradvac"])
def test_compiled_whole_model_with_explicit_partition_matches_the_uncompiled_twin(surgery) -> None:
    """The whole model compiled, partition given explicitly (the graph cannot show that
    head 0's parameters are not reached by loss 1 through the compiled node: they are
    structurally, not numerically). Gradient surgery must act on the trunk only, as
    for the uncompiled twin."""
    model = build()
    eager = copy.deepcopy(model)

    def opt_for(m: MultiHead) -> MultiTaskOptimizer:
        return make_opt(
            m, surgery=surgery, shared=m.trunk.parameters(), tasks=[h.parameters() for h in m.heads]
        )

    opt, eager_opt = opt_for(model), opt_for(eager)
    compiled = torch.compile(model, backend=BACKEND)
    conflicts = train(compiled, opt, 5)
    train(eager, eager_opt, 5)
    assert sum(conflicts) > 0
    assert_relative(model, eager)
