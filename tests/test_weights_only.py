"""Weights-only mode (``opt.weighted_loss(losses)``, issue 21).

The scalar ``sum_i c_i w_i L_i`` (coefficients and weights detached), backpropagated by
the caller, must put exactly the full step's update on the shared parameters. Every
Gram-based surgery, with no weighting, a loss weighting and a learnable one, runs over
several steps with absent tasks and a surgery schedule, with an inner SGD (no momentum:
the update is the gradient times the learning rate, so a scale error shows). A task's
own parameters receive ``c_i w_i grad L_i`` instead of ``w_i grad L_i`` (the documented
difference): to compare the shared updates over several steps, every step of the
weights-only run starts from the full run's parameters (the methods' states evolve on
their own and are compared at the end), and the difference itself is checked on one step.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, Optional

import pytest
import torch
from torch import Tensor, nn

from multitask_optim import AGGREGATORS, MultiTaskOptimizer

GRAM_SURGERIES = sorted(n for n in AGGREGATORS if not AGGREGATORS[n].needs_jacobian)
ROW_SURGERIES = sorted(n for n in AGGREGATORS if AGGREGATORS[n].needs_jacobian)
TASKS = ("a", "b", "c", "d")  # four: a step without one still has three (Krum needs them)
LR = 0.1


class Net(nn.Module):
    def __init__(self, width: int = 12, rows: int = 10) -> None:
        super().__init__()
        self.rows = rows
        self.trunk = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(width, 1) for t in TASKS})


def make_net(seed: int = 0, **kw) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net(**kw)


def losses(net: Net, step: int, absent: Optional[str] = None) -> Dict[str, Tensor]:
    """Conflicting regressions of different scales; ``absent`` leaves one task out."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(net.rows, 6, generator=g)
    z = net.trunk(x)
    out = {}
    for i, t in enumerate(TASKS):
        target = torch.randn(net.rows, generator=g) * (i + 1) + (-1) ** i * x[:, 0]
        if t != absent:
            out[t] = ((net.heads[t](z).squeeze(-1) - target) ** 2).mean() * (1 + 2 * i)
    return out


def optimizer(net: Net, surgery: Optional[str], weighting: Optional[str], **kw) -> MultiTaskOptimizer:
    return MultiTaskOptimizer(
        torch.optim.SGD(net.parameters(), lr=LR),
        shared=net.trunk.parameters(),
        tasks={t: net.heads[t].parameters() for t in TASKS},
        surgery=surgery,
        weighting=weighting,
        seed=3,
        **kw,
    )


