"""Loss weightings: each method's defining property, called directly (no optimizer)."""

from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch
from faultkit import round_trip
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from multitask_optim.weighting import (
    HTW,
    WEIGHTINGS,
    DynamicWeightAverage,
    GradNorm,
    RandomLossWeighting,
    StagedStart,
    StaticWeights,
    UncertaintyWeighting,
    WeightingContext,
    get_weighting,
)

F64 = torch.float64
PROPS = settings(max_examples=examples(60))


def make_ctx(
    step: int = 0,
    names: Sequence[str] = ("a", "b", "c"),
    seed: int = 0,
) -> WeightingContext:
    gen = torch.Generator().manual_seed(seed)
    return WeightingContext(generator=gen, step=step, task_names=list(names))


def t64(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --------------------------------------------------------------------------- registry


def test_registry_has_every_method():
    assert {"static", "staged", "uncertainty", "dwa", "htw", "gradnorm", "rlw"} <= set(WEIGHTINGS)
    assert isinstance(get_weighting("dwa", temperature=3.0), DynamicWeightAverage)
    assert isinstance(get_weighting("HTW", total_steps=5), HTW)


@pytest.mark.parametrize(
    "weighting, text",
    [
        (StaticWeights([1.0, 2.0]), "weights=[1.0, 2.0]"),
        (StagedStart([0, 5], ramp_steps=3), "ramp_steps=3"),
        (UncertaintyWeighting("classification", lr=0.01), "lr=0.01"),
        (DynamicWeightAverage(temperature=3.0, steps_per_epoch=10), "steps_per_epoch=10"),
        (HTW(1, total_steps=100, warmup=0.2, alpha=0.25), "alpha=0.25"),
        (GradNorm(alpha=0.5), "alpha=0.5"),
        (RandomLossWeighting("sumK"), "scale='sumK'"),
    ],
)
def test_repr_shows_hyper_parameters(weighting, text):
    assert text in repr(weighting)
    assert repr(weighting).startswith(type(weighting).__name__ + "(")


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "build, argname",
    [
        (lambda: StaticWeights([1.0, -0.5]), "weights"),
        (lambda: StaticWeights({"a": float("nan")}), "weights"),
        (lambda: StaticWeights(3.0), "weights"),
        (lambda: StagedStart([0, -1]), "start_steps"),
        (lambda: StagedStart([0, 1.5]), "start_steps"),
        (lambda: StagedStart([0, 1], ramp_steps=-2), "ramp_steps"),
        (lambda: UncertaintyWeighting("ordinal"), "kind"),
        (lambda: UncertaintyWeighting(["regression", "poisson"]), "kind"),
        (lambda: UncertaintyWeighting(lr=0.0), "lr"),
        (lambda: UncertaintyWeighting(lr=float("inf")), "lr"),
        (lambda: DynamicWeightAverage(temperature=0.0), "temperature"),
        (lambda: DynamicWeightAverage(temperature=-1.0), "temperature"),
        (lambda: DynamicWeightAverage(steps_per_epoch=0), "steps_per_epoch"),
        (lambda: HTW(total_steps=0), "total_steps"),
        (lambda: HTW(total_steps=10, warmup=1.5), "warmup"),
        (lambda: HTW(total_steps=10, warmup=-0.1), "warmup"),
        (lambda: HTW(total_steps=10, alpha=-1.0), "alpha"),
        (lambda: HTW(-1, total_steps=10), "main_task"),
        (lambda: GradNorm(alpha=-0.1), "alpha"),
        (lambda: GradNorm(alpha=float("nan")), "alpha"),
        (lambda: GradNorm(lr=-1e-3), "lr"),
        (lambda: RandomLossWeighting("sum2"), "scale"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(build, argname):
    with pytest.raises(ValueError, match=argname):
        build()


# --------------------------------------------------------------------------- static


def test_static_sequence_and_mapping():
    w, state = StaticWeights([1.0, 0.5, 2.0]).compute(t64([3.0, 1.0, 2.0]), {}, make_ctx())
    assert w.dtype == F64 and torch.equal(w, t64([1.0, 0.5, 2.0]))
    assert state == {}

    mapped = StaticWeights({"c": 3.0, "a": 1.0, "b": 0.0})
    mapped.bind(["a", "b", "c"])
    w, _ = mapped.compute(t64([1.0, 1.0, 1.0]), {}, make_ctx())
    assert torch.equal(w, t64([1.0, 0.0, 3.0]))


def test_static_mapping_names_are_checked():
    with pytest.raises(ValueError, match="'x'"):
        StaticWeights({"a": 1.0, "b": 1.0, "c": 1.0, "x": 2.0}).bind(["a", "b", "c"])
    with pytest.raises(ValueError, match="'c'"):
        StaticWeights({"a": 1.0, "b": 1.0}).bind(["a", "b", "c"])
    with pytest.raises(ValueError, match="weights"):
        StaticWeights([1.0, 1.0]).bind(["a", "b", "c"])


# --------------------------------------------------------------------------- staged


def test_staged_exact_schedule_without_ramp():
    staged = StagedStart([0, 2, 5])
    staged.bind(["a", "b", "c"])
    rows = [staged.compute(t64([1, 1, 1]), {}, make_ctx(step=s))[0].tolist() for s in range(7)]
    assert rows == [
        [1, 0, 0],
        [1, 0, 0],
        [1, 1, 0],
        [1, 1, 0],
        [1, 1, 0],
        [1, 1, 1],
        [1, 1, 1],
    ]


def test_staged_exact_schedule_with_ramp():
    staged = StagedStart({"b": 2}, ramp_steps=4)  # "a" starts at 0
    staged.bind(["a", "b"])
    got = [staged.compute(t64([1, 1]), {}, make_ctx(step=s, names="ab"))[0][1].item() for s in range(8)]
    assert got == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    first = [staged.compute(t64([1, 1]), {}, make_ctx(step=s, names="ab"))[0][0].item() for s in range(5)]
    assert first == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_staged_unknown_name():
    with pytest.raises(ValueError, match="'z'"):
        StagedStart({"z": 3}).bind(["a", "b"])


@PROPS
@given(
    start=st.integers(0, 50),
    ramp=st.integers(0, 20),
    step=st.integers(0, 100),
)
def test_staged_matches_rule(start, ramp, step):
    w = StagedStart([start], ramp_steps=ramp).compute(t64([1.0]), {}, make_ctx(step=step, names="a"))[0]
    if ramp == 0:
        expected = 1.0 if step >= start else 0.0
    else:
        expected = min(max((step - start + 1) / ramp, 0.0), 1.0)
    assert w.item() == pytest.approx(expected, abs=1e-15)


# --------------------------------------------------------------------------- rlw


@pytest.mark.parametrize("scale, total", [("sum1", 1.0), ("sumK", 4.0)])
def test_rlw_is_softmax_of_generator_normal_draw(scale, total):
    rlw = RandomLossWeighting(scale)
    ctx = make_ctx(names="abcd", seed=123)
    reference = torch.Generator().manual_seed(123)
    losses = t64([1.0, 2.0, 3.0, 4.0])
    for _ in range(5):
        w, state = rlw.compute(losses, {}, ctx)
        z = torch.randn(4, generator=reference, dtype=F64)
        assert torch.allclose(w, total * torch.softmax(z, 0), rtol=0, atol=1e-15)
        assert w.sum().item() == pytest.approx(total, abs=1e-12)
        assert (w > 0).all() and state == {}


def test_rlw_same_seed_same_weights_and_default_sums_to_one():
    rlw = RandomLossWeighting()
    assert rlw.scale == "sum1"
    losses = t64([1.0, 1.0, 1.0])
    ctx1, ctx2 = make_ctx(seed=7), make_ctx(seed=7)
    a = [rlw.compute(losses, {}, ctx1)[0] for _ in range(3)]
    b = [rlw.compute(losses, {}, ctx2)[0] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], rlw.compute(losses, {}, make_ctx(seed=8))[0])


# --------------------------------------------------------------------------- uncertainty


def _uncertainty(kinds, s_values):
    u = UncertaintyWeighting(kinds)
    u.bind(["a", "b", "c"][: len(s_values)])
    with torch.no_grad():  # one scalar parameter per task
        for p, v in zip(u.parameters(), s_values):
            p.fill_(v)
    return u


def _grads(weighting):
    """The per-task scalar parameters' gradients, stacked."""
    return torch.stack([p.grad for p in weighting.parameters()])


def test_uncertainty_weights_and_grad_closed_form():
    s = [0.3, -1.2, 2.0]
    u = _uncertainty({"b": "classification"}, s)  # a, c regression
    assert u.kinds == ["regression", "classification", "regression"]
    losses = t64([2.0, 0.7, 5.0])
    ctx = make_ctx()
    w, state = u.compute(losses, {}, ctx)
    s64 = u.log_var.detach().to(F64)
    c = t64([0.5, 1.0, 0.5])
    assert torch.allclose(w, c * torch.exp(-s64), rtol=1e-15, atol=0)
    assert w.dtype == F64 and not w.requires_grad and state == {}

    u.backward(losses, w, state, ctx)
    expected = 0.5 - c * torch.exp(-s64) * losses
    assert torch.allclose(_grads(u).to(F64), expected, rtol=1e-6, atol=1e-7)
    # autograd on the paper's objective
    sv = s64.clone().requires_grad_(True)
    objective = (c * torch.exp(-sv) * losses + 0.5 * sv).sum()
    (auto,) = torch.autograd.grad(objective, sv)
    assert torch.allclose(_grads(u).to(F64), auto, rtol=1e-6, atol=1e-7)
    assert u.objective(losses, w) == pytest.approx(objective.item(), rel=1e-12)
    # .grad accumulates like Tensor.backward
    u.backward(losses, w, state, ctx)
    assert torch.allclose(_grads(u).to(F64), 2 * expected, rtol=1e-6, atol=1e-7)
    assert torch.allclose(u.sigma, torch.exp(0.5 * s64), rtol=1e-15)


def test_uncertainty_single_kind_and_parameters():
    u = UncertaintyWeighting("classification", lr=0.05)
    assert u.parameters() == [] and u.lr == 0.05
    u.bind(["a", "b"])
    params = u.parameters()
    assert len(params) == 2 and all(p.shape == () for p in params)  # one scalar per task
    assert torch.equal(u.log_var, torch.zeros(2))
    w, _ = u.compute(t64([1.0, 1.0]), {}, make_ctx(names="ab"))
    assert torch.equal(w, t64([1.0, 1.0]))
    u.bind(["a", "b"])  # same tasks: the parameters (and their param group) are kept
    assert u.parameters() == params and all(a is b for a, b in zip(u.parameters(), params))
    with pytest.raises(ValueError, match="'q'"):
        UncertaintyWeighting({"q": "classification"}).bind(["a", "b"])


def test_uncertainty_learns_noise_levels():
    sigmas = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    u = UncertaintyWeighting()
    u.bind(["a", "b", "c"])
    opt = torch.optim.Adam(u.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    ctx = make_ctx()
    for _ in range(1500):
        residuals = sigmas[:, None] * torch.randn(3, 512, generator=gen, dtype=F64)
        losses = residuals.pow(2).mean(dim=1)  # E[L_i] = sigma_i^2
        opt.zero_grad()
        w, state = u.compute(losses, {}, ctx)
        u.backward(losses, w, state, ctx)
        opt.step()
    assert torch.allclose(u.sigma, sigmas, rtol=0.1, atol=0)


# --------------------------------------------------------------------------- dwa


def _dwa_reference(epoch_means: list, temperature: float, k: int) -> torch.Tensor:
    """lambda(t) for the epoch after ``epoch_means`` (a list of completed epoch means)."""
    if len(epoch_means) < 2:
        return torch.ones(k, dtype=F64)
    r = [epoch_means[-1][i] / epoch_means[-2][i] for i in range(k)]
    e = [math.exp((x - max(r)) / temperature) for x in r]
    return torch.tensor([k * x / sum(e) for x in e], dtype=F64)


def test_dwa_matches_closed_form_on_scripted_history():
    k, temperature = 3, 2.0
    gen = torch.Generator().manual_seed(1)
    steps_per_epoch = [4, 3, 5, 2, 6, 3]
    dwa = DynamicWeightAverage(temperature=temperature)
    state = dwa.init_state(k)
    completed: list = []
    for epoch, n in enumerate(steps_per_epoch):
        expected = _dwa_reference(completed, temperature, k)
        scale = t64([1.0, 0.5, 3.0]) * (0.8**epoch) * t64([1.0, 1.0 + 0.3 * epoch, 0.9])
        history = [scale * (1.0 + 0.2 * torch.rand(k, generator=gen, dtype=F64)) for _ in range(n)]
        for losses in history:
            w, state = dwa.compute(losses, state, make_ctx())
            assert torch.allclose(w, expected, rtol=1e-12, atol=0)
            assert w.sum().item() == pytest.approx(k, rel=1e-12)
            if epoch < 2:
                assert torch.equal(w, torch.ones(k, dtype=F64))
        completed.append([sum(float(h[i]) for h in history) / n for i in range(k)])
        state = round_trip(dwa.epoch_end(state))  # also: the state loads with weights_only
    assert int(state["epochs_done"]) == len(steps_per_epoch)


def test_dwa_steps_per_epoch_closes_automatically():
    k = 2
    gen = torch.Generator().manual_seed(2)
    history = [torch.rand(k, generator=gen, dtype=F64) + 0.1 for _ in range(12)]
    auto = DynamicWeightAverage(steps_per_epoch=3)
    manual = DynamicWeightAverage()
    s_auto, s_manual = auto.init_state(k), manual.init_state(k)
    for step, losses in enumerate(history):
        w_auto, s_auto = auto.compute(losses, s_auto, make_ctx(names="ab"))
        w_manual, s_manual = manual.compute(losses, s_manual, make_ctx(names="ab"))
        assert torch.equal(w_auto, w_manual)
        if step % 3 == 2:
            assert int(s_auto["epoch_count"]) == 0  # closed by itself
            s_manual = manual.epoch_end(s_manual)
            # an explicit epoch_end right after the automatic close is a no-op
            assert auto.epoch_end(s_auto) is s_auto
    assert int(s_auto["epochs_done"]) == 4
    assert all(torch.equal(s_auto[key], s_manual[key]) for key in s_auto)
    assert not torch.equal(w_auto, torch.ones(k, dtype=F64))


def test_dwa_is_functional_and_handles_empty_state():
    dwa = DynamicWeightAverage()
    state = dwa.init_state(2)
    before = {key: v.clone() for key, v in state.items()}
    _, new_state = dwa.compute(t64([1.0, 2.0]), state, make_ctx(names="ab"))
    assert all(torch.equal(state[key], before[key]) for key in state)  # input untouched
    assert int(new_state["epoch_count"]) == 1
    w, s2 = dwa.compute(t64([1.0, 2.0]), {}, make_ctx(names="ab"))  # no init_state given
    assert torch.equal(w, torch.ones(2, dtype=F64)) and int(s2["epoch_count"]) == 1


@PROPS
@given(
    means=st.lists(
        st.lists(st.floats(0.01, 100.0), min_size=3, max_size=3),
        min_size=2,
        max_size=2,
    ),
    temperature=st.floats(0.1, 10.0),
)
def test_dwa_weights_sum_to_k(means, temperature):
    dwa = DynamicWeightAverage(temperature=temperature)
    state = dwa.init_state(3)
    for m in means:
        _, state = dwa.compute(t64(m), state, make_ctx())
        state = dwa.epoch_end(state)
    w, _ = dwa.compute(t64([1.0, 1.0, 1.0]), state, make_ctx())
    assert w.sum().item() == pytest.approx(3.0, rel=1e-12)
    assert torch.allclose(w, _dwa_reference(means, temperature, 3), rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- htw


def test_htw_exact_schedule():
    htw = HTW("b", total_steps=100, warmup=0.1, alpha=0.5)  # W = 10 warm-up steps
    htw.bind(["a", "b", "c"])
    state = htw.init_state(3)
    first = t64([2.0, 5.0, 8.0])
    w, state = htw.compute(first, state, make_ctx(step=0))
    assert torch.allclose(w, t64([1.0, 0.1, 1.0]), rtol=1e-15, atol=0)
    assert torch.equal(state["initial_losses"], first)
    state = round_trip(state)
    for step in range(1, 15):
        losses = t64([2.0 / (step + 1), 5.0 * 0.9**step, 8.0 * 0.5**step])
        w, new_state = htw.compute(losses, state, make_ctx(step=step))
        assert new_state is state  # L(0) is stored once
        main = min(1.0, (step + 1) / 10)
        expected = t64([(losses[0] / 2.0).sqrt(), main, (losses[2] / 8.0).sqrt()])
        assert torch.allclose(w, expected, rtol=1e-14, atol=0)
    assert htw.main_weight(8) == pytest.approx(0.9) and htw.main_weight(9) == 1.0


def test_htw_alpha_and_no_warmup():
    htw = HTW(total_steps=7, warmup=0.0, alpha=2.0)
    w, state = htw.compute(t64([3.0, 4.0]), {}, make_ctx(names="xy"))
    assert torch.equal(w, t64([1.0, 1.0]))
    w, _ = htw.compute(t64([3.0, 1.0]), state, make_ctx(step=1, names="xy"))
    assert torch.allclose(w, t64([1.0, 1.0 / 16.0]), rtol=1e-15, atol=0)


def test_htw_checks_tasks_and_losses():
    with pytest.raises(ValueError, match="main_task"):
        HTW("z", total_steps=10).bind(["a", "b"])
    with pytest.raises(ValueError, match="main_task"):
        HTW(2, total_steps=10).bind(["a", "b"])
    with pytest.raises(ValueError, match="'b'"):
        HTW(total_steps=10).compute(t64([1.0, -1.0]), {}, make_ctx(names="ab"))
    htw = HTW(total_steps=10)
    _, state = htw.compute(t64([1.0, 1.0]), {}, make_ctx(names="ab"))
    with pytest.raises(ValueError, match="'b'"):
        htw.compute(t64([1.0, -1.0]), state, make_ctx(step=1, names="ab"))


# --------------------------------------------------------------------------- gradnorm


def _gradnorm_autograd(weights, unweighted_grads, losses, initial, alpha):
    """d/dw sum_i |G_i - target_i| by autograd, target held constant (the paper)."""
    w = weights.clone().requires_grad_(True)
    norms = torch.stack([torch.linalg.vector_norm(w[i] * g) for i, g in enumerate(unweighted_grads)])
    ratio = losses / initial
    rel = ratio / ratio.mean()
    target = (norms.mean() * rel.pow(alpha)).detach()
    (grad,) = torch.autograd.grad((norms - target).abs().sum(), w)
    return grad


def _weighted_gram(weights, grads):
    rows = torch.stack([w * g for w, g in zip(weights, grads)])
    return rows @ rows.T


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.5, 3.0])
def test_gradnorm_gradient_matches_autograd(alpha):
    k, p = 4, 37
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(k, p, generator=gen, dtype=F64) * t64([1.0, 10.0, 0.1, 3.0])[:, None]
    other_block = torch.randn(k, 5, generator=gen, dtype=F64)
    initial = t64([2.0, 1.0, 4.0, 0.5])
    losses = t64([1.0, 0.9, 1.0, 0.1])
    gn = GradNorm(alpha=alpha)
    gn.bind(list("abcd"))
    with torch.no_grad():
        for p, v in zip(gn.parameters(), [0.5, 1.5, 1.2, 0.8]):
            p.fill_(v)
    weights = gn.task_weights.detach().to(F64)
    gram = torch.stack([other_block @ other_block.T, _weighted_gram(weights, grads)])  # last = last layer
    ctx = make_ctx(names="abcd")
    w, state = gn.compute(initial, gn.init_state(k), ctx)  # first call stores L(0)
    assert torch.equal(w, weights) and torch.equal(state["initial_losses"], initial)
    gn.backward(losses, weights, round_trip(state), ctx, gram=gram)
    expected = _gradnorm_autograd(weights, grads, losses, initial, alpha)
    assert torch.allclose(_grads(gn).to(F64), expected, rtol=1e-6, atol=1e-6)
    assert _grads(gn).abs().sum() > 0


def test_gradnorm_first_step_uses_current_losses_as_initial():
    k = 3
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(k, 11, generator=gen, dtype=F64)
    weights = torch.ones(k, dtype=F64)
    losses = t64([3.0, 1.0, 0.2])
    gn = GradNorm()
    gn.bind(["a", "b", "c"])
    gn.backward(losses, weights, {}, make_ctx(), gram=_weighted_gram(weights, grads)[None])
    expected = _gradnorm_autograd(weights, grads, losses, losses, 1.5)  # r_i = 1
    assert torch.allclose(_grads(gn).to(F64), expected, rtol=1e-6, atol=1e-6)


def test_gradnorm_after_step_keeps_weights_positive_summing_to_k():
    gn = GradNorm(lr=0.025)
    gn.bind(list("abcd"))
    params = gn.parameters()
    assert gn.needs_gram and gn.lr == 0.025
    assert torch.equal(gn.task_weights, torch.ones(4))
    with torch.no_grad():
        for p, v in zip(params, [-0.3, 2.0, 5.0, 0.0]):
            p.fill_(v)
    gn._moved = [0, 1, 2, 3]  # what backward records: the weights this step moved
    gn.after_step()
    assert all(a is b for a, b in zip(gn.parameters(), params))  # renormalised in place
    w = gn.task_weights
    assert (w > 0).all()
    assert w.sum().item() == pytest.approx(4.0, rel=1e-6)
    w, _ = gn.compute(t64([1.0, 1.0, 1.0, 1.0]), {}, make_ctx(names="abcd"))
    assert w.dtype == F64 and not w.requires_grad
    assert torch.allclose(w, gn.task_weights.to(F64))


@PROPS
@given(raw=st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=8))
def test_gradnorm_renormalisation_property(raw):
    gn = GradNorm()
    gn.bind([str(i) for i in range(len(raw))])
    with torch.no_grad():
        for p, v in zip(gn.parameters(), raw):
            p.fill_(v)
    gn._moved = list(range(len(raw)))
    gn.after_step()
    w = gn.task_weights.detach().to(F64)
    assert (w > 0).all()
    assert w.sum().item() == pytest.approx(len(raw), rel=1e-5)


def test_gradnorm_needs_gram_and_non_negative_losses():
    gn = GradNorm()
    gn.bind(["a", "b"])
    with pytest.raises(ValueError, match="gram"):
        gn.backward(t64([1.0, 1.0]), t64([1.0, 1.0]), {}, make_ctx(names="ab"))
    with pytest.raises(ValueError, match="'a'"):
        gn.compute(t64([-1.0, 1.0]), {}, make_ctx(names="ab"))
