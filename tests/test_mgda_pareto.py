"""Property tests of MGDA, PE-LTR's Pareto weights and their small-QP solver.

Both methods minimise ``a^T G a`` over ``{a >= l, sum(a) = 1}`` (``l = 0`` for MGDA).
The checks, over hypothesis-drawn Jacobians (``K`` from 1 to 12, rank-deficient,
duplicated, opposite and zero rows, row scales from 1e-10 to 1e10):

* feasibility, and the KKT conditions: ``(G a)_i`` is the same on the support
  (``a_i > l_i``) and no smaller anywhere else; with ``l = 0`` that level is ``a^T G a``;
* ``K = 2`` equals the closed form (min-norm point of a segment, clipped to the bounds);
* the objective is within ``1e-6`` of a long projected-gradient (FISTA) reference and
  no larger than the best point of a fine grid (``K = 3``);
* MGDA's normalisations give the MGDA direction of the rescaled rows;
* the Pareto weights satisfy their bounds, are no worse than MGDA's solution made
  feasible and than the paper's relax-then-project procedure, and equal MGDA with
  zero bounds;
* invalid arguments raise ``ValueError`` naming the argument.

Tolerances are relative to ``max_i G_ii`` (the solver normalises by it): KKT residuals
``1e-8`` (the solver reaches ~1e-13, ~1e-9 for nearly parallel copies of a row).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples
from torch import Tensor

from multitask_optim.aggregators import (
    AGGREGATORS,
    MGDA,
    AggregationContext,
    ParetoWeights,
    get_aggregator,
    mgda_coefficients,
)
from multitask_optim.aggregators._qp import min_norm_weights, solve_simplex_qp

KKT_TOL = 1e-8
SUPPORT_TOL = 1e-9
FEAS_TOL = 1e-12
#: Objectives (float64, relative to max_i G_ii, so at most 1) are compared relative to
#: their size, with a floor for objectives near 0: the solver's KKT accuracy (~1e-13,
#: ~1e-9 on nearly parallel rows) and the rounding of ``a^T G a`` leave ~1e-12 of it.
OBJ_RTOL, OBJ_ATOL = 1e-9, 1e-12
#: Half the ``ci`` profile's count (every solver property draws from the same strategies).
PROPS = settings(max_examples=examples(30))
DTYPE = torch.float64


# ----------------------------------------------------------------------------- inputs


@st.composite
def jacobians(draw: st.DrawFn, min_k: int = 1, max_k: int = 12) -> Tensor:
    """A ``K x P`` float64 Jacobian with the degenerate structures of section 4 of the
    project design (DESIGN.md, shared with the developers), plus nearly parallel copies
    of rows, the solver's hardest case."""
    k = draw(st.integers(min_k, max_k))
    p = draw(st.integers(1, 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["general", "low_rank", "copies", "near_copies", "shifted"]))
    if kind == "low_rank":
        r = draw(st.integers(1, max(1, min(k, p) - 1)))
        jac = torch.randn(k, r, generator=gen, dtype=DTYPE) @ torch.randn(r, p, generator=gen, dtype=DTYPE)
    else:
        jac = torch.randn(k, p, generator=gen, dtype=DTYPE)
    if kind == "shifted":  # all rows share a large common part: the origin is far away
        jac = jac + 3.0 * torch.randn(1, p, generator=gen, dtype=DTYPE)
    if kind == "copies" and k > 1:  # duplicated, opposite and rescaled copies of rows
        for i in range(1, k):
            if draw(st.booleans()):
                src = draw(st.integers(0, i - 1))
                jac[i] = draw(st.sampled_from([1.0, -1.0, 2.0, 0.5])) * jac[src]
    if kind == "near_copies" and k > 1:  # copies equal up to a relative 1e-9 (ill-conditioned)
        src = torch.randint(0, max(1, k // 3), (k,), generator=gen)
        jac = jac[src] * (1.0 + 1e-9 * torch.randn(k, 1, generator=gen, dtype=DTYPE))
    if draw(st.booleans()):
        zero = draw(st.lists(st.booleans(), min_size=k, max_size=k))
        jac[torch.tensor(zero)] = 0.0
    if draw(st.booleans()):
        expo = draw(st.lists(st.floats(-10.0, 10.0), min_size=k, max_size=k))
        jac = jac * torch.tensor([10.0**e for e in expo], dtype=DTYPE).unsqueeze(1)
    return jac * 10.0 ** draw(st.floats(-10.0, 10.0))


@st.composite
def lower_bounds(draw: st.DrawFn, k: int) -> List[float]:
    """``K`` lower bounds in ``[0, 1)`` summing to at most 0.9 (some exactly zero)."""
    raw = draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))
    keep = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    raw = [r if kp else 0.0 for r, kp in zip(raw, keep)]
    total = sum(raw)
    budget = draw(st.floats(0.0, 0.9))
    if total == 0.0:
        return [0.0] * k
    return [budget * r / total for r in raw]


