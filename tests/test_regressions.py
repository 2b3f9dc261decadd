"""Regression tests, each written to fail on one specific, plausible bug.

- a: the per-task preconditioner's accumulators survive a step skipped for a
  non-finite *aggregation* (not only for a non-finite gradient);
- b: GradVac's ``1 - phi_hat^2`` is clamped when a target reaches exactly 1;
- c: ``step`` adds to a ``.grad`` the user filled before (as ``backward`` would);
- d: the Gram's float64 fallback triggers below ``tiny / eps``, not only below ``tiny``;
- e: the aggregator reads the *weighted* losses (MGDA ``normalization="loss"``).

(See the project design (DESIGN.md, shared with the developers), sections 2 and 3.)
"""

from __future__ import annotations

import warnings
from typing import Dict, List

import pytest
import torch
from faultkit import clone_state, state_diff
from models import TrunkHeads, build, snapshot, twin
from torch import Tensor

from multitask_optim import AggregationContext, Aggregator, MultiTaskOptimizer
from multitask_optim._gram import dense_grams
from multitask_optim.aggregators.gradvac import GradVac
from multitask_optim.aggregators.mgda import MGDA


# ---------------------------------------------------------------------- a
class NanOnDemand(Aggregator):
    """Plain sum, or NaN coefficients while ``poisoned`` is set (an unregistered instance)."""

    name = "nan-on-demand"

    def __init__(self) -> None:
        self.poisoned = False

    def aggregate(self, gram: Tensor, state, ctx: AggregationContext):
        coefs = torch.ones(gram.shape[0], gram.shape[1], dtype=torch.float64)
        return (coefs * float("nan") if self.poisoned else coefs), state


def test_preconditioner_state_kept_on_a_step_skipped_for_a_non_finite_aggregation() -> None:
    model = build(TrunkHeads, seed=1)
    surgery = NanOnDemand()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), surgery=surgery, precondition="adagrad"
    )
    for step in range(2):
        opt.zero_grad()
        opt.step(model.losses(model.batch(step)))
    before = clone_state(opt.state_dict())
    params = snapshot(model)
    assert before["multitask"]["states"]["precondition"], "no accumulator to check"
    surgery.poisoned = True
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(model.losses(model.batch(2)))
    assert opt.last_stats.get("skipped_step"), "a NaN aggregation must skip the step"
    after = opt.state_dict()
    found = state_diff(
        after["multitask"]["states"]["precondition"], before["multitask"]["states"]["precondition"]
    )
    assert found is None, f"precondition state changed on a skipped step: {found}"
    assert state_diff(after, before, ignore=("/multitask/skipped",)) is None  # but the skip count
    assert all(torch.equal(p, q) for p, q in zip(snapshot(model), params))


# ---------------------------------------------------------------------- b
def _gram(rows: Tensor, blocks: int) -> Tensor:
    return (rows @ rows.T).unsqueeze(0).expand(blocks, -1, -1).contiguous()


def test_gradvac_target_of_exactly_one_stays_finite() -> None:
    """beta = 1 and identical task gradients drive phi_hat to exactly 1; a later
    conflicting step divides by ``sqrt(1 - phi_hat^2)``: it must be clamped. Checked on
    the scalar path (few blocks) and the vectorised one (many blocks)."""
    agg = GradVac(beta=1.0)
    for blocks, k in ((1, 2), (1, 3), (20, 4)):
        identical = torch.zeros(k, 3, dtype=torch.float64)
        identical[:, 0] = 2.0  # norms are powers of two: cos = 1 exactly
        state = agg.init_state(k, blocks)
        ctx = AggregationContext(torch.Generator().manual_seed(0), torch.ones(k, dtype=torch.float64))
        _, state = agg(_gram(identical, blocks), state, ctx)
        off = ~torch.eye(k, dtype=torch.bool)
        assert bool((state["targets"][:, off] == 1.0).all()), "the targets did not reach exactly 1"
        conflicting = torch.zeros(k, 3, dtype=torch.float64)
        conflicting[0, 0], conflicting[1, 0] = 2.0, -2.0
        conflicting[1:, 1] = 2.0
        coefs, new_state = agg(_gram(conflicting, blocks), state, ctx)
        assert bool(torch.isfinite(coefs).all()), f"B={blocks}, K={k}: coefficients {coefs.tolist()}"
        assert bool(torch.isfinite(new_state["targets"]).all())


