"""Regression tests for the six fault causes of issue 13 (one smallest reproducer each).

1. Representation mode writes non-finite task gradients into ``.grad``.
2. One gradient spike makes a per-task ``rmsprop``/``adam`` accumulator inf for good.
3. Representation mode skips a finite step (float64 Gram checked in float32).
4. A skipped or refused first step leaves a trace (weighting set up, gradient mode fixed).
5. Uncertainty's ``objective`` becomes inf once a weight underflows to 0.
6. A task weight below ~1e-38 applied to float32 rows loses precision (MGDA ``l2``).
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from faultkit import representation_step, round_trip, state_diff
from models import TrunkHeads, build, snapshot
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer
from multitask_optim.aggregators import AggregationContext, get_aggregator


def _inf_input_batch(model: TrunkHeads, step: int = 0) -> Tuple[Tensor, List[Tensor]]:
    """A batch of ``model`` with one input entry set to +inf.

    The trunk's first layer maps it to +-inf, ``tanh`` saturates, so every loss is
    finite, but the first layer's weight gradient is ``0 * inf = NaN``.
    """
    x, targets = model.batch(step)
    x = x.clone()
    x[0, 0] = float("inf")
    return x, targets


def _losses_and_z(model: TrunkHeads, batch: Tuple[Tensor, List[Tensor]]) -> Tuple[List[Tensor], Tensor]:
    x, targets = batch
    z = model.trunk(x)
    return [F.mse_loss(head(z), t) for head, t in zip(model.heads, targets)], z


# ---------------------------------------------------------------------- cause 1
def test_representation_mode_skips_non_finite_task_gradients() -> None:
    """Cause 1: K = 1, an inf in the input: the loss is finite, the task's own gradient
    (here the whole network: with one task every parameter is the task's) is NaN.
    Parameter mode skips this step; representation mode must skip it too."""
    model = build(TrunkHeads, seed=0, out_dims=(2,))
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery="pcgrad", seed=0)
    losses, z = _losses_and_z(model, _inf_input_batch(model))
    assert all(bool(torch.isfinite(loss)) for loss in losses)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        representation_step(opt, losses, z)
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    assert not bad, f"representation mode took a step with a non-finite task gradient: {bad} are not finite"
    assert opt.last_stats.get("skipped") == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_parameter_mode_skips_the_same_input() -> None:
    """The reference behaviour cause 1 is measured against (passes today)."""
    model = build(TrunkHeads, seed=0, out_dims=(2,))
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery="pcgrad", seed=0)
    losses, _ = _losses_and_z(model, _inf_input_batch(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(losses)
    assert opt.last_stats.get("skipped") == 1


# ---------------------------------------------------------------------- cause 2
@pytest.mark.parametrize("kind", ["rmsprop", "adam"])
def test_gradient_spike_does_not_stop_training(kind: str) -> None:
    """Cause 2: a finite loss spike (x1e25) gives shared gradients whose square overflows
    float32. Acceptable: that step is skipped, or taken with finite parameters and
    state; either way the next ordinary step (losses ~1) is taken. (Inner Adam, so that
    the spike's own update stays ~lr and the next losses are ordinary.)"""
    model = build(TrunkHeads, seed=0)
    opt = MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-3), surgery="pcgrad", precondition=kind, seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = model.losses(model.batch(0))
        opt.zero_grad()
        opt.step([losses[0] * 1e25, losses[1]])
        spike_skipped = bool(opt.last_stats.get("skipped_step", False))
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        for step in range(1, 4):
            opt.zero_grad()
            opt.step(model.losses(model.batch(step)))
            assert not opt.last_stats.get("skipped_step", False), (
                f"ordinary step {step} after one spike was skipped "
                f"(spike step skipped: {spike_skipped}; last_stats={opt.last_stats})"
            )
    bad = [
        key
        for key, value in opt.state_dict()["multitask"]["states"]["precondition"].items()
        if not bool(torch.isfinite(value).all())
    ]
    assert not bad, f"the spike left non-finite accumulators {bad}"


# ---------------------------------------------------------------------- cause 3
def test_representation_mode_takes_a_finite_step_with_a_large_gram() -> None:
    """Cause 3: a x1e22 loss makes feature-gradient entries ~1e20 (finite in float32)
    and Gram entries above 3.4e38 (finite in float64). Parameter mode takes this
    step; representation mode must take it too, with finite parameters."""
    model = build(TrunkHeads, seed=0)
    opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), surgery="pcgrad", seed=0)
    reference = build(TrunkHeads, seed=0)
    ref_opt = MultiTaskOptimizer(torch.optim.Adam(reference.parameters(), lr=1e-3), surgery="pcgrad", seed=0)
    ref_losses = reference.losses(reference.batch(0))
    ref_opt.step([ref_losses[0] * 1e22, ref_losses[1]])
    assert not ref_opt.last_stats.get("skipped_step", False)  # parameter mode takes it

    losses, z = _losses_and_z(model, model.batch(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        representation_step(opt, [losses[0] * 1e22, losses[1]], z)
    assert not opt.last_stats.get("skipped_step", False), (
        f"representation mode skipped a finite step: {opt.last_stats}"
    )
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------- cause 4
def _nan_gradient_first_step(weighting: str) -> Tuple[MultiTaskOptimizer, MultiTaskOptimizer, TrunkHeads]:
    model = build(TrunkHeads, seed=0)
    fresh_model = build(TrunkHeads, seed=0)

    def make(m: nn.Module) -> MultiTaskOptimizer:
        return MultiTaskOptimizer(
            torch.optim.Adam(m.parameters(), lr=1e-3), surgery="pcgrad", weighting=weighting, seed=0
        )

    opt, fresh = make(model), make(fresh_model)
    return opt, fresh, model


def _assert_no_trace(opt: MultiTaskOptimizer, fresh: MultiTaskOptimizer, model: nn.Module) -> None:
    state = opt.state_dict()
    diff = state_diff(state, fresh.state_dict(), ignore=("/multitask/skipped",))
    assert diff is None, f"a skipped/refused first step left a trace in state_dict: {diff}"
    other = MultiTaskOptimizer(
        torch.optim.Adam(build(TrunkHeads, seed=0).parameters(), lr=1e-3),
        surgery="pcgrad",
        weighting=opt.weighting.name,
        seed=1,
    )
    other.load_state_dict(round_trip(state))


@pytest.mark.parametrize("weighting", ["uncertainty", "gradnorm"])
def test_skipped_first_step_leaves_no_trace(weighting: str) -> None:
    """Cause 4: no ``task_names=`` / ``num_tasks=``; the first step has finite losses
    but a NaN gradient and is skipped. The state dict must equal a fresh optimizer's
    (but for the skip counter) and load into a fresh optimizer."""
    opt, fresh, model = _nan_gradient_first_step(weighting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(model.losses(_inf_input_batch(model)))  # type: ignore[arg-type]
    assert opt.last_stats.get("skipped_step", False)
    _assert_no_trace(opt, fresh, model)


def test_refused_first_step_leaves_no_trace() -> None:
    """Cause 4: GradNorm refuses a negative first loss with a ``ValueError``; the
    refused call must change nothing (state dict bitwise equal to a fresh one)."""
    opt, fresh, model = _nan_gradient_first_step("gradnorm")
    losses = model.losses(model.batch(0))
    with pytest.raises(ValueError, match="negative"):
        opt.step([losses[0] * 0.0 - 1.0, losses[1]])
    _assert_no_trace(opt, fresh, model)


def test_skipped_first_step_does_not_fix_the_gradient_mode() -> None:
    """Cause 4 (second half): a skipped first step must not record ``gradient_mode``."""
    model = build(TrunkHeads, seed=0)
    opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), surgery="pcgrad", seed=0)
    fresh = MultiTaskOptimizer(
        torch.optim.Adam(build(TrunkHeads, seed=0).parameters(), lr=1e-3), surgery="pcgrad", seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(model.losses(_inf_input_batch(model)))  # type: ignore[arg-type]
    assert opt.last_stats.get("skipped_step", False)
    diff = state_diff(opt.state_dict(), fresh.state_dict(), ignore=("/multitask/skipped",))
    assert diff is None, f"a skipped first step left a trace in state_dict: {diff}"


# ---------------------------------------------------------------------- cause 5
def test_uncertainty_objective_stays_finite_when_a_weight_underflows() -> None:
    """Cause 5: s moves past ~745 (one large loss, SGD on s with lr 1), so the next
    weight 1/2 exp(-s) is exactly 0 in float64; ``objective`` must read s itself."""
    model = build(TrunkHeads, seed=0)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        surgery=None,
        weighting="uncertainty",
        weighting_kwargs={"lr": 1.0},
        num_tasks=2,
        seed=0,
    )
    losses = model.losses(model.batch(0))
    opt.step([losses[0] * (2000.0 / float(losses[0].detach())), losses[1]])  # s_0 <- 0 - (1/2 - 1000) = 999.5
    assert opt.weighting.log_var is not None and float(opt.weighting.log_var[0]) > 745
    opt.step(model.losses(model.batch(1)))
    assert opt.last_stats["weights"][0] == 0.0  # the weight underflowed (the premise)
    objective = opt.last_stats["objective"]
    s = opt.weighting.log_var.detach().double()
    assert torch.isfinite(torch.tensor(objective)), f"objective is {objective} with s = {s.tolist()}"


# ---------------------------------------------------------------------- cause 6
@pytest.mark.parametrize("gradient_mode", ["auto", "looped"])
def test_tiny_weight_keeps_precision(gradient_mode: str) -> None:
    """Cause 6: a static weight 1e-41 on task 0; MGDA with ``normalization="l2"`` scales
    its row back up. The update must match the same step computed in float64 (the
    per-task float32 gradients cast to float64, weighted and combined there)."""
    model = build(TrunkHeads, seed=0)
    weights = [1e-41, 1.0]
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        shared=model.trunk.parameters(),
        tasks=[list(h.parameters()) for h in model.heads],
        surgery="mgda",
        surgery_kwargs={"normalization": "l2"},
        weighting="static",
        weighting_kwargs={"weights": weights},
        gradient_mode=gradient_mode,
        seed=0,
    )
    shared = list(model.trunk.parameters())
    losses = model.losses(model.batch(0))
    rows = [
        [g.double() for g in torch.autograd.grad(loss, shared, retain_graph=True)] for loss in losses
    ]  # unweighted float32 gradients, exact in float64
    weighted = [[w * g for g in row] for w, row in zip(weights, rows)]
    flat = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in weighted])
    ctx = AggregationContext(
        torch.Generator().manual_seed(0), torch.tensor([float(v.detach()) for v in losses])
    )
    coefs = get_aggregator("mgda", normalization="l2")(flat @ flat.T, {}, ctx)[0]
    expected = [sum(float(c) * row[n] for c, row in zip(coefs, weighted)) for n in range(len(shared))]
    before = [p.detach().double().clone() for p in shared]
    opt.step(losses)
    for n, (p, b, e) in enumerate(zip(shared, before, expected)):
        update = b - p.detach().double()
        rel = float((update - e).norm() / e.norm())
        assert rel < 1e-5, f"shared tensor {n}: update off by {rel:.2e} relative to the float64 step"