def gram_of(jac: Tensor) -> Tensor:
    return jac @ jac.T


def ctx(losses: Optional[Sequence[float]] = None, k: int = 0) -> AggregationContext:
    values = torch.ones(k, dtype=DTYPE) if losses is None else torch.tensor(losses, dtype=DTYPE)
    return AggregationContext(torch.Generator().manual_seed(0), values)


def scale_of(gram: Tensor) -> float:
    top = float(gram.diagonal().max()) if gram.numel() else 0.0
    return top if top > 0 else 1.0


def objective(gram: Tensor, a: Tensor) -> float:
    """``a^T G a`` relative to ``max_i G_ii``."""
    return float(a @ (gram / scale_of(gram)) @ a)


def obj_tol(value: float) -> float:
    """How far two objectives near ``value`` may differ by rounding alone."""
    return OBJ_RTOL * abs(value) + OBJ_ATOL


# ------------------------------------------------------------------ test-only references


def assert_kkt(gram: Tensor, a: Tensor, lower: Optional[Sequence[float]] = None) -> None:
    """Feasibility and the KKT conditions of ``min a^T G a, a >= l, sum(a) = 1``."""
    k = gram.shape[0]
    low = torch.zeros(k, dtype=DTYPE) if lower is None else torch.tensor(lower, dtype=DTYPE)
    assert torch.isfinite(a).all()
    assert abs(float(a.sum()) - 1.0) <= FEAS_TOL
    assert float((a - low).min()) >= -FEAS_TOL
    ga = (gram / scale_of(gram)) @ a
    on = (a - low) > SUPPORT_TOL
    if not bool(on.any()):
        return
    level = float(ga[on].max())
    assert float(ga[on].max() - ga[on].min()) <= KKT_TOL, "(G a)_i differs on the support"
    assert float(ga.min()) >= level - KKT_TOL, "a task off the support is better"
    if lower is None or not any(lower):
        value = float(a @ ga)
        assert float(ga.min()) >= value - KKT_TOL
        assert float((ga[on] - value).abs().max()) <= KKT_TOL


def project_feasible(v: Tensor, lower: Tensor) -> Tensor:
    """Euclidean projection onto ``{a >= lower, sum(a) = 1}`` (sort-based)."""
    s = 1.0 - float(lower.sum())
    y = v - lower
    u, _ = torch.sort(y, descending=True)
    css = torch.cumsum(u, 0) - s
    idx = torch.arange(1, len(v) + 1, dtype=DTYPE)
    r = int(torch.nonzero(u - css / idx > 0).max())
    tau = float(css[r]) / (r + 1)
    return lower + (y - tau).clamp_min(0.0)


