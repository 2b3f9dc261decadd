"""Properties of the second-wave Gram aggregators (issue 10; DESIGN.md sections 3, 4).

Generic properties (parametrised over every method): finite output on every drawn
Jacobian (K = 1..16, zero, duplicated, opposite and rank-deficient rows, scales
1e-20..1e20), homogeneity ``f(cJ) = c^p f(J)`` with each method's degree ``p``,
rotation equivariance ``f(JQ) = f(J) Q``, relabelling the tasks, and a pure ``aggregate``
(the old state is never mutated). Then each method's own defining property, and an
end-to-end smoke with a bitwise ``state_dict`` round trip.

Homogeneity degrees: 1 for UPGrad, DualProj, CAGrad, IMTL-G, Aligned-MTL, ConFIG and
Krum; 0 for Nash-MTL (``alpha_i (G alpha)_i = 1`` fixes ``||d||^2 = K``, and ``max_norm``
clipping is then a constant factor); ``(1 - alpha) / (1 + alpha)`` for FairGrad.
Scaling is by powers of two so that ``G`` scales exactly and discrete decisions (Krum's
ranking, rank cut-offs) cannot change.

Tolerances (update vectors, relative to ``||d|| + max_i ||g_i||``, or for homogeneity
to ``||d|| + sum_i |c_i| ||g_i||``, the rounding scale of ``J^T c``): 1e-9 for the
exactly scaled homogeneity, 1e-6 for rotations and relabelling (the Gram matrix
changes by rounding). Methods whose output is discontinuous in ``G`` (Krum's ranking,
the rank cut-offs of IMTL-G, Aligned-MTL and ConFIG, CAGrad's switch to 0 at a
Pareto-stationary point, Nash-MTL and FairGrad at Pareto-stationary points where their
systems have no solution and only a ridge keeps the weights finite) are compared under rotation/relabelling on Jacobians with
linearly independent rows only.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import pytest
import test_aggregators as ta
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from models import TrunkHeads, build
from profiles import examples
from torch import Tensor

from multitask_optim import MultiTaskOptimizer
from multitask_optim.aggregators import (
    AGGREGATORS,
    IMTLG,
    AggregationContext,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    Krum,
    NashMTL,
    UPGrad,
)

FACTORIES: Dict[str, Callable[[], Aggregator]] = {
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "aligned_mtl": AlignedMTL,
    "config": ConFIG,
    "nash_mtl": NashMTL,
    "nash_mtl_unclipped": lambda: NashMTL(max_norm=0.0),
    "fairgrad": FairGrad,
    "fairgrad_2": lambda: FairGrad(alpha=2.0),
    "krum": Krum,
}
METHODS = sorted(FACTORIES)
#: The invariance properties over every method here are also the contract suite's
#: (tests/test_contracts.py, every registered aggregator): fewer examples than the profile's.
INVARIANCES = settings(max_examples=examples(20))
#: The costlier per-method properties (an optimality condition per example): half the profile's.
PROPERTIES = settings(max_examples=examples(30))
#: the registered methods (by their registry names), for the registry and end-to-end tests
SURGERIES = [
    "upgrad",
    "dualproj",
    "cagrad",
    "imtl_g",
    "aligned_mtl",
    "config",
    "nash_mtl",
    "fairgrad",
    "krum",
]
DEGREE = {name: 1.0 for name in METHODS}
DEGREE.update({"nash_mtl": 0.0, "nash_mtl_unclipped": 0.0, "fairgrad": 0.0, "fairgrad_2": -1.0 / 3.0})
#: Output discontinuous in G on degenerate Jacobians (see the module docstring).
DISCONTINUOUS = {
    "krum",
    "imtl_g",
    "aligned_mtl",
    "config",
    "nash_mtl",
    "nash_mtl_unclipped",
    "fairgrad",
    "fairgrad_2",
}


def ctx(k: int = 1) -> AggregationContext:
    return AggregationContext(
        generator=torch.Generator().manual_seed(0), losses=torch.ones(k, dtype=torch.float64)
    )


def coefficients(method: str, jac: Tensor) -> Tensor:
    agg = FACTORIES[method]()
    k = jac.shape[0]
    coefs, _ = agg(jac @ jac.T, agg.init_state(k, 1), ctx(k))
    assert coefs.shape == (k,) and coefs.dtype == torch.float64
    return coefs


def update(method: str, jac: Tensor) -> Tensor:
    return jac.T @ coefficients(method, jac)


def term_scale(jac: Tensor, coefs: Tensor) -> float:
    """``sum_i |c_i| ||g_i||``: the size of the terms summed into ``J^T c`` (its rounding scale)."""
    return float((coefs.abs() * jac.norm(dim=1)).sum())


def usable(method: str, jac: Tensor) -> bool:
    return method != "krum" or jac.shape[0] >= 3


def scale_of(jac: Tensor, d: Tensor) -> float:
    return float(d.norm()) + (float(jac.norm(dim=1).max()) if jac.numel() else 0.0)


@st.composite
def independent_jacobians(
    draw: st.DrawFn, max_k: int = 16, min_exp: float = -8.0, max_exp: float = 8.0
) -> Tensor:
    """``(K, P)`` Gaussian rows with ``P >= K + 2``, row scales ``10^U(-2, 2)`` and a global
    scale: linearly independent, with condition number of the unit rows below 1e4."""
    k = draw(st.integers(1, max_k), label="K")
    p = draw(st.integers(k + 2, k + 40), label="P")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    jac = torch.randn(k, p, generator=gen, dtype=torch.float64)
    if draw(st.booleans(), label="common component"):
        jac = jac + 2.0 * torch.randn(1, p, generator=gen, dtype=torch.float64)
    if draw(st.booleans(), label="row scales"):
        jac = jac * 10.0 ** (torch.rand(k, 1, generator=gen, dtype=torch.float64) * 4.0 - 2.0)
    jac = jac * 10.0 ** draw(st.floats(min_exp, max_exp), label="log10 scale")
    assume(independent(jac))
    return jac


def independent(jac: Tensor) -> bool:
    """Rows linearly independent with a comfortable margin (condition number < 1e4)."""
    if jac.shape[0] > jac.shape[1] or bool((jac.norm(dim=1) == 0).any()):
        return False
    s = torch.linalg.svdvals(jac / jac.norm(dim=1, keepdim=True))
    return bool(s[-1] > 1e-4 * s[0])


# --------------------------------------------------------------------- generic properties


def test_every_method_is_registered() -> None:
    for name in SURGERIES:
        assert AGGREGATORS[name] is type(FACTORIES[name]())


@pytest.mark.parametrize("method", METHODS)
@INVARIANCES
@given(jac=ta.jacobians())
def test_finite_on_every_draw(method: str, jac: Tensor) -> None:
    assume(usable(method, jac))
    d = update(method, jac)
    assert torch.isfinite(d).all(), d


@pytest.mark.parametrize("method", METHODS)
@INVARIANCES
@given(jac=ta.jacobians(min_exp=-8, max_exp=8), exponent=st.integers(-30, 30))
def test_homogeneity(method: str, jac: Tensor, exponent: int) -> None:
    assume(usable(method, jac))
    c = 2.0**exponent
    coefs = coefficients(method, jac)
    d = jac.T @ coefs
    got = update(method, c * jac)
    want = c ** DEGREE[method] * d
    tol = 1e-9 * c ** DEGREE[method] * (term_scale(jac, coefs) + float(d.norm()))
    assert float((got - want).norm()) <= tol, (got, want)


@pytest.mark.parametrize("method", METHODS)
@INVARIANCES
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_rotation_equivariance(method: str, data: st.DataObject, seed: int) -> None:
    strategy = (
        independent_jacobians(max_k=8)
        if method in DISCONTINUOUS
        else ta.jacobians(min_exp=-8, max_exp=8, max_p=40)
    )
    jac = data.draw(strategy, label="jac")
    assume(usable(method, jac))
    p = jac.shape[1]
    q, _ = torch.linalg.qr(
        torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    d = update(method, jac)
    got = update(method, jac @ q)
    assert float((got - d @ q).norm()) <= 1e-6 * scale_of(jac, d), (got, d @ q)


@pytest.mark.parametrize("method", METHODS)
@INVARIANCES
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_relabelling_tasks(method: str, data: st.DataObject, seed: int) -> None:
    strategy = independent_jacobians() if method in DISCONTINUOUS else ta.jacobians(min_exp=-8, max_exp=8)
    jac = data.draw(strategy, label="jac")
    assume(usable(method, jac))
    # K = 3 Krum scores each row by its nearest neighbour only: the closest pair always
    # ties, and a tie is broken by the task index
    assume(method != "krum" or jac.shape[0] >= 4)
    perm = torch.randperm(jac.shape[0], generator=torch.Generator().manual_seed(seed))
    d = update(method, jac)
    got = update(method, jac[perm])
    assert float((got - d).norm()) <= 1e-6 * scale_of(jac, d), (got, d)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "rows",
    [
        [[0.0, 0.0, 0.0]],
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
        [[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0], [1.0, 2.0, 3.0]],
        [[1e-20, 0.0, 0.0], [0.0, 1e20, 0.0], [0.0, 0.0, 1.0]],
        [[1.0, 0.0], [1.0, 1e-12], [0.0, 0.0], [-1.0, 0.0]],
        [[1e-160, 1e-160], [2e-160, -1e-160], [0.0, 1e-160]],
    ],
)
def test_degenerate_inputs_stay_finite(method: str, rows: list) -> None:
    jac = torch.tensor(rows, dtype=torch.float64)
    if not usable(method, jac):
        return
    assert torch.isfinite(update(method, jac)).all()


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_gram_gives_nan_coefficients(method: str) -> None:
    agg = FACTORIES[method]()
    gram = torch.eye(4, dtype=torch.float64).unsqueeze(0).repeat(2, 1, 1)
    gram[1, 0, 0] = math.nan
    coefs, _ = agg(gram, agg.init_state(4, 2), ctx(4))
    assert coefs.shape == (2, 4) and bool(torch.isnan(coefs).all())


@pytest.mark.parametrize("method", METHODS)
def test_blocks_are_independent_and_state_is_not_mutated(method: str) -> None:
    agg = FACTORIES[method]()
    g = torch.Generator().manual_seed(3)
    jacs = [torch.randn(4, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    gram = torch.stack([j @ j.T for j in jacs])
    state = agg.init_state(4, 3)
    before = {key: value.clone() for key, value in state.items()}
    coefs, new_state = agg(gram, state, ctx(4))
    for key in before:
        assert torch.equal(state[key], before[key])
    if method.startswith("nash"):  # the clip is on the norm over all blocks
        return
    for b in range(3):
        alone, _ = agg(gram[b : b + 1], agg.init_state(4, 1), ctx(4))
        assert torch.allclose(coefs[b], alone[0], rtol=1e-12, atol=0.0)


# --------------------------------------------------------------------- defining properties


def row_tol(jac: Tensor) -> Tensor:
    n = jac.norm(dim=1)
    return 1e-9 * n * n.max()


@pytest.mark.parametrize("method", ["upgrad", "dualproj"])
@given(jac=ta.jacobians())
def test_upgrad_and_dualproj_do_not_conflict(method: str, jac: Tensor) -> None:
    d = update(method, jac)
    assert bool((jac @ d >= -row_tol(jac)).all()), jac @ d


@given(jac=ta.jacobians(min_exp=-5, max_exp=5))
def test_dualproj_is_the_projection_onto_the_dual_cone(jac: Tensor) -> None:
    """KKT: ``v >= u``, ``G v >= 0`` and ``(v - u)^T G v = 0`` with ``u = 1/K``."""
    k = jac.shape[0]
    gram = jac @ jac.T
    v, _ = DualProj()(gram, {}, ctx(k))
    u = torch.full((k,), 1.0 / k, dtype=torch.float64)
    scale = float(gram.diagonal().max()) if k else 0.0
    assume(scale > 0)
    n = gram.diagonal().sqrt()
    assert bool((v >= u - 1e-12).all())
    assert bool((gram @ v >= -row_tol(jac)).all())
    # complementarity, per task: (v_j - u_j) <g_j, d> = 0, relative to ||g_j|| ||g||_max
    comp = (v - u) * (gram @ v)
    assert bool((comp.abs() <= 1e-8 * v.abs().max() ** 2 * n * n.max()).all()), comp


@PROPERTIES
@given(jac=ta.jacobians(min_exp=-5, max_exp=5))
def test_upgrad_is_the_mean_of_the_projected_rows(jac: Tensor) -> None:
    """Linearity in the preference vector: UPGrad = mean of DualProj on each one-hot."""
    k = jac.shape[0]
    gram = jac @ jac.T
    c, _ = UPGrad()(gram, {}, ctx(k))
    parts = [
        DualProj(pref_vector=[1.0 / k if j == i else 0.0 for j in range(k)])(gram, {}, ctx(k))[0]
        for i in range(k)
    ]
    want = torch.stack(parts).sum(0) if parts else torch.zeros(0, dtype=torch.float64)
    assert float((jac.T @ (c - want)).norm()) <= 1e-9 * scale_of(jac, jac.T @ c)


def test_upgrad_without_conflict_is_the_mean() -> None:
    jac = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.0, 0.3, 2.0]], dtype=torch.float64)
    c, _ = UPGrad()(jac @ jac.T, {}, ctx(3))
    assert torch.allclose(c, torch.full((3,), 1.0 / 3, dtype=torch.float64), rtol=0, atol=1e-15)


@given(jac=independent_jacobians(max_k=10))
def test_imtl_g_projections_are_equal(jac: Tensor) -> None:
    d = update("imtl_g", jac)
    proj = jac @ d / jac.norm(dim=1)
    c, _ = IMTLG()(jac @ jac.T, {}, ctx(jac.shape[0]))
    assert abs(float(c.sum()) - 1.0) < 1e-9
    assert float(proj.max() - proj.min()) <= 1e-7 * float(proj.abs().max()), proj


@given(jac=independent_jacobians(max_k=10))
def test_config_cosines_are_equal(jac: Tensor) -> None:
    d = update("config", jac)
    cos = jac @ d / jac.norm(dim=1) / d.norm()
    assert float(cos.min()) > 0
    assert float(cos.max() - cos.min()) <= 1e-7, cos


def test_config_cosines_follow_the_preference_vector() -> None:
    jac = torch.randn(3, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pref = [1.0, 2.0, 0.5]
    coefs, _ = ConFIG(pref_vector=pref)(jac @ jac.T, {}, ctx(3))
    d = jac.T @ coefs
    cos = jac @ d / jac.norm(dim=1) / d.norm()
    assert torch.allclose(cos / cos[0], torch.tensor(pref, dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@PROPERTIES
@given(jac=ta.jacobians(max_k=8, min_exp=-5, max_exp=5))
def test_aligned_jacobian_has_condition_number_one(jac: Tensor, scale_mode: str) -> None:
    """``B`` is recovered column by column from one-hot preference vectors."""
    k = jac.shape[0]
    gram = jac @ jac.T
    cols = [
        AlignedMTL(pref_vector=[float(i == j) for j in range(k)], scale_mode=scale_mode)(gram, {}, ctx(k))[0]
        for i in range(k)
    ]
    b = torch.stack(cols, dim=1)
    s = torch.linalg.svdvals(b @ jac)
    lam = torch.linalg.eigvalsh(gram).flip(0)
    rank = int((lam > lam.max() * k * torch.finfo(torch.float64).eps).sum())
    assume(rank > 0)
    # the Gram matrix resolves eigenvalues only to about eps * max(lambda)
    assume(bool(lam[rank - 1] > 1e-9 * lam[0]))
    kept = s[:rank]
    assert float(kept.max() - kept.min()) <= 1e-6 * float(kept.max()), s
    if rank < len(s):
        assert float(s[rank:].max()) <= 1e-6 * float(kept.max())


def cagrad_dual(gram: Tensor, w: Tensor, rho: float) -> float:
    k = gram.shape[0]
    b = gram @ torch.full((k,), 1.0 / k, dtype=torch.float64)
    return float(b @ w + rho * (w @ gram @ w).clamp_min(0).sqrt())


@pytest.mark.parametrize("c", [0.4, 1.0])
@PROPERTIES
@given(jac=ta.jacobians(max_k=10, min_exp=-5, max_exp=5))
def test_cagrad_attains_its_worst_case_improvement_bound(jac: Tensor, c: float) -> None:
    """``d`` is in the ball ``||d - g_0|| <= c ||g_0||`` and ``min_i <g_i, d>`` equals the
    dual value at the returned weights: by weak duality no ``d`` in the ball does better."""
    k = jac.shape[0]
    gram = jac @ jac.T
    coefs, _ = CAGrad(c=c)(gram, {}, ctx(k))
    g0 = jac.mean(0)
    rho = c * float(g0.norm())
    assume(rho > 1e-6 * float(jac.norm(dim=1).max()))
    d = jac.T @ coefs
    if not bool(coefs.any()):  # Pareto stationary: min-norm point of the hull is 0
        w = torch.tensor(ta_min_norm(gram), dtype=torch.float64)
        assert float((jac.T @ w).norm()) <= 1e-6 * float(jac.norm(dim=1).max())
        return
    lam = float((coefs - 1.0 / k).sum())
    assert lam > 0
    w = (coefs - 1.0 / k) / lam
    assert bool((w >= -1e-12).all())
    sc = float(jac.norm(dim=1).max()) ** 2
    assert float((d - g0).norm()) <= rho * (1 + 1e-9) + 1e-12 * math.sqrt(sc)
    primal = float((jac @ d).min())
    dual = cagrad_dual(gram, w, rho)
    assert abs(primal - dual) <= 1e-7 * sc, (primal, dual)
    # and the weights are optimal for the dual: no vertex or random point does better
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = torch.rand(k, generator=gen, dtype=torch.float64) ** 4
        other = other / other.sum()
        assert cagrad_dual(gram, other, rho) >= dual - 1e-9 * sc


def ta_min_norm(gram: Tensor) -> list:
    from multitask_optim.aggregators._qp import solve_simplex_qp

    return solve_simplex_qp(gram.tolist())


def test_cagrad_with_c_zero_is_the_mean() -> None:
    jac = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coefs, _ = CAGrad(c=0.0)(jac @ jac.T, {}, ctx(4))
    assert torch.equal(coefs, torch.full((4,), 0.25, dtype=torch.float64))


@given(jac=independent_jacobians(max_k=10))
def test_nash_mtl_bargaining_condition(jac: Tensor) -> None:
    k = jac.shape[0]
    gram = jac @ jac.T
    agg = NashMTL(max_norm=0.0)
    alpha, _ = agg(gram, agg.init_state(k, 1), ctx(k))
    assert bool((alpha > 0).all())
    lhs = alpha * (gram @ alpha)
    assert float((lhs - 1).abs().max()) <= 1e-3, lhs
    assert abs(float(jac.T @ alpha @ (jac.T @ alpha)) - k) <= 1e-3 * k


def test_nash_mtl_clips_the_total_norm_over_blocks() -> None:
    g = torch.Generator().manual_seed(5)
    jacs = [torch.randn(3, 9, generator=g, dtype=torch.float64) for _ in range(2)]
    gram = torch.stack([j @ j.T for j in jacs])
    for max_norm in (0.5, 1.0, 100.0):
        agg = NashMTL(max_norm=max_norm)
        coefs, _ = agg(gram, agg.init_state(3, 2), ctx(3))
        total = math.sqrt(sum(float((j.T @ c).norm()) ** 2 for j, c in zip(jacs, coefs)))
        assert total == pytest.approx(min(max_norm, math.sqrt(6.0)), rel=1e-6)


def test_nash_mtl_update_weights_every_reuses_alpha() -> None:
    g = torch.Generator().manual_seed(6)
    grams = [
        (lambda j: j @ j.T)(torch.randn(3, 8, generator=g, dtype=torch.float64)).unsqueeze(0)
        for _ in range(4)
    ]
    agg = NashMTL(max_norm=0.0, update_weights_every=2)
    state = agg.init_state(3, 1)
    outs = []
    for gram in grams:
        coefs, state = agg(gram, state, ctx(3))
        outs.append(coefs)
    assert int(state["step"]) == 4
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])
    assert not torch.equal(outs[1], outs[2])
    fresh = NashMTL(max_norm=0.0)
    assert torch.allclose(outs[2], fresh(grams[2], fresh.init_state(3, 1), ctx(3))[0], rtol=1e-8)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@PROPERTIES
@given(jac=independent_jacobians(max_k=8, min_exp=-5, max_exp=5))
def test_fairgrad_optimality_condition(jac: Tensor, alpha: float) -> None:
    """The paper's Equation 4: ``(G w)_i = w_i^(-1/alpha)`` with ``w > 0``."""
    k = jac.shape[0]
    gram = jac @ jac.T
    w, _ = FairGrad(alpha=alpha)(gram, {}, ctx(k))
    assert bool((w > 0).all())
    rel = (gram @ w) / w.pow(-1.0 / alpha) - 1.0
    assert float(rel.abs().max()) <= 1e-3, rel


