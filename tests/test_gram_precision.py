"""Rank-deficient and rounding-noisy Grams give bounded, correct coefficients for every
Gram-based surgery (issue 19, item 7a).

A randomized run found FairGrad and Nash-MTL giving coefficients of 1e18 to 1e104 on a
3-element bias with 4 tasks under ``granularity="tensor"``: the float32 Gram carried
eigenvalues of about -1e-8 where the exact ones are 0, below the solvers' 1e-10 ridge.
Now small blocks are formed in float64, large ones from float32 products over chunks
summed in float64, every surgery is told how accurate each block's Gram is
(``ctx.rounding``), and the Gram solvers set what that rounding cannot resolve to zero.
The property: on float32 Jacobians that are rank-deficient in the data (fewer elements
than tasks, duplicated rows, rows that are exact multiples of others, zero rows), the
update from the optimizer's own Gram path is close to the update the same method gives
on the float64 Gram of the same rows (at the same row precision, ``ctx.rounding``).
"""

from __future__ import annotations

import math
from typing import List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples
from torch import Tensor

from multitask_optim import AGGREGATORS, MultiTaskOptimizer
from multitask_optim._gram import dense_grams, gram_rounding
from multitask_optim.aggregators import AggregationContext

#: Every surgery that reads only the Gram (row methods build their update from the rows).
GRAM_METHODS = sorted(name for name, cls in AGGREGATORS.items() if not cls.needs_jacobian)
F32_EPS = torch.finfo(torch.float32).eps


@st.composite
def deficient_rows(draw: st.DrawFn) -> Tensor:
    """Float32 ``(K, P)`` rows whose rank deficiency is exact in float32: ``P < K`` (a
    small block, formed in float64) or ``P = 40000`` (a large one, float32 products),
    with rows that repeat, negate or scale (by powers of two) a few base rows, and zeros."""
    k = draw(st.integers(2, 7))
    p = draw(st.sampled_from([1, 2, 3, max(1, k - 1), 40_000]))
    distinct = draw(st.integers(1, k))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(distinct, p, generator=g, dtype=torch.float64).to(torch.float32)
    rows = []
    for i in range(k):
        if draw(st.integers(0, 9)) == 0:
            rows.append(torch.zeros(p))
            continue
        which = i if i < distinct else draw(st.integers(0, distinct - 1))
        factor = draw(st.sampled_from([1.0, -1.0, 2.0**-12, 2.0**9, -(2.0**5)]))
        rows.append(base[which] * factor)  # exact in float32
    return torch.stack(rows)


def _context(k: int, rounding) -> AggregationContext:  # type: ignore[no-untyped-def]
    losses = torch.linspace(0.5, 2.0, k, dtype=torch.float64)
    ctx = AggregationContext(torch.Generator().manual_seed(0), losses, 0)
    ctx.rounding = rounding
    return ctx


def _update(name: str, gram: Tensor, rows: Tensor, rounding) -> Tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    agg = AGGREGATORS[name]()
    k = rows.shape[0]
    coefs, _ = agg(gram, agg.init_state(k, 1), _context(k, rounding))
    return coefs[0], coefs[0] @ rows.double()