def fista_reference(gram: Tensor, lower: Tensor, iters: int = 10000) -> Tuple[float, float]:
    """Accelerated projected gradient with adaptive restart on the relative objective.

    Returns ``(objective, gap)``: the best objective found and its Frank-Wolfe gap, which
    certifies ``objective - optimum <= gap``. Stops once the gap is below ``1e-8``.
    """
    g = gram / scale_of(gram)
    lip = 2.0 * max(float(torch.linalg.eigvalsh(g).max()), 1e-12)
    s = 1.0 - float(lower.sum())
    x = project_feasible(torch.full((len(lower),), 1.0 / len(lower), dtype=DTYPE), lower)
    y, t, best = x.clone(), 1.0, float(x @ g @ x)

    def gap_at(v: Tensor) -> float:
        grad = 2.0 * (g @ v)
        return float(grad @ v - grad @ lower - s * grad.min())

    for it in range(iters):
        x_new = project_feasible(y - (2.0 / lip) * (g @ y), lower)
        f_new = float(x_new @ g @ x_new)
        if f_new <= best:
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            y = x_new + ((t - 1.0) / t_new) * (x_new - x)
            x, t, best = x_new, t_new, f_new
        else:  # restart the momentum
            y, t = x.clone(), 1.0
        if it % 10 == 0 and gap_at(x) <= 1e-8:
            break
    return best, gap_at(x)


def two_step_reference(gram: Tensor, lower: Tensor) -> Tensor:
    """PE-LTR's procedure: relax ``w >= c``, solve the equality-constrained QP from its
    KKT system (least squares, for singular ``G``), then project onto the feasible set."""
    k = len(lower)
    g = gram / scale_of(gram)
    s = 1.0 - float(lower.sum())
    kkt = torch.zeros(k + 1, k + 1, dtype=DTYPE)
    kkt[:k, :k] = 2.0 * g
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    rhs = torch.cat([-2.0 * g @ lower, torch.tensor([s], dtype=DTYPE)])
    sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return project_feasible(lower + sol[:k], lower)


# ----------------------------------------------------------------------------- solver


@PROPS
@given(st.data())
def test_min_norm_satisfies_kkt(data: st.DataObject) -> None:
    jac = data.draw(jacobians())
    gram = gram_of(jac)
    a = min_norm_weights(gram)
    assert_kkt(gram, a)
    # The common descent direction: <d, g_i> >= ||d||^2 for every task.
    d = jac.T @ a
    scale = scale_of(gram)
    assert float((jac @ d).min()) / scale >= float(d @ d) / scale - KKT_TOL


@PROPS
@given(st.data())
def test_bounded_min_norm_satisfies_kkt(data: st.DataObject) -> None:
    jac = data.draw(jacobians(min_k=2))
    low = data.draw(lower_bounds(jac.shape[0]))
    gram = gram_of(jac)
    a = min_norm_weights(gram, low)
    assert_kkt(gram, a, low)


@PROPS
@given(jacobians(min_k=2, max_k=2), st.booleans(), st.floats(0.0, 0.9), st.floats(0.0, 1.0))
def test_two_tasks_match_the_closed_form(jac: Tensor, bounded: bool, total: float, split: float) -> None:
    gram = gram_of(jac)
    low = [total * split, total * (1.0 - split)] if bounded else [0.0, 0.0]
    a = min_norm_weights(gram, low)
    g = gram / scale_of(gram)
    den = float(g[0, 0] + g[1, 1] - 2.0 * g[0, 1])
    if den > 1e-12:
        t = float(g[1, 1] - g[0, 1]) / den
        expected = min(max(t, low[0]), 1.0 - low[1])
        assert float(a[0]) == pytest.approx(expected, abs=1e-9)
    # Never worse than any point of a dense 1-D grid of the feasible segment.
    ts = torch.linspace(low[0], 1.0 - low[1], 2001, dtype=DTYPE)
    pts = torch.stack([ts, 1.0 - ts], 1)
    grid_best = float(((pts @ g) * pts).sum(1).min())
    assert objective(gram, a) <= grid_best + obj_tol(grid_best)
    assert_kkt(gram, a, low)


