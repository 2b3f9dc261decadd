"""Second-wave loss weightings (issue 10): FAMO, GLS, IMTL-L, STCH.

Closed forms and invariants called directly on the weightings, then each method end to
end in a :class:`MultiTaskOptimizer` (training, a checkpoint that resumes bitwise),
FAMO's same-batch call ``opt.update_weighting``, and the refusal of negative losses.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F
from faultkit import round_trip
from hypothesis import given
from hypothesis import strategies as st
from models import TrunkHeads, build
from torch import Tensor

from multitask_optim import MultiTaskOptimizer
from multitask_optim.weighting import (
    FAMO,
    WEIGHTINGS,
    GeometricLossStrategy,
    SmoothTchebycheff,
    WeightingContext,
    get_weighting,
)

F64 = torch.float64
NAMES = ("a", "b", "c")


def ctx(step: int = 0, names: Sequence[str] = NAMES) -> WeightingContext:
    return WeightingContext(torch.Generator().manual_seed(0), step, list(names))


def t64(values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=F64)


# ---------------------------------------------------------------------- registry, arguments
def test_registered_with_settings() -> None:
    assert {"famo", "gls", "imtl_l", "stch"} <= set(WEIGHTINGS)
    assert repr(get_weighting("famo", lr=0.01)) == "FAMO(lr=0.01, gamma=0.001, betas=(0.9, 0.999), eps=1e-08)"
    assert repr(get_weighting("gls")) == "GeometricLossStrategy()"
    assert repr(get_weighting("imtl_l", lr=0.05)) == "IMTLL(lr=0.05)"
    assert "mu=0.5, warmup_epochs=3, steps_per_epoch=10" in repr(
        get_weighting("stch", mu=0.5, warmup_epochs=3, steps_per_epoch=10)
    )


@pytest.mark.parametrize(
    "name, kwargs, argname",
    [
        ("famo", {"lr": 0.0}, "lr"),
        ("famo", {"lr": float("nan")}, "lr"),
        ("famo", {"gamma": -1.0}, "gamma"),
        ("famo", {"betas": (0.9, 1.0)}, "betas[1]"),
        ("famo", {"betas": 0.9}, "betas"),
        ("famo", {"eps": 0.0}, "eps"),
        ("imtl_l", {"lr": -1.0}, "lr"),
        ("stch", {"mu": 0.0}, "mu"),
        ("stch", {"warmup_epochs": 0}, "warmup_epochs"),
        ("stch", {"warmup_epochs": 1.5}, "warmup_epochs"),
        ("stch", {"steps_per_epoch": 0}, "steps_per_epoch"),
    ],
)
def test_bad_arguments_name_the_argument(name: str, kwargs: Dict[str, Any], argname: str) -> None:
    with pytest.raises(ValueError, match=argname.replace("[", r"\[").replace("]", r"\]")):
        get_weighting(name, **kwargs)


# ---------------------------------------------------------------------- losses of 0, negative losses
def _bound(name: str) -> Any:
    w = get_weighting(name)
    w.bind(NAMES)
    return w


@pytest.mark.parametrize("name", ["famo", "gls", "imtl_l", "stch"])
@pytest.mark.parametrize("bad", [-1e-30, -1.0])
def test_negative_loss_raises_naming_the_task(name: str, bad: float) -> None:
    w = _bound(name)
    state = w.init_state(3)
    _, state = w.compute(t64([1.0, 2.0, 3.0]), state, ctx())  # a step with state to keep
    before = copy.deepcopy(state)
    with pytest.raises(ValueError, match=r"'b'.*negative|negative.*'b'"):
        w.compute(t64([1.0, bad, 3.0]), state, ctx(1))
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)


@pytest.mark.parametrize("name", ["famo", "gls", "imtl_l", "stch"])
def test_zero_loss_gives_finite_weights(name: str) -> None:
    w = _bound(name)
    state = w.init_state(3)
    for step in range(3):
        weights, state = w.compute(t64([1.0, 0.0, 3.0]), state, ctx(step))
        assert bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
        w.backward(t64([1.0, 0.0, 3.0]), weights, state, ctx(step))
    assert all(bool(torch.isfinite(p.grad).all()) for p in w.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["famo", "gls", "imtl_l", "stch"])
def test_optimizer_refuses_a_negative_loss_and_changes_nothing(name: str) -> None:
    model = build(TrunkHeads, seed=0, out_dims=(2, 3, 1))
    opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), weighting=name, seed=0)
    opt.step(_losses(model, 0))
    saved = round_trip(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    losses = _losses(model, 1)
    losses[2] = losses[2] * 0.0 - 1.0
    opt.zero_grad()
    with pytest.raises(ValueError, match="'2'"):
        opt.step(losses)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert _same(opt.state_dict(), saved)


# ---------------------------------------------------------------------- GLS
@given(
    st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=6),
)
def test_gls_weights_are_the_gradient_of_the_geometric_mean(values: List[float]) -> None:
    losses = t64(values).requires_grad_(True)
    k = losses.shape[0]
    (expected,) = torch.autograd.grad(losses.prod() ** (1.0 / k), losses)
    w, _ = GeometricLossStrategy().compute(losses.detach(), {}, ctx(names=[str(i) for i in range(k)]))
    assert torch.allclose(w, expected, rtol=1e-12, atol=0)
    geo = math.exp(sum(math.log(v) for v in values) / k)
    assert torch.allclose(w, geo / (k * losses.detach()), rtol=1e-12)


@given(
    st.integers(0, 2),
    st.floats(1e-6, 1e8),
    st.integers(0, 10_000),
)
def test_gls_direction_is_invariant_to_one_loss_scale(task: int, c: float, seed: int) -> None:
    """Scaling task j's loss (hence its gradient) by c > 0 scales the update by c^(1/K)
    (for losses above GLS's floor 1e-8: the losses here are at least 0.1 c)."""
    g = torch.Generator().manual_seed(seed)
    losses = torch.rand(3, generator=g, dtype=F64) + 0.1
    jac = torch.randn(3, 7, generator=g, dtype=F64)
    gls = GeometricLossStrategy()
    w, _ = gls.compute(losses, {}, ctx())
    update = w @ jac
    scale = torch.ones(3, dtype=F64)
    scale[task] = c
    w2, _ = gls.compute(losses * scale, {}, ctx())
    update2 = w2 @ (jac * scale.view(3, 1))
    assert torch.allclose(update2, c ** (1 / 3) * update, rtol=1e-9, atol=0)


def test_gls_survives_extreme_scales() -> None:
    """Log space: a product of the losses would overflow float64 here (1e442)."""
    losses = torch.full((16,), 1e30, dtype=F64)
    losses[0] = 1e-8  # GLS's floor: the smallest loss it reads as it is
    w, _ = GeometricLossStrategy().compute(losses, {}, ctx(names=[str(i) for i in range(16)]))
    assert bool(torch.isfinite(w).all())
    geo = 10.0 ** ((15 * 30 - 8) / 16)
    assert torch.allclose(w * losses, torch.full((16,), geo / 16, dtype=F64), rtol=1e-12)


# ---------------------------------------------------------------------- IMTL-L
def test_imtl_l_weights_and_scale_gradient_match_autograd() -> None:
    w = _bound("imtl_l")
    with torch.no_grad():
        w.parameters()[0].copy_(torch.tensor([0.3, -1.2, 2.0]))
    losses = t64([0.5, 4.0, 0.01])
    s = w.parameters()[0].detach().to(F64).clone().requires_grad_(True)
    leaf = losses.clone().requires_grad_(True)
    objective = (torch.exp(s) * leaf - s).sum()
    d_loss, d_s = torch.autograd.grad(objective, [leaf, s])
    weights, _ = w.compute(losses, {}, ctx())
    w.backward(losses, weights, {}, ctx())
    grad = w.parameters()[0].grad
    assert grad is not None
    assert torch.allclose(weights, d_loss, rtol=1e-12)
    assert torch.allclose(grad.double(), d_s, rtol=1e-6)  # the parameter is float32
    assert math.isclose(w.objective(losses, weights), float(objective.detach()), rel_tol=1e-6)


def test_imtl_l_drives_every_scaled_loss_to_one() -> None:
    w = _bound("imtl_l")
    losses = t64([100.0, 1.0, 1e-3])
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for t in range(800):
        opt.zero_grad()
        weights, _ = w.compute(losses, {}, ctx(t))
        w.backward(losses, weights, {}, ctx(t))
        opt.step()
    weights, _ = w.compute(losses, {}, ctx())
    # Adam hovers within about one lr of the optimum log(1 / L_i) in s
    assert torch.allclose(weights * losses, torch.ones(3, dtype=F64), rtol=0.1)


def test_imtl_l_owns_a_param_group() -> None:
    model = build(TrunkHeads, seed=0)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        weighting="imtl_l",
        weighting_kwargs={"lr": 0.05},
        num_tasks=2,
    )
    assert opt.param_groups[-1]["task"] == "weighting" and opt.param_groups[-1]["lr"] == 0.05