def weights_only_step(opt: MultiTaskOptimizer, batch: Dict[str, Tensor]) -> Tensor:
    opt.zero_grad()
    loss = opt.weighted_loss(batch)
    loss.backward()
    opt.step()
    return loss


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def flat_grads(module: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def term_scale(opt: MultiTaskOptimizer, update: Tensor) -> float:
    """The size of the terms of ``sum_i c_i (w_i g_i)`` (float32 rounding is relative to
    it, not to the sum, when the coefficients make the terms cancel)."""
    norms = opt.last_stats.get("grad_norms")  # of the weighted rows; absent on plain steps
    terms = 0.0 if norms is None else sum(abs(c) * n for c, n in zip(opt.last_stats["coefficients"], norms))
    return max(float(update.norm()), terms)


ABSENT = {3: "b", 4: "a"}  # steps with a task missing (3: a full step, 4: a plain one)


@pytest.mark.parametrize("weighting", [None, "rlw", "uncertainty"])
@pytest.mark.parametrize("surgery", GRAM_SURGERIES)
def test_shared_update_equals_the_full_step(surgery: str, weighting: Optional[str]) -> None:
    full_net, wo_net = make_net(), make_net()
    kw = {"surgery_every": 2, "surgery_start": 1}
    full = optimizer(full_net, surgery, weighting, **kw)
    wo = optimizer(wo_net, surgery, weighting, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a surgery that sees no shared parameter on a step says so
        for step in range(5):  # steps 1 and 3 run the surgery, the others are plain
            full.zero_grad()
            full.step(losses(full_net, step, ABSENT.get(step)))
            weights_only_step(wo, losses(wo_net, step, ABSENT.get(step)))
            # SGD: each parameter moved by -LR * .grad; compare the gradients (a difference of
            # float32 parameters would lose the digits the comparison is about)
            got, want = flat_grads(wo_net.trunk), flat_grads(full_net.trunk)
            assert float((got - want).norm()) <= 1e-5 * term_scale(full, want), f"step {step}"
            assert wo.last_stats["path"] == full.last_stats["path"]
            assert wo.last_stats["weights"] == pytest.approx(full.last_stats["weights"], rel=1e-9)
            assert wo.last_stats["coefficients"] == pytest.approx(
                full.last_stats["coefficients"], rel=1e-4, abs=1e-7
            )
            assert wo.last_stats["weights_only"] is True
            with torch.no_grad():  # the heads got c_i w_i grad L_i; every step starts equal
                for p, q in zip(full_net.parameters(), wo_net.parameters()):
                    q.copy_(p)
                for p, q in zip(full.weighting.parameters(), wo.weighting.parameters()):
                    torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
                    q.copy_(p)
    full_mt, wo_mt = full.state_dict()["multitask"], wo.state_dict()["multitask"]
    assert wo_mt["steps"] == full_mt["steps"] == 5
    assert torch.equal(wo_mt["generator"], full_mt["generator"])
    for kind, state in full_mt["states"].items():
        assert state.keys() == wo_mt["states"][kind].keys()
        for key, value in state.items():
            torch.testing.assert_close(wo_mt["states"][kind][key], value, rtol=1e-4, atol=1e-6)


def test_task_parameters_receive_the_coefficient_times_their_gradient() -> None:
    full_net, wo_net = make_net(), make_net()
    full = optimizer(full_net, "pcgrad", "rlw")
    wo = optimizer(wo_net, "pcgrad", "rlw")
    start = copy.deepcopy(full_net)
    full.step(losses(full_net, 0))
    weights_only_step(wo, losses(wo_net, 0))
    coefs = wo.last_stats["coefficients"]
    assert coefs == pytest.approx(full.last_stats["coefficients"], rel=1e-9)
    assert any(abs(c - 1.0) > 1e-3 for c in coefs), "the batch has conflicts: PCGrad moves a coefficient"
    for c, t in zip(coefs, TASKS):
        for p0, pf, pw in zip(
            start.heads[t].parameters(), full_net.heads[t].parameters(), wo_net.heads[t].parameters()
        ):
            assert relative(pw - p0, c * (pf - p0)) <= 1e-5


def test_returned_value_is_the_weighted_sum_and_the_learnable_term_is_zero() -> None:
    net = make_net()
    opt = optimizer(net, "mgda", "uncertainty")
    batch = losses(net, 0)
    loss = opt.weighted_loss(batch)
    c, w = opt.last_stats["coefficients"], opt.last_stats["weights"]
    expected = sum(ci * wi * float(batch[t].detach()) for ci, wi, t in zip(c, w, TASKS))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    log_vars = opt.weighting.parameters()
    assert all(p.grad is not None and float(p.grad) != 0.0 for p in log_vars)
    opt.step()
    assert any(float(p.detach()) != 0.0 for p in log_vars), "the same backward trained the log-variances"


def test_closure_form_as_lightning_calls_it() -> None:
    """``opt.step(closure)`` whose closure calls weighted_loss and backward (Lightning's
    automatic optimization) equals weighted_loss + backward + step()."""
    a_net, b_net = make_net(), make_net()
    a, b = optimizer(a_net, "gradvac", None), optimizer(b_net, "gradvac", None)
    for step in range(3):
        weights_only_step(a, losses(a_net, step))

        def closure(step: int = step) -> Tensor:
            loss = b.weighted_loss(losses(b_net, step))
            b.zero_grad()  # Lightning zeroes between training_step and backward
            loss.backward()
            return loss

        b.step(closure)
    for p, q in zip(a_net.parameters(), b_net.parameters()):
        assert torch.equal(p, q)


def test_plain_configuration_is_the_sum_bitwise() -> None:
    plain_net, wo_net = make_net(), make_net()
    plain = torch.optim.SGD(plain_net.parameters(), lr=LR)
    wo = optimizer(wo_net, None, None)
    for step in range(3):
        plain.zero_grad()
        sum(losses(plain_net, step).values()).backward()
        plain.step()
        weights_only_step(wo, losses(wo_net, step))
    for p, q in zip(plain_net.parameters(), wo_net.parameters()):
        assert torch.equal(p, q)


def test_max_grad_norm_clips_at_the_step_as_the_full_step() -> None:
    """With coefficients 1 (surgery=None) the weights-only gradients are the full step's,
    so clipping at ``step()`` must give the same parameters."""
    full_net, wo_net = make_net(), make_net()
    full = optimizer(full_net, None, "rlw", max_grad_norm=0.05)
    wo = optimizer(wo_net, None, "rlw", max_grad_norm=0.05)
    for step in range(3):
        full.zero_grad()
        full.step(losses(full_net, step))
        weights_only_step(wo, losses(wo_net, step))
        assert wo.last_stats["grad_norm"] == pytest.approx(full.last_stats["grad_norm"], rel=1e-5)
        assert wo.last_stats["grad_norm"] > 0.05
    for p, q in zip(full_net.parameters(), wo_net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_non_finite_loss_skips_like_the_full_step() -> None:
    net = make_net()
    opt = optimizer(net, "gradvac", "uncertainty")
    weights_only_step(opt, losses(net, 0))
    params = copy.deepcopy(list(net.parameters()))
    state = copy.deepcopy(opt.state_dict())
    batch = losses(net, 1)
    batch["b"] = batch["b"] * float("nan")
    with pytest.warns(UserWarning, match="skipped"):
        loss = opt.weighted_loss(batch)
    assert math.isnan(float(loss.detach())) and loss.requires_grad  # the plain sum: a scaler sees the NaN
    assert opt.last_stats["skipped"] == 1 and opt.last_stats["skipped_step"]
    loss.backward()
    opt.step()  # does not run the inner step
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    after = opt.state_dict()
    assert after["multitask"]["steps"] == state["multitask"]["steps"] == 1
    assert torch.equal(after["multitask"]["generator"], state["multitask"]["generator"])
    weights_only_step(opt, losses(net, 2))  # the next step runs
    assert opt.state_dict()["multitask"]["steps"] == 2


def test_non_finite_gradient_at_step_skips_the_inner_step() -> None:
    net = make_net()
    opt = optimizer(net, "pcgrad", None)
    params = copy.deepcopy(list(net.parameters()))
    loss = opt.weighted_loss(losses(net, 0))
    loss.backward()
    next(net.trunk.parameters()).grad[0, 0] = float("inf")  # e.g. an overflow in the caller's backward
    with pytest.warns(UserWarning, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    assert opt.skipped == 1


def test_grad_scaler_in_the_callers_hands() -> None:
    """``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``: the scaler
    unscales, finds nothing and calls ``opt.step()``; the update is the unscaled one."""
    a_net, b_net = make_net(), make_net()
    a, b = optimizer(a_net, "upgrad", None), optimizer(b_net, "upgrad", None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        weights_only_step(a, losses(a_net, step))
        b.zero_grad()
        scaler.scale(b.weighted_loss(losses(b_net, step))).backward()
        scaler.step(b)
        scaler.update()
    for p, q in zip(a_net.parameters(), b_net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def _state(opt: MultiTaskOptimizer) -> Dict:
    return copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize(
    "kw, message",
    [
        *[({"surgery": name}, "needs_jacobian") for name in ROW_SURGERIES],
        ({"surgery": "pcgrad", "precondition": "adam"}, "preconditioning"),
        ({"surgery": "pcgrad", "granularity": "tensor"}, "one Gram"),
    ],
)
def test_refused_configurations(kw, message: str) -> None:
    net = make_net()
    opt = optimizer(net, kw.pop("surgery"), None, **kw)
    state = _state(opt)
    with pytest.raises(ValueError, match=message):
        opt.weighted_loss(losses(net, 0))
    assert all(p.grad is None for p in net.parameters())
    assert str(_state(opt)) == str(state)


def test_refused_calls_change_nothing() -> None:
    net = make_net()
    opt = optimizer(net, "pcgrad", None)
    with pytest.raises(ValueError, match="representation mode"):
        opt.weighted_loss(losses(net, 0), representation=torch.zeros(1, requires_grad=True))
    with pytest.raises(ValueError, match="task"):
        opt.weighted_loss({"a": losses(net, 0)["a"], "zz": losses(net, 0)["b"]})
    opt.accumulate(losses(net, 0))
    with pytest.raises(ValueError, match="accumulate"):
        opt.weighted_loss(losses(net, 1))
    opt.zero_grad()
    opt.weighted_loss(losses(net, 1)).backward()
    with pytest.raises(ValueError, match="weighted_loss"):
        opt.step(losses(net, 2))
    with pytest.raises(ValueError, match="weighted_loss"):
        opt.accumulate(losses(net, 2))
    opt.step()
    assert opt.state_dict()["multitask"]["steps"] == 1


def test_micro_batches_apply_the_method_per_call() -> None:
    """Two calls before one ``step()``: two steps of the method, one inner step whose
    gradient is the sum of the two micro-batches' updates."""
    a_net, b_net = make_net(), make_net()
    a, b = optimizer(a_net, "pcgrad", None), optimizer(b_net, "pcgrad", None)
    grads = []
    for step in range(2):
        a.zero_grad()
        a.weighted_loss(losses(a_net, step)).backward()
        grads.append([p.grad.clone() for p in a_net.trunk.parameters()])
        a._pending = None  # drop it: only the gradient of each call is wanted here
    b.zero_grad()
    for step in range(2):
        b.weighted_loss(losses(b_net, step)).backward()
    assert b.state_dict()["multitask"]["steps"] == 2
    for p, g0, g1 in zip(b_net.trunk.parameters(), *grads):
        torch.testing.assert_close(p.grad, g0 + g1, rtol=1e-6, atol=1e-8)
    b.step()


def _compare_runs(make, steps: int = 3, net: Optional[Dict] = None, **kw) -> MultiTaskOptimizer:
    """Full step against weights-only from equal parameters at every step; the
    weights-only optimizer (for its statistics)."""
    full_net, wo_net = make_net(**(net or {})), make_net(**(net or {}))
    full, wo = make(full_net, **kw), make(wo_net, **kw)
    for step in range(steps):
        full.zero_grad()
        full.step(losses(full_net, step))
        weights_only_step(wo, losses(wo_net, step))
        got, want = flat_grads(wo_net.trunk), flat_grads(full_net.trunk)
        assert float((got - want).norm()) <= 1e-5 * term_scale(full, want), f"step {step}"
        for p, q in zip(full.weighting.parameters(), wo.weighting.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-9)
        with torch.no_grad():
            for p, q in zip(
                [*full_net.parameters(), *full.weighting.parameters()],
                [*wo_net.parameters(), *wo.weighting.parameters()],
            ):
                q.copy_(p)
    return wo


@pytest.mark.parametrize("weighting", ["gradnorm", "imtl_l"])
def test_learnable_weightings_that_read_the_gram_or_all_tasks(weighting: str) -> None:
    _compare_runs(lambda net, **kw: optimizer(net, "pcgrad", weighting, **kw))


def test_the_gram_only_walk_keeps_only_grams(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native walk keeps only the factored layers' Gram wherever that holds less
    (the full step does so above a size, since it costs it one more backward, lowered
    here; in weights-only mode that backward is the caller's own)."""
    from multitask_optim import _native

    monkeypatch.setattr(_native, "DEFER_ABOVE", 0)
    wo = _compare_runs(
        lambda net, **kw: optimizer(net, "upgrad", None, gradient_mode="native", **kw),
        net={"width": 48, "rows": 4},
    )
    assert wo.last_stats["gram_only_params"] > 0


def test_weights_only_takes_the_gram_only_walk_below_the_full_steps_threshold() -> None:
    """A small model: the full step keeps the deltas (its Gram-only walk would cost one
    more backward); weights-only mode keeps only the Gram (the update is the caller's backward)."""
    net = make_net(width=48, rows=4)
    full = optimizer(net, "upgrad", None, gradient_mode="native")
    full.step(losses(net, 0))
    assert full.last_stats["gram_only_params"] == 0 and full.last_stats["factored_params"] > 0
    wo_net = make_net(width=48, rows=4)
    wo = optimizer(wo_net, "upgrad", None, gradient_mode="native")
    weights_only_step(wo, losses(wo_net, 0))
    assert wo.last_stats["gram_only_params"] == full.last_stats["factored_params"]