@PROPS
@given(jacobians(min_k=3, max_k=3), st.booleans(), st.data())
def test_three_tasks_beat_a_fine_grid(jac: Tensor, bounded: bool, data: st.DataObject) -> None:
    gram = gram_of(jac)
    low = data.draw(lower_bounds(3)) if bounded else [0.0, 0.0, 0.0]
    a = min_norm_weights(gram, low)
    n = 200
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    keep = (i + j) <= n
    b = torch.stack([i[keep], j[keep], n - i[keep] - j[keep]], 1).to(DTYPE) / n
    low_t = torch.tensor(low, dtype=DTYPE)
    pts = low_t + (1.0 - float(low_t.sum())) * b
    g = gram / scale_of(gram)
    grid_best = float(((pts @ g) * pts).sum(1).min())
    assert objective(gram, a) <= grid_best + obj_tol(grid_best)


@PROPS
@given(st.data())
def test_objective_matches_a_long_projected_gradient_run(data: st.DataObject) -> None:
    jac = data.draw(jacobians(min_k=2))
    k = jac.shape[0]
    low = data.draw(lower_bounds(k)) if data.draw(st.booleans()) else [0.0] * k
    gram = gram_of(jac)
    a = min_norm_weights(gram, low)
    ref, gap = fista_reference(gram, torch.tensor(low, dtype=DTYPE))
    obj = objective(gram, a)
    assert gap <= 1e-7, "the reference did not converge"
    assert obj <= ref + obj_tol(ref)  # never worse than the reference ...
    assert obj >= ref - gap - obj_tol(ref)  # ... whose gap bounds the optimum from below
    assert abs(obj - ref) <= 1e-6


@PROPS
@given(jacobians())
def test_weights_are_in_the_convex_hull(jac: Tensor) -> None:
    a = min_norm_weights(gram_of(jac))
    assert bool((a >= 0).all())
    assert float(a.sum()) == pytest.approx(1.0, abs=FEAS_TOL)


def test_single_task_and_zero_gram() -> None:
    assert solve_simplex_qp([[4.0]]) == [1.0]
    assert solve_simplex_qp([[0.0]], [0.5]) == [1.0]
    assert solve_simplex_qp([[0.0] * 4 for _ in range(4)]) == [0.25] * 4
    got = solve_simplex_qp([[0.0] * 3 for _ in range(3)], [0.1, 0.2, 0.4])
    assert got == pytest.approx([0.2, 0.3, 0.5])
    # Bounds that use up the whole budget leave exactly one feasible point.
    assert solve_simplex_qp([[1.0, 0.0], [0.0, 2.0]], [0.25, 0.75]) == [0.25, 0.75]
    # Every shifted point is the origin (identical rows, bounds summing below 1).
    same = [[1.0] * 3 for _ in range(3)]
    assert sum(solve_simplex_qp(same, [0.1, 0.1, 0.1])) == pytest.approx(1.0)


def test_huge_and_tiny_scales_give_the_same_weights() -> None:
    gen = torch.Generator().manual_seed(3)
    jac = torch.randn(6, 9, generator=gen, dtype=DTYPE)
    base = min_norm_weights(gram_of(jac))
    for e in (-150, -40, 40, 150):
        assert torch.allclose(min_norm_weights(gram_of(jac * 10.0**e)), base, rtol=0, atol=1e-9)
    # Scaling by a power of two is exact, so the weights are bitwise equal.
    assert torch.equal(min_norm_weights(gram_of(jac * 2.0**-300)), base)