# ---------------------------------------------------------------------- STCH
def test_stch_warmup_then_nadir_from_the_last_warmup_epoch() -> None:
    stch = SmoothTchebycheff(mu=0.5, warmup_epochs=2)
    stch.bind(NAMES)
    state = stch.init_state(3)
    epoch0 = [t64([1.0, 2.0, 3.0]), t64([3.0, 2.0, 1.0])]
    epoch1 = [t64([2.0, 4.0, 8.0]), t64([4.0, 2.0, 2.0]), t64([3.0, 3.0, 5.0])]
    for losses in epoch0:
        w, state = stch.compute(losses, state, ctx())
        assert torch.allclose(w, 1.0 / losses)
    state = stch.epoch_end(state)
    assert stch.warming_up(state)
    for losses in epoch1:
        w, state = stch.compute(losses, state, ctx())
        assert torch.allclose(w, 1.0 / losses)
    assert stch.epoch_end(stch.epoch_end(state)) is not state
    state = stch.epoch_end(state)
    assert not stch.warming_up(state)
    nadir = t64([3.0, 3.0, 5.0])  # the mean of epoch 1 only
    assert torch.equal(state["nadir"], nadir)
    assert stch.epoch_end(state) is state  # after the warm-up: nothing to do

    losses = t64([6.0, 1.5, 5.0])
    leaf = losses.clone().requires_grad_(True)
    objective = 3 * 0.5 * torch.logsumexp(torch.log(leaf / nadir) / 0.5, dim=0)
    (expected,) = torch.autograd.grad(objective, leaf)
    w, new_state = stch.compute(losses, state, ctx())
    assert torch.allclose(w, expected, rtol=1e-12)
    assert math.isclose(float((w * losses).sum()), 3.0, rel_tol=1e-12)
    assert new_state is state  # nothing left to record