# ---------------------------------------------------------------------- c
def test_step_adds_to_a_grad_the_user_filled() -> None:
    model = build(TrunkHeads, seed=4)
    other = twin(model)
    batch = model.batch(0)
    user: Dict[int, Tensor] = {}
    g = torch.Generator().manual_seed(9)
    for n, p in enumerate(model.parameters()):
        user[n] = torch.randn(p.shape, generator=g)
        p.grad = user[n].clone()
    lr = 0.1
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=lr), surgery="pcgrad", seed=0)
    ours = MultiTaskOptimizer(torch.optim.SGD(other.parameters(), lr=lr), surgery="pcgrad", seed=0)
    before = snapshot(model)
    opt.step(model.losses(batch))  # no zero_grad: the user's .grad stays
    ours.zero_grad()
    ours.step(other.losses(batch))
    for n, (p, q, b) in enumerate(zip(model.parameters(), other.parameters(), before)):
        want_grad = user[n] + q.grad
        torch.testing.assert_close(p.grad, want_grad, rtol=1e-6, atol=1e-7, msg=f"parameter #{n}: .grad")
        torch.testing.assert_close(
            b - p.detach(), lr * want_grad, rtol=1e-5, atol=1e-6, msg=f"parameter #{n}"
        )


# ---------------------------------------------------------------------- d
def test_gram_fallback_below_tiny_over_eps() -> None:
    """float32 rows with entries near 1e-21: the squared norms (~5e-38) are above
    float32's ``tiny`` but below ``tiny / eps``, so the products are subnormal and the
    float32 Gram loses precision; the fallback must recompute it in float64."""
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(3, 50_000, generator=g, dtype=torch.float64) * 1e-21).float()
    info = torch.finfo(torch.float32)
    want = rows.double() @ rows.double().T
    assert bool((want.diagonal() > info.tiny).all() & (want.diagonal() < info.tiny / info.eps).all())
    got = dense_grams([rows], [[0]], 3)[0]
    norms = want.diagonal().sqrt()
    rel = ((got - want).abs() / (norms.view(-1, 1) * norms.view(1, -1))).max()
    assert float(rel) <= 1e-6, f"Gram off by {float(rel):.2e} relative (float32 kept)"


# ---------------------------------------------------------------------- e
def _shared_jacobian(model: TrunkHeads, losses: List[Tensor]) -> Tensor:
    shared = list(model.trunk.parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True)
        rows.append(torch.cat([gr.reshape(-1) for gr in grads]))
    return torch.stack(rows).double()