def test_fairgrad_alpha_one_is_nash_mtl() -> None:
    jac = torch.randn(4, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gram = jac @ jac.T
    w, _ = FairGrad(alpha=1.0)(gram, {}, ctx(4))
    agg = NashMTL(max_norm=0.0)
    alpha, _ = agg(gram, agg.init_state(4, 1), ctx(4))
    assert torch.allclose(w, alpha, rtol=1e-7)


def test_krum_picks_the_central_rows() -> None:
    """A center, four honest rows at distances 0.1..0.4 along orthogonal axes, two far
    outliers. Scores (sum of the 3 nearest distances, f = 2): center 0.6, then the rows
    at 0.1 (0.64) and 0.2 (0.78); the outliers score above 100."""
    center = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    honest = [center + r * eye[i] for i, r in enumerate([0.1, 0.2, 0.3, 0.4])]
    outliers = [center + 50.0 * eye[4], center - 80.0 * eye[5]]
    # task order: 0.3, outlier, center, 0.2, 0.4, outlier, 0.1
    jac = torch.stack([honest[2], outliers[0], center, honest[1], honest[3], outliers[1], honest[0]])
    gram = jac @ jac.T
    coefs, _ = Krum(n_byzantine=2)(gram, {}, ctx(7))
    assert coefs.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    coefs, _ = Krum(n_byzantine=2, n_selected=3)(gram, {}, ctx(7))
    assert coefs.tolist() == pytest.approx([0.0, 0.0, 1 / 3, 1 / 3, 0.0, 0.0, 1 / 3])


# --------------------------------------------------------------------- hyper-parameters


@pytest.mark.parametrize(
    "factory, argument",
    [
        (lambda: UPGrad(pref_vector=[[1.0]]), "pref_vector"),
        (lambda: UPGrad(pref_vector=[math.nan]), "pref_vector"),
        (lambda: UPGrad(reg_eps=-1.0), "reg_eps"),
        (lambda: DualProj(norm_eps=-1.0), "norm_eps"),
        (lambda: DualProj(pref_vector=[]), "pref_vector"),
        (lambda: CAGrad(c=-0.1), "c"),
        (lambda: CAGrad(c=math.inf), "c"),
        (lambda: AlignedMTL(scale_mode="max"), "scale_mode"),
        (lambda: ConFIG(pref_vector="ab"), "pref_vector"),
        (lambda: NashMTL(max_norm=-1.0), "max_norm"),
        (lambda: NashMTL(update_weights_every=0), "update_weights_every"),
        (lambda: NashMTL(optim_niter=1.5), "optim_niter"),
        (lambda: FairGrad(alpha=0.0), "alpha"),
        (lambda: Krum(n_byzantine=-1), "n_byzantine"),
        (lambda: Krum(n_selected=0), "n_selected"),
    ],
)
def test_invalid_hyper_parameters_name_the_argument(factory, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        factory()


@pytest.mark.parametrize(
    "agg, k, argument",
    [
        (UPGrad(pref_vector=[1.0, 2.0]), 3, "pref_vector"),
        (Krum(n_byzantine=1), 3, "n_byzantine"),
        (Krum(n_selected=4), 3, "n_selected"),
    ],
)
def test_call_time_checks_name_the_argument(agg: Aggregator, k: int, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        agg(torch.eye(k, dtype=torch.float64), {}, ctx(k))


def test_repr_shows_hyper_parameters() -> None:
    assert repr(UPGrad(pref_vector=[1.0, 2.0])) == "UPGrad(pref_vector=(1.0, 2.0), norm_eps=0.0, reg_eps=0.0)"
    assert repr(CAGrad()) == "CAGrad(c=0.4)"
    assert repr(NashMTL()) == "NashMTL(max_norm=1.0, update_weights_every=1, optim_niter=20)"
    assert repr(FairGrad(alpha=2)) == "FairGrad(alpha=2.0)"
    assert repr(Krum(1, 2)) == "Krum(n_byzantine=1, n_selected=2)"
    assert repr(AlignedMTL()) == "AlignedMTL(pref_vector=None, scale_mode='min')"
    assert repr(ConFIG()) == "ConFIG(pref_vector=None)"
    assert repr(DualProj()) == "DualProj(pref_vector=None, norm_eps=0.0, reg_eps=0.0)"
    assert repr(IMTLG()) == "IMTLG()"


# --------------------------------------------------------------------- end to end


def make_model(name: str):
    out_dims = (2, 3, 1) if name == "krum" else (2, 3)  # Krum needs K >= n_byzantine + 3
    return build(TrunkHeads, seed=0, out_dims=out_dims)


def make_opt(name: str, model) -> MultiTaskOptimizer:
    kwargs = {"update_weights_every": 2} if name == "nash_mtl" else None
    return MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), surgery=name, surgery_kwargs=kwargs, seed=0
    )


def train(model, opt, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        opt.step(model.losses(model.batch(step)))


@pytest.mark.parametrize("name", SURGERIES)
def test_end_to_end_training_and_bitwise_resume(name: str, tmp_path) -> None:
    straight = make_model(name)
    opt = make_opt(name, straight)
    train(straight, opt, range(7))
    assert all(bool(torch.isfinite(p).all()) for p in straight.parameters())
    assert opt.last_stats["skipped"] == 0

    model = make_model(name)
    opt = make_opt(name, model)
    train(model, opt, range(3))
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    resumed = make_model(name)
    resumed.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    opt = make_opt(name, resumed)
    opt.load_state_dict(torch.load(tmp_path / "optim.pt", weights_only=True))
    train(resumed, opt, range(3, 7))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