def test_stch_empty_epoch_is_not_counted_and_steps_per_epoch_closes() -> None:
    stch = SmoothTchebycheff(warmup_epochs=2, steps_per_epoch=2)
    stch.bind(NAMES)
    state = stch.init_state(3)
    assert stch.epoch_end(state) is state
    for t in range(3):
        _, state = stch.compute(t64([1.0, 1.0, 1.0 + t]), state, ctx(t))
    assert int(state["epochs_done"]) == 1 and int(state["epoch_count"]) == 1
    _, state = stch.compute(t64([1.0, 1.0, 5.0]), state, ctx(3))
    assert not stch.warming_up(state)
    assert torch.equal(state["nadir"], t64([1.0, 1.0, 4.0]))


def test_stch_small_mu_approaches_the_max() -> None:
    stch = SmoothTchebycheff(mu=1e-3, warmup_epochs=1)
    stch.bind(NAMES)
    state = stch.epoch_end(stch.compute(t64([1.0, 1.0, 1.0]), {}, ctx())[1])
    w, _ = stch.compute(t64([2.0, 1.0, 1.5]), state, ctx())
    assert torch.allclose(w * t64([2.0, 1.0, 1.5]), t64([3.0, 0.0, 0.0]), atol=1e-12)


# ---------------------------------------------------------------------- FAMO
def _adam_reference(deltas: List[Tensor], lr: float, gamma: float) -> List[Tensor]:
    """The logits after each update, by autograd of softmax and torch.optim.Adam."""
    logits = torch.zeros(3, dtype=F64, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=lr, weight_decay=gamma)
    out = []
    for delta in deltas:
        (grad,) = torch.autograd.grad(torch.softmax(logits, 0), logits, grad_outputs=delta)
        logits.grad = grad
        adam.step()
        out.append(logits.detach().clone())
    return out