def test_aggregator_reads_the_weighted_losses() -> None:
    model = build(TrunkHeads, seed=5, dtype=torch.float64)
    weights = [1.0, 6.0]
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01),
        surgery="mgda",
        surgery_kwargs={"normalization": "loss"},
        weighting="static",
        weighting_kwargs={"weights": weights},
        seed=0,
    )
    losses = model.losses(model.batch(0))
    jac = _shared_jacobian(model, losses)
    values = torch.tensor([float(v.detach()) for v in losses], dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    weighted_jac = w.view(-1, 1) * jac
    gram = (weighted_jac @ weighted_jac.T).unsqueeze(0)
    ctx = AggregationContext(torch.Generator().manual_seed(0), values * w)
    want, _ = MGDA(normalization="loss")(gram, {}, ctx)
    wrong, _ = MGDA(normalization="loss")(gram, {}, AggregationContext(ctx.generator, values))
    assert not torch.allclose(want, wrong, rtol=1e-3), "the test cannot tell weighted from unweighted losses"
    opt.zero_grad()
    opt.step(losses)
    got = torch.tensor(opt.last_stats["block_coefficients"], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_dense_grams_of_an_empty_shard_are_zero() -> None:
    """Under FSDP2 a rank's shard of a block can be empty: its partial Gram is 0 (no IndexError)."""
    from multitask_optim._gram import dense_grams

    out = dense_grams([torch.zeros(2, 0), torch.zeros(2, 0, 3)], [[0, 1]], 2)
    assert torch.equal(out, torch.zeros(1, 2, 2, dtype=torch.float64))


def test_krum_ignores_the_rounding_asymmetry_of_a_gram() -> None:
    """Krum reads distances from the Gram; a Gram that rounding left a hair asymmetric
    must select what its symmetric part selects (ties are broken the same way)."""
    from multitask_optim import AGGREGATORS
    from multitask_optim.aggregators import AggregationContext

    krum = AGGREGATORS.build("krum", {})
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    gram = (rows @ rows.T).unsqueeze(0)  # tasks 0 and 1 tie exactly
    ctx = AggregationContext(torch.Generator().manual_seed(0), torch.ones(3, dtype=torch.float64), 0)
    want, _ = krum(gram, {}, ctx)
    for eps in (1e-15, -1e-15):
        skewed = gram.clone()
        skewed[0, 0, 2] += eps
        skewed[0, 2, 0] -= eps
        got, _ = krum(skewed, {}, ctx)
        assert torch.equal(got, want)


def test_nash_mtl_solves_an_ill_conditioned_gram_the_same_way_twice() -> None:
    """Found by the stateful fault machine: after a 1e20 spike the Newton Hessian of the
    bargaining problem was not numerically positive definite and the solver fell back to
    ``torch.linalg.lstsq``, whose CPU solution of the same ill-conditioned system changes
    from one call to the next, so a run restored from a checkpoint parted from the
    original. The fallback is now a damped Cholesky factor: deterministic."""
    from multitask_optim.aggregators.nash_mtl import NashMTL

    g = torch.tensor(
        [
            [2.5078662307973444e36, -5.161987619579494e16, -5.135636363130962e17, -1.7348998124168806e17],
            [-5.161987619579494e16, 0.0011887034634128213, 0.010422686114907265, 0.003501299535855651],
            [-5.135636363130962e17, 0.010422686114907265, 0.10534190386533737, 0.03560923412442207],
            [-1.7348998124168806e17, 0.003501299535855651, 0.03560923412442207, 0.012040216475725174],
        ],
        dtype=torch.float64,
    )
    prev = torch.tensor(
        [234735.40246163434, 156629.64478482457, 13476.7095073712, 275118.0620037953], dtype=torch.float64
    )
    solver = NashMTL()
    first = solver._solve(g, prev)
    assert bool(torch.isfinite(first).all()) and bool((first > 0).all())
    for _ in range(4):
        assert torch.equal(solver._solve(g, prev), first)


@pytest.mark.parametrize("factored", [False, True])
def test_a_coefficient_below_float32_normal_range_keeps_its_precision(factored: bool) -> None:
    """Found by the stateful fault machine (GLS weights after a 1e30 spike, MGDA): a
    coefficient of 1.5e-45 next to one of 2e-15 cast to float32 rounds to the smallest
    subnormal (7% off), and times a 1e29 gradient that is a 3% error of the update. Such
    blocks are combined in float64."""
    from multitask_optim._factors import LinearFactor
    from multitask_optim._gradients import TaskGradients

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g)
    deltas = torch.randn(2, 5, 4, generator=g)
    deltas[0] *= 1e29
    coefs = torch.tensor([[1.5e-45, 2e-15]], dtype=torch.float64)
    factor = LinearFactor(0, None, x, deltas)
    if factored:
        grads = TaskGradients([None], [[], []], [factor])
    else:
        grads = TaskGradients([factor.rows()[0]], [[], []])
    (update,), finite = grads.combine([[0]], coefs)
    want = torch.einsum("k,kno,ni->oi", coefs[0], deltas.double(), x.double())
    assert finite
    torch.testing.assert_close(update.double(), want, rtol=1e-6, atol=0.0)
