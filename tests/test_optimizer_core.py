"""Core behaviour of MultiTaskOptimizer (the project design (DESIGN.md, shared with the
developers), sections 1-4).

Drop-in equivalence with the inner optimizer, PCGrad's K = 2 guarantee, agreement of
the gradient paths, bitwise resume, LR schedulers and param-group splitting, automatic
partition, the plain ``step()`` path, the ``torch.optim.Optimizer`` contract, and Gram
granularity. Every test is seeded and uses tiny models; it runs on every available device.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List

import pytest
import torch
from models import (
    ChainedLosses,
    Conflicting,
    DetachFeed,
    NonConflicting,
    PartitionModel,
    TiedHead,
    TrunkHeads,
    TwoDepthHeads,
    build,
    snapshot,
    twin,
)
from torch import nn

from multitask_optim import MultiTaskOptimizer
from multitask_optim import _engine as engine

#: Runs on every available device (the CPU always, CUDA when present).
pytestmark = pytest.mark.devices

INNER: Dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
}


def assert_params_close(a: nn.Module, b: nn.Module, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), f"{name} differs: max |diff| = {(p - q).abs().max().item():.3e}"


def reference_step(model: nn.Module, inner: torch.optim.Optimizer, step: int) -> None:
    inner.zero_grad()
    sum(model.losses(model.batch(step))).backward()
    inner.step()


def wrapped_step(model: nn.Module, opt: MultiTaskOptimizer, step: int) -> None:
    opt.zero_grad()
    opt.step(model.losses(model.batch(step)))


def position(params: List[torch.Tensor], param: torch.Tensor) -> int:
    return next(n for n, p in enumerate(params) if p is param)


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads]).double()


# ------------------------------------------------------------------ 1. drop-in equivalence
@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize(
    "case",
    ["sum-trunkheads", "pcgrad-nonconflicting"],
)
def test_drop_in_equivalence(inner: str, case: str) -> None:
    if case == "sum-trunkheads":
        factory, kw, surgery = TrunkHeads, {"out_dims": (2, 3, 1)}, None
    else:
        factory, kw, surgery = NonConflicting, {"num_tasks": 3}, "pcgrad"
    # float64: float32 summation-order noise (sum-backward vs per-task rows) is
    # amplified by 20 adaptive steps past 1e-6; in float64 any real difference shows.
    ref = build(factory, seed=3, dtype=torch.float64, **kw)
    mt = twin(ref)
    ref_opt = INNER[inner](ref.parameters())
    opt = MultiTaskOptimizer(INNER[inner](mt.parameters()), surgery=surgery, seed=0)
    for step in range(20):
        reference_step(ref, ref_opt, step)
        wrapped_step(mt, opt, step)
        if surgery == "pcgrad":
            assert opt.last_stats["conflicts"] == 0, f"step {step}: the construction must not conflict"
    assert_params_close(mt, ref)
    # the runs really moved the parameters
    fresh = build(factory, seed=3, dtype=torch.float64, **kw)
    assert any(not torch.allclose(p, q) for p, q in zip(mt.parameters(), fresh.parameters()))


# ------------------------------------------------------------------ 2. K = 2 conflict
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_two_tasks_conflict(seed: int) -> None:
    model = build(Conflicting, seed=seed)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), surgery="pcgrad", seed=seed)
    trunk = list(model.trunk.parameters())
    losses = model.losses(model.batch(0))
    g = [flat(torch.autograd.grad(loss, trunk, retain_graph=True)) for loss in losses]
    heads = [list(h.parameters()) for h in model.heads]
    own = [torch.autograd.grad(loss, hp, retain_graph=True) for loss, hp in zip(losses, heads)]
    assert float(g[0] @ g[1]) < 0, "the construction must conflict"

    opt.zero_grad()
    opt.step(losses)
    assert opt.last_stats["conflicts"] == 1
    d = flat([p.grad for p in trunk])
    scale = float(g[0].norm() * g[1].norm())
    for i in range(2):
        assert float(d @ g[i]) >= -1e-6 * scale, f"update conflicts with task {i}"
    # the K = 2 PCGrad update, written out
    g0p = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]
    g1p = g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0]
    torch.testing.assert_close(d, g0p + g1p, rtol=1e-5, atol=1e-7)
    # heads receive their own loss's gradient, untouched by surgery
    for params, grads in zip(heads, own):
        for p, expected in zip(params, grads):
            assert torch.equal(p.grad, expected)
    # SGD with lr=0 wrote no update
    fresh = build(Conflicting, seed=seed)
    assert_params_equal(model, fresh)


# ------------------------------------------------------------------ 3. gradient paths agree
PATH_MODELS = {
    "trunk_heads": (TrunkHeads, {"out_dims": (2, 3, 1)}),
    "two_depths": (TwoDepthHeads, {}),
    "tied_head": (TiedHead, {}),
    "chained_losses": (ChainedLosses, {}),
    "detach_feed": (DetachFeed, {}),
}


@pytest.mark.parametrize("name", sorted(PATH_MODELS))
@pytest.mark.parametrize("precondition", [None, "adam"])
def test_gradient_paths_agree(name: str, precondition) -> None:
    factory, kw = PATH_MODELS[name]
    base = build(factory, seed=5, **kw)
    results = {}
    for mode in ("frontier", "batched", "looped"):
        model = twin(base)
        opt = MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5),
            surgery="pcgrad",
            precondition=precondition,
            seed=11,
            gradient_mode=mode,
        )
        for step in range(4):
            wrapped_step(model, opt, step)
            assert opt.engine.mode == mode
            assert opt.last_stats["gradient_mode"] == mode
        results[mode] = model
    assert_params_close(results["batched"], results["frontier"])
    assert_params_close(results["looped"], results["frontier"])
    assert any(not torch.allclose(p, q) for p, q in zip(results["frontier"].parameters(), base.parameters()))


def test_gradient_paths_agree_on_jacobian_rows() -> None:
    """One step with lr=0: the .grad each path writes agrees (shared rows and task grads)."""
    base = build(ChainedLosses, seed=2)
    grads = {}
    for mode in ("frontier", "batched", "looped"):
        model = twin(base)
        opt = MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), surgery="gradvac", seed=4, gradient_mode=mode
        )
        opt.step(model.losses(model.batch(0)))
        grads[mode] = [p.grad.clone() for p in model.parameters()]
        # head_a is an intermediate of loss_b as well: shared, not task a's
        assert {id(p) for p in model.head_a.parameters()} <= {id(p) for p in opt.partition.shared}
    for mode in ("batched", "looped"):
        for a, b in zip(grads[mode], grads["frontier"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loop_below, expected", [(None, "looped"), (0, "frontier")])
def test_auto_mode_on_an_unmeasured_step(monkeypatch: pytest.MonkeyPatch, loop_below, expected: str) -> None:
    """Below MEASURE_ABOVE nothing is timed: the smallest steps loop, the others take the frontier."""
    if loop_below is not None:
        monkeypatch.setattr(engine, "LOOP_BELOW", loop_below)
    model = build(TrunkHeads, seed=0)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
    assert opt.engine.mode is None
    wrapped_step(model, opt, 0)
    assert opt.engine.mode == expected
    assert opt.last_stats["gradient_mode"] == expected
    assert "gradient_timings_ms" not in opt.last_stats
    wrapped_step(model, opt, 1)
    assert opt.engine.mode == expected


# ------------------------------------------------------------------ 4. resume bitwise
def _resume_roundtrip(
    tmp_path,
    make_model: Callable[[], nn.Module],
    make_opt: Callable[[nn.Module], MultiTaskOptimizer],
    first: int = 3,
    then: int = 4,
) -> None:
    straight = make_model()
    opt = make_opt(straight)
    for step in range(first + then):
        wrapped_step(straight, opt, step)

    model = make_model()
    opt = make_opt(model)
    for step in range(first):
        wrapped_step(model, opt, step)
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    del opt, model

    resumed = make_model()
    resumed.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    opt = make_opt(resumed)
    opt.load_state_dict(torch.load(tmp_path / "optim.pt", weights_only=True))
    for step in range(first, first + then):
        wrapped_step(resumed, opt, step)
    assert_params_equal(resumed, straight)


@pytest.mark.parametrize("surgery", [None, "pcgrad", "gradvac"])
@pytest.mark.parametrize("precondition", [None, "adagrad", "rmsprop", "adam"])
def test_resume_bitwise(tmp_path, surgery, precondition) -> None:
    def make_model() -> nn.Module:
        return build(TrunkHeads, seed=7, out_dims=(2, 3, 1))

    def make_opt(model: nn.Module) -> MultiTaskOptimizer:
        return MultiTaskOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            surgery=surgery,
            precondition=precondition,
            precondition_kwargs={"beta2": 0.9} if precondition in ("rmsprop", "adam") else None,
            seed=123,
        )

    _resume_roundtrip(tmp_path, make_model, make_opt)


def test_resume_bitwise_automatic_partition_task_lr(tmp_path) -> None:
    """Groups are split at the first step; the fresh optimizer must split them again on load."""

    def make_model() -> nn.Module:
        return build(TrunkHeads, seed=8, out_dims=(2, 3, 1))

    def make_opt(model: nn.Module) -> MultiTaskOptimizer:
        return MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            surgery="gradvac",
            precondition="rmsprop",
            task_lr={"shared": 0.02, "0": 0.01, "2": 0.03},
            seed=9,
        )

    _resume_roundtrip(tmp_path, make_model, make_opt)
    model = make_model()
    opt = make_opt(model)
    assert len(opt.param_groups) == 1
    wrapped_step(model, opt, 0)
    assert [g["task"] for g in opt.param_groups] == ["shared", "0", "1", "2"]
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.01, 0.05, 0.03]


def test_resume_bitwise_explicit_partition_task_lr(tmp_path) -> None:
    def make_model() -> nn.Module:
        return build(TrunkHeads, seed=9, out_dims=(2, 3, 1))

    def make_opt(model: nn.Module) -> MultiTaskOptimizer:
        return MultiTaskOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
            shared=model.trunk.parameters(),
            tasks={name: h.parameters() for name, h in zip("abc", model.heads)},
            surgery="gradvac",
            precondition="adam",
            task_lr=[1e-3, 2e-3, 3e-3],
            seed=10,
        )

    _resume_roundtrip(tmp_path, make_model, make_opt)


def test_resume_gradvac_k3_state_matters(tmp_path) -> None:
    """With K = 3 GradVac the random orders and targets matter: a resume that dropped
    them would differ. Check the check: a fresh optimizer (no load) does differ."""

    def make_model() -> nn.Module:
        return build(TrunkHeads, seed=4, out_dims=(2, 3, 1))

    def make_opt(model: nn.Module) -> MultiTaskOptimizer:
        return MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            surgery="gradvac",
            surgery_kwargs={"beta": 0.5},
            seed=5,
        )

    _resume_roundtrip(tmp_path, make_model, make_opt)

    straight = make_model()
    opt = make_opt(straight)
    for step in range(7):
        wrapped_step(straight, opt, step)
    sd = opt.state_dict()["multitask"]
    assert any(bool((v != 0).any()) for v in sd["states"]["surgery"].values()), "GradVac targets stayed 0"

    other = make_model()
    opt = make_opt(other)
    for step in range(3):
        wrapped_step(other, opt, step)
    opt = MultiTaskOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), surgery="gradvac", seed=99)
    for step in range(3, 7):
        wrapped_step(other, opt, step)
    assert any(not torch.equal(p, q) for p, q in zip(other.parameters(), straight.parameters()))


# ------------------------------------------------------------------ 5. schedulers
SCHEDULERS = ["step", "cosine", "lambda"]
LAMBDAS = [lambda t: 0.9**t, lambda t: 1.0 / (1.0 + t), lambda t: 1.0 + 0.1 * t, lambda t: 0.5**t]


def make_scheduler(kind: str, opt: torch.optim.Optimizer):
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=LAMBDAS[: len(opt.param_groups)])


def expected_lr(kind: str, base: float, group: int, t: int) -> float:
    if kind == "step":
        return base * 0.5 ** (t // 2)
    if kind == "cosine":
        return 1e-4 + (base - 1e-4) * (1 + math.cos(math.pi * t / 10)) / 2
    return base * LAMBDAS[group](t)


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize("task_lr", [{"a": 0.01, "b": 0.02}, {"shared": 0.2, "b": 0.03}, [0.01, 0.02]])
def test_scheduler_explicit_partition_task_lr(kind: str, task_lr) -> None:
    model = build(TrunkHeads, seed=1)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        shared=model.trunk.parameters(),
        tasks={"a": model.heads[0].parameters(), "b": model.heads[1].parameters()},
        task_lr=task_lr,
        seed=0,
    )
    assert [g["task"] for g in opt.param_groups] == ["shared", "a", "b"]
    rates = task_lr if isinstance(task_lr, dict) else dict(zip("ab", task_lr))
    initial = [rates.get(name, 0.1) for name in ("shared", "a", "b")]
    assert [g["lr"] for g in opt.param_groups] == initial
    assert [g["momentum"] for g in opt.param_groups] == [0.9] * 3
    assert [{id(p) for p in g["params"]} for g in opt.param_groups] == [
        {id(p) for p in model.trunk.parameters()},
        {id(p) for p in model.heads[0].parameters()},
        {id(p) for p in model.heads[1].parameters()},
    ]
    sched = make_scheduler(kind, opt)
    steps = 5
    for step in range(steps):
        wrapped_step(model, opt, step)
        sched.step()
    assert len(opt.param_groups) == 3
    for n, group in enumerate(opt.param_groups):
        assert group["initial_lr"] == initial[n]
        assert group["lr"] == pytest.approx(expected_lr(kind, initial[n], n, steps), rel=1e-9)


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_scheduler_automatic_partition_keeps_groups(kind: str) -> None:
    model = build(TrunkHeads, seed=1)
    inner = torch.optim.Adam(
        [{"params": model.trunk.parameters(), "lr": 0.01}, {"params": model.heads.parameters(), "lr": 0.03}]
    )
    opt = MultiTaskOptimizer(inner, seed=0)
    sched = make_scheduler(kind, opt)
    steps = 5
    for step in range(steps):
        wrapped_step(model, opt, step)
        sched.step()
    assert opt.partition is not None
    assert len(opt.param_groups) == 2
    assert all("task" not in g for g in opt.param_groups)
    for n, (group, base) in enumerate(zip(opt.param_groups, (0.01, 0.03))):
        assert group["lr"] == pytest.approx(expected_lr(kind, base, n, steps), rel=1e-9)


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize("task_lr", [{"0": 0.01}, [0.01, 0.02]])
def test_scheduler_before_automatic_split_raises(kind: str, task_lr) -> None:
    model = build(TrunkHeads, seed=1)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), task_lr=task_lr, seed=0)
    make_scheduler(kind, opt)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="scheduler") as info:
        opt.step(model.losses(model.batch(0)))
    assert "partition" in str(info.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.param_groups) == 1
    assert opt.partition is None


# ------------------------------------------------------------------ 6. automatic partition
def test_automatic_partition_roles_and_unused_warning() -> None:
    model = build(PartitionModel, seed=0)
    params = list(model.parameters())
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
    losses = model.losses(model.batch(0))
    heads = [list(h.parameters()) for h in model.heads]
    heads[2].append(model.head2_bias)
    own = [torch.autograd.grad(loss, hp, retain_graph=True) for loss, hp in zip(losses, heads)]

    with pytest.warns(UserWarning) as record:
        opt.step(losses)
    mine = [w for w in record if "MultiTaskOptimizer" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in record]
    index = position(params, model.unused)
    message = str(mine[0].message)
    assert f"parameter #{index} (shape (7,))" in message
    assert message.count("parameter #") == 1

    part = opt.partition
    assert opt.tasks == ("0", "1", "2")

    def ids(ps) -> set:
        return {id(p) for p in ps}

    assert ids(part.shared) == ids(model.trunk.parameters()) and len(part.shared) == 2
    assert [ids(t) for t in part.tasks] == [ids(h) for h in heads]
    assert [len(t) for t in part.tasks] == [2, 2, 3]
    assert ids(part.unused) == {id(model.unused)} and len(part.unused) == 1
    # task parameters received only their own loss's gradient
    for hp, grads in zip(heads, own):
        for p, g in zip(hp, grads):
            assert torch.equal(p.grad, g)
    assert model.unused.grad is None

    # warned once: no second warning on later steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped_step(model, opt, 1)


def test_automatic_partition_detach_feed() -> None:
    model = build(DetachFeed, seed=0)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
    losses = model.losses(model.batch(0))
    own_a = torch.autograd.grad(losses[0], list(model.head_a.parameters()), retain_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unused
        opt.step(losses)
    part = opt.partition
    shared = {id(p) for p in part.shared}
    assert shared == {id(p) for p in model.trunk.parameters()}
    assert {id(p) for p in part.tasks[0]} == {id(p) for p in model.head_a.parameters()}
    assert {id(p) for p in part.tasks[1]} == {id(p) for p in model.head_b.parameters()}
    assert part.unused == []
    for p, g in zip(model.head_a.parameters(), own_a):
        assert torch.equal(p.grad, g)


# ------------------------------------------------------------------ 7. step() without losses
@pytest.mark.parametrize("inner", ["adam", "sgd_momentum"])
def test_step_without_losses_is_inner_step(inner: str) -> None:
    ref = build(TrunkHeads, seed=2)
    mt = twin(ref)
    ref_opt = INNER[inner](ref.parameters())
    opt = MultiTaskOptimizer(INNER[inner](mt.parameters()), seed=0)
    for step in range(4):
        for model, o in ((ref, ref_opt), (mt, opt)):
            o.zero_grad()
            sum(model.losses(model.batch(step))).backward()
            assert o.step() is None
    assert_params_equal(mt, ref)
    assert opt.partition is None  # no losses: nothing discovered
    # and after a multi-task step, the plain path still works
    wrapped_step(mt, opt, 5)
    opt.zero_grad()
    sum(mt.losses(mt.batch(6))).backward()
    opt.step()


def test_step_with_closure_keyword() -> None:
    ref = build(TrunkHeads, seed=2)
    mt = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = MultiTaskOptimizer(torch.optim.SGD(mt.parameters(), lr=0.1, momentum=0.9), seed=0)

    def closure_for(model: nn.Module, o: torch.optim.Optimizer, step: int) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            o.zero_grad()
            loss = sum(model.losses(model.batch(step)))
            loss.backward()
            return loss

        return closure

    for step in range(3):
        a = ref_opt.step(closure_for(ref, ref_opt, step))
        b = opt.step(closure=closure_for(mt, opt, step))
        assert torch.equal(a, b)
    assert_params_equal(mt, ref)


def test_step_with_positional_closure() -> None:
    """``optimizer.step(closure)`` is the torch idiom (LBFGS); a callable is never a
    valid ``losses`` value, so it must be taken as the closure."""
    ref = build(TrunkHeads, seed=2)
    mt = twin(ref)
    ref_opt = torch.optim.LBFGS(ref.parameters(), lr=0.5, max_iter=3)
    opt = MultiTaskOptimizer(torch.optim.LBFGS(mt.parameters(), lr=0.5, max_iter=3), seed=0)

    def closure_for(model: nn.Module, o: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            o.zero_grad()
            loss = sum(model.losses(model.batch(0)))
            loss.backward()
            return loss

        return closure

    a = ref_opt.step(closure_for(ref, ref_opt))
    b = opt.step(closure_for(mt, opt))
    assert torch.equal(a, b)
    assert_params_equal(mt, ref)


# ------------------------------------------------------------------ 8. Optimizer contract
def test_optimizer_contract_and_hooks() -> None:
    model = build(TrunkHeads, seed=0)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = MultiTaskOptimizer(inner, seed=0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults

    calls: List[str] = []

    def pre(o, args, kwargs) -> None:
        assert o is opt
        calls.append("pre")

    def post(o, args, kwargs) -> None:
        assert o is opt
        calls.append("post")

    h_pre = opt.register_step_pre_hook(pre)
    h_post = opt.register_step_post_hook(post)
    opt.zero_grad()
    opt.step(model.losses(model.batch(0)))
    assert calls == ["pre", "post"]
    assert all(p.grad is not None for p in model.parameters())
    assert len(inner.state) == len(list(model.parameters()))

    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    sum(model.losses(model.batch(1))).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())

    opt.step()
    assert calls == ["pre", "post"] * 2
    h_pre.remove()
    h_post.remove()
    wrapped_step(model, opt, 2)
    assert calls == ["pre", "post"] * 2


# ------------------------------------------------------------------ 9. granularity
def _train(model: TrunkHeads, opt: MultiTaskOptimizer, steps: int = 60) -> List[float]:
    batch = model.batch(0)
    totals = []
    for _ in range(steps):
        losses = model.losses(batch)
        totals.append(float(sum(loss.detach() for loss in losses)))
        opt.zero_grad()
        opt.step(losses)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    totals.append(float(sum(loss.detach() for loss in model.losses(batch))))
    return totals


@pytest.mark.parametrize("surgery", ["pcgrad", "gradvac"])
@pytest.mark.parametrize("granularity", ["tensor", "layers"])
def test_granularity_trains(surgery: str, granularity: str) -> None:
    model = build(TrunkHeads, seed=6, out_dims=(2, 3, 1))
    blocks: Any = granularity
    if granularity == "layers":
        blocks = [list(model.trunk[0].parameters()), list(model.trunk[2].parameters())]
    opt = MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), surgery=surgery, granularity=blocks, seed=1
    )
    totals = _train(model, opt)
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.8 * totals[0]
    expected_blocks = 4 if granularity == "tensor" else 2
    assert len(opt.last_stats["block_coefficients"]) == expected_blocks


def test_granularity_missing_shared_parameter_automatic() -> None:
    model = build(TrunkHeads, seed=0)
    params = list(model.parameters())
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), granularity=[list(model.trunk[0].parameters())], seed=0
    )
    before = snapshot(model)
    with pytest.raises(ValueError, match="granularity") as info:
        opt.step(model.losses(model.batch(0)))
    missing = position(params, model.trunk[2].weight)
    assert f"parameter #{missing} (shape (8, 8))" in str(info.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.partition is None


def test_granularity_missing_shared_parameter_explicit() -> None:
    model = build(TrunkHeads, seed=0)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="granularity") as info:
        MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            shared=model.trunk.parameters(),
            tasks=[h.parameters() for h in model.heads],
            granularity=[[model.trunk[0].weight, model.trunk[2].weight, model.trunk[2].bias]],
            seed=0,
        )
    missing = position(params, model.trunk[0].bias)
    assert f"parameter #{missing} (shape (8,))" in str(info.value)