def test_famo_weights_closed_form_and_first_update_by_hand() -> None:
    famo = _bound("famo")
    losses0, losses1 = t64([1.0, 2.0, 4.0]), t64([0.5, 1.9, 4.4])
    w0, state = famo.compute(losses0, {}, ctx(0))
    d0 = losses0 + 1e-8
    assert torch.allclose(w0, (1 / d0) / (1 / d0).sum(), rtol=1e-14)  # uniform z
    assert torch.equal(state["logits"], torch.zeros(3, dtype=F64))  # no update at step 0
    w1, state = famo.compute(losses1, state, ctx(1))
    delta = torch.log(losses0 + 1e-8) - torch.log(losses1 + 1e-8)
    z = torch.full((3,), 1 / 3, dtype=F64)
    g = z * delta - z * (z @ delta)  # J_softmax^T delta at uniform logits (gamma * 0 = 0)
    by_hand = -0.025 * g / (g.abs() + 1e-8)  # Adam's first step: lr * m_hat / (sqrt(v_hat) + eps)
    assert torch.allclose(state["logits"], by_hand, rtol=1e-12, atol=0)
    z1 = torch.softmax(by_hand, 0)
    d1 = losses1 + 1e-8
    assert torch.allclose(w1, z1 / d1 / (z1 / d1).sum(), rtol=1e-14)
    assert math.isclose(float(w1.sum()), 1.0, rel_tol=1e-14)
    assert float(w1[0] * d1[0]) < float(w1[2] * d1[2])  # the task that improved most loses weight


def test_famo_logits_follow_adam_with_weight_decay_over_many_steps() -> None:
    famo = FAMO(lr=0.05, gamma=0.01)
    famo.bind(NAMES)
    g = torch.Generator().manual_seed(0)
    sequence = [torch.rand(3, generator=g, dtype=F64) + 0.1 for _ in range(15)]
    state: Dict[str, Tensor] = {}
    logits = []
    for t, losses in enumerate(sequence):
        _, state = famo.compute(losses, state, ctx(t))
        logits.append(state["logits"].clone())
    deltas = [torch.log(a + 1e-8) - torch.log(b + 1e-8) for a, b in zip(sequence, sequence[1:])]
    expected = _adam_reference(deltas, lr=0.05, gamma=0.01)
    for mine, ref in zip(logits[1:], expected):
        assert torch.allclose(mine, ref, rtol=1e-12, atol=1e-15)
    assert int(state["adam_steps"]) == 14