def test_solver_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="lower"):
        solve_simplex_qp([[1.0, 0.0], [0.0, 1.0]], [0.6, 0.6])
    with pytest.raises(ValueError, match="lower"):
        min_norm_weights(torch.eye(3, dtype=DTYPE), 0.5)
    with pytest.raises(ValueError, match="lower"):
        min_norm_weights(torch.eye(3, dtype=DTYPE), [0.1, 0.2])
    with pytest.raises(ValueError, match="lower"):
        solve_simplex_qp([[1.0, 0.0], [0.0, 1.0]], [0.1, math.nan])
    with pytest.raises(ValueError, match="gram"):
        solve_simplex_qp([[1.0, 0.0]])
    with pytest.raises(ValueError, match="gram"):
        solve_simplex_qp([[1.0, math.inf], [math.inf, 1.0]])
    with pytest.raises(ValueError, match="gram"):
        min_norm_weights(torch.ones(2, 3, dtype=DTYPE))


def test_non_finite_block_gives_nan_for_the_optimizer_to_skip() -> None:
    gram = torch.eye(3, dtype=DTYPE).repeat(2, 1, 1)
    gram[1, 0, 1] = math.nan
    out = min_norm_weights(gram)
    assert torch.allclose(out[0], torch.full((3,), 1.0 / 3, dtype=DTYPE))
    assert bool(torch.isnan(out[1]).all())


# ------------------------------------------------------------------------------- MGDA


@PROPS
@given(jacobians(), st.integers(1, 4))
def test_mgda_blocks_are_solved_independently(jac: Tensor, blocks: int) -> None:
    k = jac.shape[0]
    grams = torch.stack([gram_of(jac * (i + 1.0) ** 3 * (-1.0) ** i) for i in range(blocks)])
    agg = MGDA()
    coefs, state = agg(grams, {}, ctx(k=k))
    assert coefs.shape == (blocks, k) and state == {}
    for b in range(blocks):
        single, _ = agg(grams[b], {}, ctx(k=k))
        assert torch.equal(coefs[b], single)
        assert_kkt(grams[b], coefs[b])


def _unit_rows(jac: Tensor, divisors: Tensor) -> Tensor:
    return jac / divisors.unsqueeze(1)


def _direction_close(d: Tensor, ref: Tensor, rows: Tensor) -> None:
    scale = max(float(rows.norm(dim=1).max()), 1e-300)
    assert float((d - ref).norm()) <= 1e-5 * scale


@PROPS
@given(jacobians())
def test_mgda_l2_is_mgda_on_unit_rows(jac: Tensor) -> None:
    k = jac.shape[0]
    c, _ = MGDA("l2")(gram_of(jac), {}, ctx(k=k))
    norms = jac.norm(dim=1)
    divisors = torch.where(norms > 0, norms, torch.ones_like(norms))
    unit = _unit_rows(jac, divisors)
    alpha, _ = MGDA()(gram_of(unit), {}, ctx(k=k))
    assert torch.isfinite(c).all()
    _direction_close(jac.T @ c, unit.T @ alpha, unit)
    # c_i = alpha_i / ||g_i||: the weights of the unit rows lie on the simplex.
    assert float((c * divisors).sum()) == pytest.approx(1.0, abs=1e-9)


@PROPS
@given(jacobians(), st.data())
def test_mgda_loss_normalisations(jac: Tensor, data: st.DataObject) -> None:
    k = jac.shape[0]
    losses = data.draw(st.lists(st.floats(1e-3, 1e3), min_size=k, max_size=k))
    norms = jac.norm(dim=1)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    loss_t = torch.tensor(losses, dtype=DTYPE)
    for mode, divisors in (("loss", loss_t), ("loss+", loss_t * norms)):
        c, _ = MGDA(mode)(gram_of(jac), {}, ctx(losses))
        scaled = _unit_rows(jac, divisors)
        alpha, _ = MGDA()(gram_of(scaled), {}, ctx(k=k))
        assert torch.isfinite(c).all()
        _direction_close(jac.T @ c, scaled.T @ alpha, scaled)


