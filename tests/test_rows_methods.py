"""Properties of the row-based surgeries (graddrop, trimmed_mean, excess_mtl, db_mtl, moco).

Agreement with TorchJD / LibMTL is in ``test_anchor_rows.py``; here: each method's
defining property on drawn Jacobians, argument checks, and the optimizer contract
(weightings, preconditioning, granularity, accumulation, checkpoints that resume
bitwise, refusal of representation mode).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from faultkit import params_equal, round_trip, state_diff
from hypothesis import given
from hypothesis import strategies as st
from models import TrunkHeads, build
from torch import Tensor

from multitask_optim import AGGREGATORS, MultiTaskOptimizer
from multitask_optim.aggregators import (
    DBMTL,
    AggregationContext,
    ExcessMTL,
    GradDrop,
    MoCo,
    RowAggregator,
    TrimmedMean,
)

ROW_METHODS = ["graddrop", "trimmed_mean", "excess_mtl", "db_mtl", "moco"]


def gram_of(rows: List[Tensor]) -> Tensor:
    return torch.stack([r.double() @ r.double().T for r in rows])


def call(
    method: RowAggregator,
    rows: List[Tensor],
    state: Optional[Dict[str, Tensor]] = None,
    seed: int = 0,
    losses: Optional[Tensor] = None,
) -> Tuple[List[Tensor], Optional[Tensor], Dict[str, Tensor]]:
    k = rows[0].shape[0]
    state = method.init_state(k, len(rows)) if state is None else state
    values = torch.ones(k, dtype=torch.float64) if losses is None else losses
    ctx = AggregationContext(torch.Generator().manual_seed(seed), values, 0)
    return method.aggregate_rows(rows, gram_of(rows), state, ctx)


@st.composite
def jacobians(draw: st.DrawFn, min_k: int = 1, max_k: int = 8) -> Tensor:
    k = draw(st.integers(min_k, max_k))
    p = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-20, 1e-3, 1.0, 1e3, 1e20]))
    jac = torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    if draw(st.booleans()):
        jac[0] = 0.0  # a zero row
    if k > 1 and draw(st.booleans()):
        jac[1] = -jac[0]  # opposite rows
    return jac


# ---------------------------------------------------------------------- GradDrop
@given(jacobians(), st.integers(0, 1000))
def test_graddrop_keeps_one_sign_per_coordinate_as_the_draw_says(jac: Tensor, seed: int) -> None:
    (update,), coefs, _ = call(GradDrop(), [jac], seed=seed)
    assert coefs is None
    u = torch.rand(jac.shape[1], generator=torch.Generator().manual_seed(seed), dtype=jac.dtype)
    mass = jac.abs().sum(0)
    purity = torch.where(mass > 0, 0.5 * (1 + jac.sum(0) / mass.where(mass > 0, 1.0)), 0.5)
    positive, negative = jac.clamp_min(0).sum(0), jac.clamp_max(0).sum(0)
    expected = torch.where(purity > u, positive, torch.where(purity < u, negative, 0.0))
    torch.testing.assert_close(update, expected, rtol=1e-12, atol=0.0)
    assert bool(torch.isfinite(update).all())
    assert bool(((update >= 0) | (purity < u)).all()) and bool(((update <= 0) | (purity > u)).all())


def test_graddrop_picks_the_positive_sign_with_probability_the_sign_purity() -> None:
    # every coordinate: entries 3 and -1, purity 1/2 (1 + 2/4) = 0.75
    p = 40_000
    jac = torch.tensor([[3.0], [-1.0]]).repeat(1, p)
    jac = jac[:, torch.randperm(p, generator=torch.Generator().manual_seed(1))]
    (update,), _, _ = call(GradDrop(), [jac], seed=5)
    assert set(update.unique().tolist()) <= {3.0, -1.0}
    frequency = float((update > 0).double().mean())
    assert abs(frequency - 0.75) < 0.01, frequency


def test_graddrop_leak_lets_rows_through() -> None:
    jac = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    (full,), _, _ = call(GradDrop(leak=1.0), [jac], seed=2)
    torch.testing.assert_close(full, jac.sum(0))
    (half,), _, _ = call(GradDrop(leak=[0.0, 1.0, 0.0]), [jac], seed=2)
    (none,), _, _ = call(GradDrop(), [jac], seed=2)
    u = torch.rand(50, generator=torch.Generator().manual_seed(2))
    purity = 0.5 * (1 + jac.sum(0) / jac.abs().sum(0))
    kept1 = ((purity > u) & (jac[1] > 0)) | ((purity < u) & (jac[1] < 0))
    torch.testing.assert_close(half - none, torch.where(kept1, 0.0, jac[1]))
    with pytest.raises(ValueError, match="leak has 3 values but there are 2 tasks"):
        call(GradDrop(leak=[0.0, 1.0, 0.0]), [jac[:2]])


def test_graddrop_draws_only_from_the_optimizer_generator() -> None:
    before = torch.get_rng_state()
    jac = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    call(GradDrop(), [jac, jac[:, :7]], seed=3)
    assert torch.equal(before, torch.get_rng_state())


# ---------------------------------------------------------------------- trimmed mean
@given(jacobians(min_k=1, max_k=9), st.integers(0, 4))
def test_trimmed_mean_is_the_coordinatewise_trimmed_mean(jac: Tensor, trim: int) -> None:
    k = jac.shape[0]
    if k < 2 * trim + 1:
        with pytest.raises(ValueError, match=f"trim_number={trim} needs at least {2 * trim + 1} tasks"):
            call(TrimmedMean(trim), [jac])
        return
    (update,), coefs, _ = call(TrimmedMean(trim), [jac])
    assert coefs is None
    columns = jac.T.tolist()
    expected = [sum(sorted(c)[trim : k - trim]) / (k - 2 * trim) for c in columns]
    # a column's kept entries may cancel: its rounding is relative to the entries, not the mean
    atol = 1e-12 * float(jac.abs().max())
    torch.testing.assert_close(update, torch.tensor(expected, dtype=jac.dtype), rtol=1e-12, atol=atol)


def test_trimmed_mean_ignores_outlying_tasks() -> None:
    jac = torch.randn(5, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bad = jac.clone()
    bad[2] = 1e30  # one task far off in every coordinate
    (clean,), _, _ = call(TrimmedMean(1), [jac[[0, 1, 3, 4]]])
    (robust,), _, _ = call(TrimmedMean(1), [bad])
    assert float(robust.abs().max()) < 10.0
    assert float((robust - clean).abs().max()) < float(jac.abs().max())


# ---------------------------------------------------------------------- ExcessMTL
def test_excess_mtl_weights_sum_to_k_and_favour_the_task_far_from_convergence() -> None:
    method = ExcessMTL(robust_step_size=0.5, n_warmup_steps=2)
    g = torch.Generator().manual_seed(0)
    state = None
    for step in range(6):
        jac = torch.randn(3, 40, generator=g, dtype=torch.float64)
        jac[0] *= 1.0 + step  # task 0's gradients keep growing: far from convergence
        (update,), coefs, state = call(method, [jac], state)
        assert coefs is not None
        torch.testing.assert_close(update, coefs[0] @ jac)
        assert abs(float(coefs.sum()) - 3.0) < 1e-12 and bool((coefs > 0).all())
        if step < 2:
            torch.testing.assert_close(coefs, torch.ones(1, 3, dtype=torch.float64))
    assert int(coefs.argmax()) == 0


def test_excess_mtl_keeps_per_block_accumulators() -> None:
    jac = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    _, coefs, state = call(ExcessMTL(), [jac[:, :4], jac[:, 4:]])
    assert coefs is not None and coefs.shape == (2, 2)
    assert state["root.0"].shape == (2, 4) and state["root.1"].shape == (2, 6)
    torch.testing.assert_close(state["root.1"], jac[:, 4:].abs())


# ---------------------------------------------------------------------- DB-MTL
@given(jacobians(min_k=2, max_k=6), st.integers(0, 1000))
def test_db_mtl_scaled_emas_have_equal_norms(jac: Tensor, seed: int) -> None:
    method = DBMTL(beta=0.5)
    g = torch.Generator().manual_seed(seed)
    losses = 0.1 + torch.rand(jac.shape[0], generator=g, dtype=torch.float64)
    (first,), _, state = call(method, [jac], losses=losses)
    second_jac = jac * (1 + torch.rand(jac.shape, generator=g, dtype=jac.dtype))
    (update,), coefs, state = call(method, [second_jac], state, losses=losses)
    assert coefs is None and int(state["steps"]) == 2
    ema = state["ema.0"]
    torch.testing.assert_close(ema, 0.5 * (0.5 * jac + second_jac) / (losses + 1e-8).unsqueeze(1))
    norms = ema.norm(dim=1)
    scaled = torch.where(norms > 0, norms.max() / norms, 0.0).unsqueeze(1) * ema
    torch.testing.assert_close(update, scaled.sum(0), rtol=1e-12, atol=1e-12 * float(scaled.abs().max()))
    scaled_norms = scaled.norm(dim=1)[norms > 0]
    torch.testing.assert_close(
        scaled_norms, torch.full_like(scaled_norms, float(norms.max())), rtol=1e-12, atol=0
    )


def test_db_mtl_is_blind_to_loss_scales() -> None:
    jac = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    losses = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    scale = torch.tensor([1e4, 1.0, 1e-3], dtype=torch.float64)
    (a,), _, _ = call(DBMTL(), [jac], losses=losses)
    (b,), _, _ = call(DBMTL(), [jac * scale.unsqueeze(1)], losses=losses * scale)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_db_mtl_refuses_a_negative_loss() -> None:
    jac = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"position\(s\) \[1\]"):
        call(DBMTL(), [jac], losses=torch.tensor([1.0, -0.5], dtype=torch.float64))


# ---------------------------------------------------------------------- MoCo
def test_moco_tracks_normalised_gradients_and_keeps_lambda_on_the_simplex() -> None:
    method = MoCo()
    g = torch.Generator().manual_seed(0)
    state, y = None, torch.zeros(3, 20, dtype=torch.float64)
    for step in range(1, 5):
        jac = torch.randn(3, 20, generator=g, dtype=torch.float64)
        losses = 0.5 + torch.rand(3, generator=g, dtype=torch.float64)
        (update,), coefs, state = call(method, [jac], state, losses=losses)
        target = jac / (jac.norm(dim=1, keepdim=True) + 1e-8) * losses.unsqueeze(1)
        y = y - 0.5 / step**0.5 * (y - target)
        torch.testing.assert_close(state["y.0"], y)
        lam = state["lambda"][0]
        assert abs(float(lam.sum()) - 1.0) < 1e-12 and bool((lam > 0).all())
        torch.testing.assert_close(update, lam @ y)
        assert coefs is None


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (GradDrop, {"leak": 1.5}, "leak"),
        (GradDrop, {"leak": [0.1, -0.1]}, "leak"),
        (TrimmedMean, {"trim_number": -1}, "trim_number"),
        (TrimmedMean, {"trim_number": 1.5}, "trim_number"),
        (ExcessMTL, {"robust_step_size": 0.0}, "robust_step_size"),
        (ExcessMTL, {"n_warmup_steps": -2}, "n_warmup_steps"),
        (DBMTL, {"beta": 1.0}, "beta"),
        (DBMTL, {"beta_sigma": -1.0}, "beta_sigma"),
        (MoCo, {"beta": 0.0}, "beta"),
        (MoCo, {"gamma": -0.1}, "gamma"),
        (MoCo, {"rho": float("nan")}, "rho"),
        (MoCo, {"gamma_sigma": "x"}, "gamma_sigma"),
    ],
)
def test_bad_hyper_parameters_are_refused_by_name(cls: type, kwargs: Dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


@pytest.mark.parametrize("name", ROW_METHODS)
def test_built_by_name_with_defaults_and_report_settings(name: str) -> None:
    method = AGGREGATORS.build(name)
    assert isinstance(method, RowAggregator) and method.needs_jacobian
    assert repr(method).startswith(type(method).__name__ + "(")
    assert method.settings()


# ---------------------------------------------------------------------- through the optimizer
def model3() -> TrunkHeads:
    return build(TrunkHeads, seed=4, out_dims=(2, 3, 1))


def make(model: TrunkHeads, name: str, seed: int = 0, **kw: Any) -> MultiTaskOptimizer:
    return MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), surgery=name, seed=seed, **kw)


def train(model: TrunkHeads, opt: MultiTaskOptimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        opt.step(model.losses(model.batch(step)))


@pytest.mark.parametrize("name", ROW_METHODS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"granularity": "tensor", "precondition": "adam"},
        {"weighting": "static", "weighting_kwargs": {"weights": [0.5, 2.0, 1.0]}},
    ],
    ids=["plain", "tensor+adam", "static"],
)
def test_a_checkpoint_mid_run_resumes_bitwise(name: str, options: Dict[str, Any]) -> None:
    model = model3()
    opt = make(model, name, **options)
    train(model, opt, range(3))
    saved = round_trip(opt.state_dict())
    states = saved["multitask"]["states"]["surgery"]
    if name in ("excess_mtl", "db_mtl", "moco"):
        assert int(states["steps"]) == 3 and any("." in key for key in states)
    copy = model3()
    copy.load_state_dict(model.state_dict())
    resumed = make(copy, name, seed=99, **options)
    resumed.load_state_dict(saved)
    train(model, opt, range(3, 6))
    train(copy, resumed, range(3, 6))
    assert params_equal(list(model.parameters()), list(copy.parameters()))
    assert state_diff(opt.state_dict(), resumed.state_dict()) is None
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("name", ROW_METHODS)
def test_accumulated_micro_batches_equal_one_step(name: str) -> None:
    a, b = model3(), model3()
    whole, parts = make(a, name), make(b, name)
    for step in range(2):
        x, targets = a.batch(step)
        whole.zero_grad()
        whole.step(a.losses((x, targets)))
        parts.zero_grad()
        for half in (slice(0, 8), slice(8, 16)):
            parts.accumulate([loss / 2 for loss in b.losses((x[half], [t[half] for t in targets]))])
        parts.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ROW_METHODS)
def test_representation_mode_is_refused_with_a_clear_error(name: str) -> None:
    model = model3()
    opt = make(model, name)
    x, targets = model.batch(0)
    z = model.trunk(x)
    losses = [torch.nn.functional.mse_loss(h(z), t) for h, t in zip(model.heads, targets)]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"surgery '{name}' reads the Jacobian's rows.*representation"):
        opt.step(losses, representation=z)
    assert params_equal(before, list(model.parameters()))


def test_excess_mtl_task_with_a_zero_first_gradient_takes_a_later_baseline() -> None:
    """A zero gradient on the baseline step (a zero-initialised head) leaves that task's
    baseline 0: its first non-zero excess risk becomes its baseline and the weights stay
    finite and spread, instead of NaN (dividing by 0) or one-hot (dividing by a floor)."""
    method = ExcessMTL(robust_step_size=0.5)
    g = torch.Generator().manual_seed(1)
    state = None
    for step in range(5):
        jac = torch.randn(2, 30, generator=g, dtype=torch.float64)
        if step == 0:
            jac[1] = 0.0
        _, coefs, state = call(method, [jac], state)
        assert coefs is not None and bool(torch.isfinite(coefs).all())
        # Step 0 measures (task 1's baseline stays 0); step 1 sets it and pushes task 0 only.
        assert (float(state["baseline"][0, 1]) > 0.0) == (step >= 1)
        assert float(coefs.min()) > 0.3, (step, coefs)