def test_famo_observe_consumes_the_pending_losses() -> None:
    famo = _bound("famo")
    state = famo.init_state(3)
    assert famo.observe(t64([1.0, 1.0, 1.0]), state) is state  # nothing pending
    _, state = famo.compute(t64([1.0, 2.0, 4.0]), state, ctx(0))
    after = famo.observe(t64([0.5, 2.0, 4.0]), state)
    assert int(after["adam_steps"]) == 1 and not bool(after["has_pending"])
    assert bool(state["has_pending"]) and int(state["adam_steps"]) == 0  # not mutated
    assert famo.observe(t64([0.1, 0.1, 0.1]), after) is after  # consumed: a second call does nothing
    _, nxt = famo.compute(t64([0.6, 2.0, 4.0]), after, ctx(1))
    assert torch.equal(nxt["logits"], after["logits"])  # the next step does not update again
    assert bool(nxt["has_pending"])
    with pytest.raises(ValueError, match="'c'"):
        famo.observe(t64([1.0, 1.0, -1.0]), nxt)
    with pytest.raises(ValueError, match="expected 3 losses"):
        famo.observe(t64([1.0, 1.0]), nxt)


# ---------------------------------------------------------------------- end to end
def _losses(model: TrunkHeads, step: int) -> List[Tensor]:
    x, targets = model.batch(step)
    z = model.trunk(x)
    return [F.mse_loss(head(z), y) for head, y in zip(model.heads, targets)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


CASES = [
    ("famo", {}),
    ("gls", {}),
    ("imtl_l", {"lr": 0.05}),
    ("stch", {"warmup_epochs": 2, "steps_per_epoch": 3}),
]


def _make(model: TrunkHeads, name: str, kwargs: Dict[str, Any], surgery: str) -> MultiTaskOptimizer:
    return MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        weighting=name,
        weighting_kwargs=kwargs,
        surgery=surgery,
        num_tasks=3,
        seed=5,
    )


@pytest.mark.parametrize("surgery", ["pcgrad", "mgda"])
@pytest.mark.parametrize("name, kwargs", CASES, ids=[c[0] for c in CASES])
def test_trains_and_resumes_bitwise(name: str, kwargs: Dict[str, Any], surgery: str) -> None:
    model = build(TrunkHeads, seed=1, out_dims=(2, 3, 1))
    opt = _make(model, name, kwargs, surgery)
    first = [float(v.detach()) for v in _losses(model, 100)]
    saved = None
    for step in range(16):
        opt.zero_grad()
        opt.step(_losses(model, step))
        if step == 4:  # STCH: mid-way through its second (last) warm-up epoch
            saved = (copy.deepcopy(model.state_dict()), round_trip(opt.state_dict()))
    assert saved is not None
    assert sum(float(v.detach()) for v in _losses(model, 100)) < sum(first)
    if name == "stch":
        assert not opt.weighting.warming_up(opt._states["weighting"])
    twin = build(TrunkHeads, seed=99, out_dims=(2, 3, 1))
    twin.load_state_dict(saved[0])
    resumed = _make(twin, name, kwargs, surgery)
    resumed.load_state_dict(saved[1])
    for step in range(5, 16):
        resumed.zero_grad()
        resumed.step(_losses(twin, step))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert _same(opt.state_dict(), resumed.state_dict())


# ---------------------------------------------------------------------- FAMO, same batch
def _famo_loop(model: TrunkHeads, opt: MultiTaskOptimizer, steps: range, same_batch: bool) -> None:
    for step in steps:
        opt.zero_grad()
        opt.step(_losses(model, step))
        if same_batch:
            with torch.no_grad():
                opt.update_weighting(_losses(model, step))


def test_famo_same_batch_update_through_the_optimizer() -> None:
    model = build(TrunkHeads, seed=2, out_dims=(2, 3, 1))
    opt = _make(model, "famo", {}, "pcgrad")
    famo, state = FAMO(), {}
    famo.bind(("0", "1", "2"))
    for step in range(6):
        before = [loss for loss in _losses(model, step)]
        values = torch.stack([v.detach().double() for v in before])
        _, state = famo.compute(values, state, ctx(step, ("0", "1", "2")))
        opt.zero_grad()
        opt.step(before)
        with torch.no_grad():
            after = _losses(model, step)
        opt.update_weighting(after)
        state = famo.observe(torch.stack([v.double() for v in after]), state)
        assert _same(opt._states["weighting"], state)
    assert int(state["adam_steps"]) == 6

    # the variants differ: the next-step default sees other batches' losses
    other = build(TrunkHeads, seed=2, out_dims=(2, 3, 1))
    default = _make(other, "famo", {}, "pcgrad")
    _famo_loop(other, default, range(6), same_batch=False)
    assert not torch.equal(default._states["weighting"]["logits"], opt._states["weighting"]["logits"])