@settings(max_examples=examples(40), deadline=None)
@given(deficient_rows())
def test_every_gram_method_matches_the_float64_gram_on_rank_deficient_float32_rows(rows: Tensor) -> None:
    k = rows.shape[0]
    gram = dense_grams([rows], [[0]], k)  # the optimizer's own Gram path
    rounding = gram_rounding([rows], [[0]], {})
    exact = rows.double() @ rows.double().T
    norms = rows.double().norm(dim=1)
    for name in GRAM_METHODS:
        if k < AGGREGATORS[name]().min_tasks():
            continue
        coefs, update = _update(name, gram, rows, rounding)
        ref_coefs, ref = _update(name, exact.unsqueeze(0), rows, rounding)
        assert bool(torch.isfinite(coefs).all()), (name, coefs)
        # the scale of the update: each row's weight times its norm (coefficients of zero rows
        # do not matter); an update at the rows' rounding level is zero
        scale = float((ref_coefs.abs() * norms).sum())
        floor = 16 * k * F32_EPS * float(norms.max())
        if AGGREGATORS[name].breaks_ties_by_index:  # duplicated rows are exact ties: which
            assert float((coefs.abs() * norms).sum()) <= k * float(norms.max())  # one is picked is arbitrary
            continue
        assert float((coefs.abs() * norms).sum()) <= 10.0 * scale + floor, (name, coefs, ref_coefs)
        error = float((update - ref).norm())
        assert error <= 1e-3 * scale + floor, (name, error, scale, coefs, ref_coefs)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "name", ["fairgrad", "nash_mtl", "imtl_g", "cagrad", "upgrad", "dualproj", "config", "aligned_mtl"]
)
def test_the_issue_case_a_three_element_bias_with_four_tasks(name: str, seed: int) -> None:
    """A shared bias of 3 elements and 4 tasks, ``granularity="tensor"``, float32: before the
    fix FairGrad and Nash-MTL wrote gradients of about 1e28 on such a block (or skipped)."""
    torch.manual_seed(seed)
    trunk = torch.nn.Linear(5, 3)
    heads = [torch.nn.Linear(3, 1) for _ in range(4)]
    x = torch.randn(16, 5)
    targets = [torch.randn(16, 1) * 3.0**i for i in range(4)]  # four loss scales
    for _ in range(1):
        opt = MultiTaskOptimizer(
            torch.optim.SGD([*trunk.parameters(), *(p for h in heads for p in h.parameters())], lr=0.0),
            shared=list(trunk.parameters()),
            tasks=[list(h.parameters()) for h in heads],
            surgery=name,
            surgery_kwargs={"max_norm": 0.0} if name == "nash_mtl" else None,  # clipping spans blocks
            granularity="tensor",
            seed=0,
        )
        z = torch.tanh(trunk(x))
        losses = [torch.nn.functional.mse_loss(h(z), t) for h, t in zip(heads, targets)]
        jac = torch.stack([torch.autograd.grad(loss, trunk.bias, retain_graph=True)[0] for loss in losses])
        opt.zero_grad()
        opt.step(losses)
        assert not opt.last_stats.get("skipped_step"), (name, opt.last_stats)
        block = opt.last_stats["block_coefficients"][1]  # the bias: 3 elements, 4 tasks
        exact = (jac.double() @ jac.double().T).unsqueeze(0)
        agg = AGGREGATORS[name](**({"max_norm": 0.0} if name == "nash_mtl" else {}))
        ref_coefs = agg(exact, agg.init_state(4, 1), _context(4, F32_EPS))[0][0]
        ref = ref_coefs @ jac.double()
        got = torch.tensor(block, dtype=torch.float64) @ jac.double()
        scale = float((ref_coefs.abs() * jac.double().norm(dim=1)).sum())
        assert float((got - ref).norm()) <= 1e-6 * scale, (name, got, ref)
        assert math.isfinite(float(trunk.bias.grad.abs().max())) and float(trunk.bias.grad.abs().max()) < 1e6


SOLVERS = ["fairgrad", "nash_mtl", "imtl_g", "cagrad", "upgrad", "dualproj", "config", "aligned_mtl", "mgda"]


@pytest.mark.parametrize("name", SOLVERS)
def test_rows_whose_hull_contains_zero_up_to_float32_rounding_give_a_bounded_update(name: str) -> None:
    """Four float32 task gradients on a 3-element bias with ``g_4 = -(g_1 + g_2 + g_3)``
    (rounded): a Pareto-stationary point up to the rows' precision. Before the fix the
    float32 Gram's negative noise eigenvalue made FairGrad skip the step (an infinite
    update), Nash-MTL write an update of 80 and UPGrad of 3 where the right one is at
    most about 1e-2."""
    worst = 0.0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        rows = torch.randn(3, 3, generator=g) * torch.tensor([[1.0], [7.0], [0.3]])
        rows = torch.cat([rows, -rows.sum(0, keepdim=True)])
        bias = torch.nn.Parameter(torch.zeros(3))
        own = [torch.nn.Parameter(torch.ones(1)) for _ in range(4)]
        opt = MultiTaskOptimizer(
            torch.optim.SGD([bias, *own], lr=1.0),
            shared=[bias],
            tasks=[[w] for w in own],
            surgery=name,
            seed=0,
        )
        opt.step([(r * bias).sum() + w.pow(2).sum() for r, w in zip(rows, own)])
        assert not opt.last_stats.get("skipped_step"), (seed, opt.last_stats)
        worst = max(worst, float(bias.detach().abs().max()))
    assert worst <= 0.05 * float(rows.norm(dim=1).max()), worst


@pytest.mark.parametrize("p", [20_000, 3_000_000])
def test_large_blocks_are_float32_accurate_whatever_their_size(p: int) -> None:
    """Float32 products over chunks summed in float64: each entry within a few float32
    eps of ``||g_i|| ||g_j||`` (one product over 3e6 elements was off by about 1e-4)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(4, p, generator=g)
    rows[3] = rows[1] + 1e-3 * torch.randn(p, generator=g)
    gram = dense_grams([rows], [[0]], 4)[0]
    exact = rows.double() @ rows.double().T
    n = exact.diagonal().sqrt()
    assert float(((gram - exact) / n.view(-1, 1) / n.view(1, -1)).abs().max()) < 8 * F32_EPS
    assert gram_rounding([rows], [[0]], {}).tolist() == [F32_EPS]


def test_small_blocks_are_formed_in_float64() -> None:
    rows: List[Tensor] = [torch.randn(4, 3), torch.randn(4, 2, 2)]
    gram = dense_grams(rows, [[0, 1]], 4)[0]
    flat = torch.cat([r.reshape(4, -1).double() for r in rows], dim=1)
    assert torch.equal(gram, flat @ flat.T)
    assert gram_rounding(rows, [[0, 1]], {}).tolist() == [F32_EPS]  # the rows are float32 all the same