def test_mgda_guards_zero_and_non_finite_divisors() -> None:
    gen = torch.Generator().manual_seed(5)
    jac = torch.randn(5, 7, generator=gen, dtype=DTYPE)
    jac[1] = 0.0
    losses = [2.0, 3.0, 0.0, math.inf, -1.0]
    divisors = torch.tensor([2.0, 3.0, 1.0, 1.0, 1.0], dtype=DTYPE)
    c, _ = MGDA("loss")(gram_of(jac), {}, ctx(losses))
    alpha, _ = MGDA()(gram_of(_unit_rows(jac, divisors)), {}, ctx(k=5))
    assert torch.isfinite(c).all()
    assert torch.allclose(c, alpha / divisors, atol=1e-12)
    for mode in ("l2", "loss+"):
        c, _ = MGDA(mode)(gram_of(jac), {}, ctx(losses))
        assert torch.isfinite(c).all()
    # All-zero Jacobian: no NaN, uniform weights.
    c, _ = MGDA("l2")(torch.zeros(3, 3, dtype=DTYPE), {}, ctx(k=3))
    assert torch.equal(c, torch.full((3,), 1.0 / 3, dtype=DTYPE))


def test_mgda_loss_mode_needs_the_losses() -> None:
    with pytest.raises(ValueError, match="normalization"):
        MGDA("loss")(torch.eye(3, dtype=DTYPE), {}, ctx([1.0, 2.0]))
    # "none" and "l2" do not read them.
    MGDA("l2")(torch.eye(3, dtype=DTYPE), {}, ctx([1.0, 2.0]))


@PROPS
@given(jacobians(min_k=2), st.integers(0, 2**31 - 1))
def test_mgda_relabelling_and_scaling(jac: Tensor, seed: int) -> None:
    k = jac.shape[0]
    gram = gram_of(jac)
    c, _ = MGDA()(gram, {}, ctx(k=k))
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    c_perm, _ = MGDA()(gram[perm][:, perm], {}, ctx(k=k))
    _direction_close(jac[perm].T @ c_perm, jac.T @ c, jac)
    c_scaled, _ = MGDA()(gram * 2.0**40, {}, ctx(k=k))
    assert torch.equal(c_scaled, c)


def test_single_task() -> None:
    """``alpha = [1]``; normalised MGDA returns ``1 / n_1`` for the unnormalised row."""
    gram = torch.tensor([[3.0]], dtype=DTYPE)
    for agg in (MGDA(), ParetoWeights(), ParetoWeights([0.5])):
        assert agg(gram, {}, ctx([2.0]))[0].tolist() == [1.0]
    assert MGDA("l2")(gram, {}, ctx([2.0]))[0].tolist() == pytest.approx([1.0 / math.sqrt(3.0)])
    assert MGDA("loss")(gram, {}, ctx([2.0]))[0].tolist() == pytest.approx([0.5])
    assert MGDA("loss+")(gram, {}, ctx([2.0]))[0].tolist() == pytest.approx([0.5 / math.sqrt(3.0)])


def test_mgda_coefficients_function_matches_the_class() -> None:
    gram = gram_of(torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=DTYPE))
    assert torch.equal(mgda_coefficients(gram.unsqueeze(0))[0], MGDA()(gram, {}, ctx(k=4))[0])


# ------------------------------------------------------------------------ Pareto (PE-LTR)


def _pareto_case(data: st.DataObject) -> Tuple[Tensor, List[float], Tensor, Tensor]:
    jac = data.draw(jacobians(min_k=2))
    low = data.draw(lower_bounds(jac.shape[0]))
    gram = gram_of(jac)
    w, _ = ParetoWeights(low)(gram, {}, ctx(k=jac.shape[0]))
    return gram, low, torch.tensor(low, dtype=DTYPE), w


@PROPS
@given(st.data())
def test_pareto_weights_respect_their_bounds(data: st.DataObject) -> None:
    gram, low, low_t, w = _pareto_case(data)
    assert float((w - low_t).min()) >= -FEAS_TOL
    assert float(w.sum()) == pytest.approx(1.0, abs=FEAS_TOL)
    assert_kkt(gram, w, low)