def test_famo_same_batch_resumes_bitwise() -> None:
    model = build(TrunkHeads, seed=3, out_dims=(2, 3, 1))
    opt = _make(model, "famo", {}, "pcgrad")
    _famo_loop(model, opt, range(5), same_batch=True)
    saved = (copy.deepcopy(model.state_dict()), round_trip(opt.state_dict()))
    _famo_loop(model, opt, range(5, 10), same_batch=True)
    twin = build(TrunkHeads, seed=3, out_dims=(2, 3, 1))
    twin.load_state_dict(saved[0])
    resumed = _make(twin, "famo", {}, "pcgrad")
    resumed.load_state_dict(saved[1])
    _famo_loop(twin, resumed, range(5, 10), same_batch=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert _same(opt.state_dict(), resumed.state_dict())


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([1.0, 2.0], ValueError, "expected 3 losses"),
        ([1.0, float("nan"), 2.0], ValueError, "non-finite.*'1'"),
        ([1.0, torch.tensor(float("inf")), 2.0], ValueError, "non-finite.*'1'"),
        ([1.0, 2.0, -1.0], ValueError, "'2'"),
        ([1.0, "x", 2.0], TypeError, "'1'"),
        ([1.0, torch.ones(2), 2.0], TypeError, "'1'"),
        ([1.0, torch.tensor(2), 2.0], TypeError, "'1'"),
        (torch.ones(3, 1), ValueError, "shape"),
        ({"0": 1.0, "1": 1.0, "x": 1.0}, ValueError, "unknown"),
        (3.0, TypeError, "float"),
    ],
)
def test_update_weighting_refuses_bad_input_and_changes_nothing(bad: Any, error: type, match: str) -> None:
    model = build(TrunkHeads, seed=4, out_dims=(2, 3, 1))
    opt = _make(model, "famo", {}, "pcgrad")
    opt.step(_losses(model, 0))
    saved = round_trip(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.update_weighting(bad)
    assert _same(opt.state_dict(), saved)


def test_update_weighting_accepts_mappings_tensors_and_numbers() -> None:
    runs = []
    for form in ("list", "mapping", "tensor"):
        model = build(TrunkHeads, seed=4, out_dims=(2, 3, 1))
        opt = _make(model, "famo", {}, "pcgrad")
        opt.step(_losses(model, 0))
        values = [0.5, 1.0, 2.0]
        arg: Any = {
            "list": [values[0], torch.tensor(values[1]), torch.tensor([values[2]], dtype=F64)],
            "mapping": {"2": values[2], "0": values[0], "1": values[1]},
            "tensor": torch.tensor(values),
        }[form]
        opt.update_weighting(arg)
        runs.append(opt._states["weighting"]["logits"])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_update_weighting_before_tasks_and_with_other_weightings() -> None:
    model = build(TrunkHeads, seed=4, out_dims=(2, 3, 1))
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weighting="famo")
    with pytest.raises(RuntimeError, match="take a step first"):
        opt.update_weighting([1.0, 1.0, 1.0])
    declared = _make(model, "famo", {}, "pcgrad")
    saved = round_trip(declared.state_dict())
    declared.update_weighting([1.0, 1.0, 1.0])  # tasks known, no step pending: nothing to do
    assert _same(declared.state_dict(), saved)
    gls = _make(model, "gls", {}, "pcgrad")
    gls.step(_losses(model, 0))
    saved = round_trip(gls.state_dict())
    with pytest.raises(NotImplementedError, match="'gls'"):
        gls.update_weighting([1.0, 1.0, 1.0])
    assert _same(gls.state_dict(), saved)