@PROPS
@given(st.data())
def test_pareto_is_no_worse_than_feasible_alternatives(data: st.DataObject) -> None:
    gram, low, low_t, w = _pareto_case(data)
    k = len(low)
    obj = objective(gram, w)
    alpha, _ = MGDA()(gram, {}, ctx(k=k))
    # The bounded feasible set is smaller: never better than MGDA ...
    mgda = objective(gram, alpha)
    assert obj >= mgda - obj_tol(mgda)
    # ... but no worse than MGDA's solution moved into the feasible set,
    moved = objective(gram, project_feasible(alpha, low_t))
    assert obj <= moved + obj_tol(moved)
    # ... nor than the paper's relax-then-project procedure,
    two_step = objective(gram, two_step_reference(gram, low_t))
    assert obj <= two_step + obj_tol(two_step)
    # ... and equal to MGDA whenever MGDA's weights already satisfy the bounds.
    if bool((alpha >= low_t).all()):
        assert obj == pytest.approx(mgda, abs=obj_tol(mgda))


@PROPS
@given(jacobians())
def test_pareto_with_zero_bounds_is_mgda(jac: Tensor) -> None:
    k = jac.shape[0]
    gram = gram_of(jac).repeat(2, 1, 1)
    mgda, _ = MGDA()(gram, {}, ctx(k=k))
    for bounds in (0.0, [0.0] * k):
        w, _ = ParetoWeights(bounds)(gram, {}, ctx(k=k))
        assert torch.equal(w, mgda)


def test_pareto_scalar_bound_applies_to_every_task() -> None:
    gram = gram_of(torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=DTYPE))
    a, _ = ParetoWeights(0.2)(gram, {}, ctx(k=4))
    b, _ = ParetoWeights([0.2] * 4)(gram, {}, ctx(k=4))
    c, _ = ParetoWeights(torch.full((4,), 0.2))(gram, {}, ctx(k=4))
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-7)
    assert float(a.min()) >= 0.2 - FEAS_TOL


# --------------------------------------------------------------------- arguments, registry


@pytest.mark.parametrize("bad", ["L2", "bogus", "", None])
def test_mgda_rejects_unknown_normalization(bad: object) -> None:
    with pytest.raises(ValueError, match="normalization"):
        MGDA(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", [-0.1, 1.0, 1.5, math.nan, math.inf, [0.5, 0.6], [0.2, -0.1], [], ["a"], [0.2, 1.0], "x"]
)
def test_pareto_rejects_invalid_lower_bounds(bad: object) -> None:
    with pytest.raises(ValueError, match="lower_bounds"):
        ParetoWeights(bad)  # type: ignore[arg-type]


def test_pareto_checks_the_bounds_against_the_number_of_tasks() -> None:
    with pytest.raises(ValueError, match="lower_bounds"):
        ParetoWeights([0.1, 0.2])(torch.eye(3, dtype=DTYPE), {}, ctx(k=3))
    with pytest.raises(ValueError, match="lower_bounds"):
        ParetoWeights(0.4)(torch.eye(3, dtype=DTYPE), {}, ctx(k=3))
    ParetoWeights(0.25)(torch.eye(4, dtype=DTYPE), {}, ctx(k=4))  # K c = 1 is feasible


def test_registry_and_repr() -> None:
    assert AGGREGATORS["mgda"] is MGDA and AGGREGATORS["pareto"] is ParetoWeights
    agg = get_aggregator("mgda", normalization="loss+")
    assert isinstance(agg, MGDA) and repr(agg) == "MGDA(normalization='loss+')"
    par = get_aggregator("pareto", lower_bounds=[0.1, 0.2])
    assert isinstance(par, ParetoWeights) and repr(par) == "ParetoWeights(lower_bounds=(0.1, 0.2))"
    assert not MGDA.needs_jacobian and not ParetoWeights.needs_jacobian
