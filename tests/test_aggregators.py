"""Property tests of the Gram-space pairwise surgeries (the project design (DESIGN.md,
shared with the developers), sections 3 and 4).

The aggregators only ever see the Gram matrix ``G = J J^T``; ``tests/reference.py``
runs the same algorithms as plain vector loops over the explicit ``J``. Every property
is checked on every backend of the coefficient functions (plain Python floats for small
``B * K``, vectorised NumPy otherwise, vectorised torch when NumPy is missing) by forcing
``SCALAR_LIMIT`` (and hiding NumPy).

Tolerances: comparisons are made on update vectors ``J^T c`` (coefficients themselves
are not unique when ``J`` is rank deficient), relative to the scale of the rows. PCGrad
and GradVac with zero targets are well conditioned and compared at ``1e-9``. GradVac
with non-zero targets is not, in any Gram-space implementation: ``sin(phi)`` comes from
``||g_i'||^2 - <g_i', g_j>^2 / ||g_j||^2`` (error ``sqrt(eps)`` for near-parallel
pairs) and a running gradient shrunk to ``r ||g_i||`` has its cosine known only to
``eps / r^2``. :func:`gradvac_error_bounds` turns the reference's per-pair trace into a
first-order error bound; on well-conditioned inputs it is ``1e-9`` as well.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Union

import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from profiles import examples
from reference import (
    RELATIVE_ZERO,
    PairVisit,
    gradvac_reference,
    gradvac_reference_rows,
    pcgrad_reference,
    update_from_coefficients,
)
from torch import Tensor

import multitask_optim.aggregators.gradvac as gradvac_module
import multitask_optim.aggregators.pcgrad as pcgrad_module
from multitask_optim.aggregators import (
    AggregationContext,
    GradVac,
    PCGrad,
    Sum,
    gradvac_coefficients,
    pcgrad_coefficients,
    random_orders,
)

EPS = torch.finfo(torch.float64).eps
RTOL = 1e-9
#: Margin of the first-order GradVac error bound over the observed errors.
SAFETY = 4.0
BACKENDS = ["scalar", "vector", "torch"]
#: The invariances on the torch backend (NumPy's stand-in) are slow-only: every backend
#: equals the same vector-loop reference (the tests above them), whose invariances the
#: other two backends check by default.
INVARIANCE_BACKENDS = ["scalar", "vector", pytest.param("torch", marks=pytest.mark.slow)]
REDUCTIONS = ["sum", "mean"]
#: Examples per property under the default profile (x10 under ``thorough``): the Gram-space
#: results against the vector-loop reference draw the most; the invariances draw as many
#: as the contract suite's, which runs the same properties over every aggregator.
REFERENCE = settings(max_examples=examples(40))
PROPERTIES = settings(max_examples=examples(30))
INVARIANCES = settings(max_examples=examples(20))


# ----------------------------------------------------------------------------- helpers


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the plain-float (``"scalar"``), NumPy (``"vector"``) or torch (``"torch"``) backend."""
    limit = 10**9 if name == "scalar" else 0
    saved = (pcgrad_module.SCALAR_LIMIT, gradvac_module.SCALAR_LIMIT, pcgrad_module.np, gradvac_module.np)
    pcgrad_module.SCALAR_LIMIT = limit
    gradvac_module.SCALAR_LIMIT = limit
    if name == "torch":
        pcgrad_module.np = gradvac_module.np = None
    try:
        yield
    finally:
        pcgrad_module.SCALAR_LIMIT, gradvac_module.SCALAR_LIMIT, pcgrad_module.np, gradvac_module.np = saved


def gram_of(jacs: List[Tensor]) -> Tensor:
    """``(B, K, K)`` Gram matrices of the blocks."""
    return torch.stack([j @ j.T for j in jacs])


def max_row_norm(jac: Tensor) -> float:
    return float(jac.norm(dim=1).max()) if jac.numel() else 0.0


def reduce_scale(k: int, reduction: str) -> float:
    """How many rows add up in the update: ``K`` for a sum, 1 for a mean."""
    return float(k) if reduction == "sum" else 1.0


def assert_vectors_close(got: Tensor, expected: Tensor, atol: Union[float, Tensor], what: str) -> None:
    """``|got - expected| <= atol`` elementwise (``atol`` a float or a broadcastable tensor)."""
    assert torch.isfinite(got).all(), f"{what}: non-finite entries in {got}"
    err = (got - expected).abs()
    bad = err > atol
    if bad.any():
        excess = (err - atol)[bad].max()
        worst = int((err - atol).argmax())
        tol = float(atol) if not isinstance(atol, Tensor) else float(atol.flatten()[worst])
        raise AssertionError(
            f"{what}: {int(bad.sum())} entries off; worst error {float(err.flatten()[worst]):.3e} "
            f"> tolerance {tol:.3e} (excess {float(excess):.3e}) at flat index {worst}"
        )


def gradvac_error_bounds(trace: List[PairVisit], jac: Tensor, beta: float) -> tuple[float, Tensor]:
    """First-order bounds on the rounding error of a Gram-space GradVac.

    Walks the reference trace row by row, carrying ``drift``, a bound on the absolute
    error of the running ``g_i'`` in units of ``||g_i||``: ``eps_g`` per visit (rounding
    of the Gram entries and of the coefficient-space updates), times ``1 + |cot phi_hat|``
    per correction (the Lipschitz constant of the correction), plus the error of the
    Gram-space ``||g_i' - proj_j g_i'||`` (``eps_g / (r sin phi)``, at most
    ``sqrt(eps_g)``) times ``|cot phi_hat|``. A cosine read at relative norm ``r`` is off
    by ``eps_g / r^2 + 2 drift / r``. Where ``r`` is within that error of the cancellation
    threshold ``RELATIVE_ZERO`` the two sides may disagree on whether ``g_i'`` is zero,
    so that pair's target is free and its correction (at most ``(2 + |cot|) r``) counts
    as error. Checked over thousands of random draws: the observed errors stay below a
    third of this bound; ``SAFETY`` multiplies it.

    Returns:
        ``(update_atol, target_atol (K, K))``: absolute bounds on the error of
        ``sum_i g_i'`` and of the new targets (without the ``RTOL`` floor).
    """
    k, p = jac.shape
    eps_g = EPS * (4.0 * k + 2.0 * math.sqrt(p))
    norms = jac.norm(dim=1).tolist()
    target_atol = torch.zeros(k, k, dtype=torch.float64)
    drift = [eps_g] * k
    for visit in trace:
        i, r = visit.i, visit.rel_norm
        if norms[i] == 0.0 or norms[visit.j] == 0.0:
            continue  # phi = 0 and no correction, exactly, in both
        cot = abs(visit.target) / math.sqrt(1.0 - visit.target**2)
        # ||g_i'||^2 in Gram space is off by (eps_g + 2 r drift) ||g_i||^2: near the
        # cancellation threshold either side may decide that g_i' is zero.
        if abs(r**2 - RELATIVE_ZERO**2) <= SAFETY * (eps_g + 2.0 * r * drift[i]):
            target_atol[i, visit.j] = 2.0 * SAFETY * beta
            drift[i] += r * (2.0 + cot)
            continue
        if not visit.valid:
            continue
        phi_err = min(2.0, eps_g / r**2 + 2.0 * drift[i] / r)
        target_atol[i, visit.j] = SAFETY * beta * phi_err
        if visit.corrected:
            sin_err = min(eps_g / (r * max(visit.sin_phi, 1e-300)), math.sqrt(eps_g))
            drift[i] = drift[i] * (1.0 + cot) + eps_g + cot * sin_err
    update_atol = SAFETY * sum(d * n for d, n in zip(drift, norms))
    return update_atol, target_atol


# -------------------------------------------------------------------------- strategies


@st.composite
def jacobians(
    draw: st.DrawFn,
    k: Optional[int] = None,
    max_k: int = 16,
    min_p: int = 1,
    max_p: int = 300,
    nonnegative: bool = False,
    min_exp: float = -20.0,
    max_exp: float = 20.0,
) -> Tensor:
    """A ``(K, P)`` float64 Jacobian generated by torch from a drawn seed.

    Mixes full-rank and rank-deficient rows, optional per-row scales (1e-3..1e3),
    duplicated / opposite / rescaled copies of rows, zero rows, and a per-matrix scale
    ``10^U(min_exp, max_exp)``.
    """
    if k is None:
        k = draw(st.integers(1, max_k), label="K")
    p = draw(st.one_of(st.integers(min_p, max(min_p, 4)), st.integers(min_p, max_p)), label="P")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    rank = draw(st.integers(1, k), label="rank")
    if rank < k:
        left = torch.randn(k, rank, generator=gen, dtype=torch.float64)
        jac = left @ torch.randn(rank, p, generator=gen, dtype=torch.float64)
    else:
        jac = torch.randn(k, p, generator=gen, dtype=torch.float64)
    if nonnegative:
        jac = jac.abs()
    if draw(st.booleans(), label="row scales"):
        jac = jac * 10.0 ** (torch.rand(k, 1, generator=gen, dtype=torch.float64) * 6.0 - 3.0)
    factors = [1.0, 2.0, 0.5] if nonnegative else [1.0, -1.0, 2.0, -3.0, 0.5, -0.25]
    for _ in range(draw(st.integers(0, min(3, k - 1)), label="copies")):
        src = draw(st.integers(0, k - 1))
        dst = draw(st.integers(0, k - 1))
        jac[dst] = draw(st.sampled_from(factors)) * jac[src]
    for row in draw(st.sets(st.integers(0, k - 1), max_size=min(2, k - 1)), label="zero rows"):
        jac[row] = 0.0
    return jac * 10.0 ** draw(st.floats(min_exp, max_exp), label="log10 scale")


@dataclass
class Problem:
    """``B`` blocks sharing ``K`` tasks, with their visiting orders and GradVac targets."""

    jacs: List[Tensor]
    orders: Tensor
    targets: Tensor
    beta: float

    @property
    def k(self) -> int:
        return self.jacs[0].shape[0]

    @property
    def gram(self) -> Tensor:
        return gram_of(self.jacs)


@st.composite
def problems(draw: st.DrawFn, max_blocks: int = 3, zero_targets: bool = False, **kwargs) -> Problem:
    """Blocks drawn by :func:`jacobians`, orders from :func:`random_orders`, targets in
    ``(-0.999, 0.999)`` (or all zero) and ``beta`` in ``[0, 1]``."""
    k = draw(st.integers(1, 16), label="K")
    blocks = draw(st.integers(1, max_blocks), label="B")
    jacs = [draw(jacobians(k=k, **kwargs)) for _ in range(blocks)]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="order seed"))
    orders = random_orders(blocks, k, gen)
    if zero_targets:
        targets = torch.zeros(blocks, k, k, dtype=torch.float64)
    else:
        targets = (torch.rand(blocks, k, k, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * 0.999
    beta = draw(st.sampled_from([0.0, 0.01, 0.5, 1.0]) | st.floats(0.0, 1.0), label="beta")
    return Problem(jacs, orders, targets, beta)


def relabel(problem: Problem, perm: Tensor) -> Problem:
    """Task ``i`` becomes task ``perm[i]``: rows, orders and targets move together."""
    inv = perm.argsort()
    jacs = [j[inv] for j in problem.jacs]
    orders = perm[problem.orders][:, inv]
    targets = problem.targets[:, inv][:, :, inv]
    return Problem(jacs, orders, targets, problem.beta)


# ------------------------------------------------------------- Gram space == reference


@pytest.mark.parametrize("which", BACKENDS)
@REFERENCE
@given(problem=problems(), reduction=st.sampled_from(REDUCTIONS))
def test_pcgrad_matches_vector_reference(problem: Problem, which: str, reduction: str) -> None:
    with backend(which):
        coefs = pcgrad_coefficients(problem.gram, problem.orders, reduction)
    assert coefs.shape == (len(problem.jacs), problem.k)
    assert coefs.dtype == torch.float64
    for b, jac in enumerate(problem.jacs):
        expected = pcgrad_reference(jac, problem.orders[b], reduction)
        got = update_from_coefficients(jac, coefs[b])
        atol = RTOL * max_row_norm(jac) * reduce_scale(problem.k, reduction)
        assert_vectors_close(got, expected, atol, f"block {b}")


@pytest.mark.parametrize("which", BACKENDS)
@REFERENCE
@given(
    problem=problems(zero_targets=False) | problems(zero_targets=True), reduction=st.sampled_from(REDUCTIONS)
)
def test_gradvac_matches_vector_reference(problem: Problem, which: str, reduction: str) -> None:
    """Random targets in (-0.999, 0.999), or all zero (the state after ``init_state``)."""
    with backend(which):
        coefs, new_targets = gradvac_coefficients(
            problem.gram, problem.orders, problem.targets, problem.beta, reduction
        )
    assert coefs.shape == (len(problem.jacs), problem.k)
    assert new_targets.shape == problem.targets.shape
    for b, jac in enumerate(problem.jacs):
        trace: List[PairVisit] = []
        rows, expected_targets = gradvac_reference_rows(
            jac, problem.orders[b], problem.targets[b], problem.beta, trace
        )
        update_atol, target_atol = gradvac_error_bounds(trace, jac, problem.beta)
        div = problem.k / reduce_scale(problem.k, reduction)
        scale = max(max_row_norm(jac), max_row_norm(rows)) * reduce_scale(problem.k, reduction)
        note(f"block {b}: update bound {update_atol / div:.3e}, scale {scale:.3e}")
        expected = rows.sum(dim=0) / div
        got = update_from_coefficients(jac, coefs[b])
        assert_vectors_close(got, expected, RTOL * scale + update_atol / div, f"block {b} update")
        assert_vectors_close(new_targets[b], expected_targets, RTOL + target_atol, f"block {b} targets")


@pytest.mark.parametrize("which", BACKENDS)
@settings(max_examples=examples(4))
@given(problem=problems(max_blocks=1, min_p=1500, max_p=3000), method=st.sampled_from(["pcgrad", "gradvac"]))
def test_large_p_matches_vector_reference(problem: Problem, method: str, which: str) -> None:
    """A few examples with thousands of parameters."""
    jac = problem.jacs[0]
    with backend(which):
        if method == "pcgrad":
            coefs = pcgrad_coefficients(problem.gram, problem.orders)
            expected = pcgrad_reference(jac, problem.orders[0])
            atol = 0.0
        else:
            coefs, _ = gradvac_coefficients(problem.gram, problem.orders, problem.targets, problem.beta)
            trace: List[PairVisit] = []
            rows, _ = gradvac_reference_rows(jac, problem.orders[0], problem.targets[0], problem.beta, trace)
            expected = rows.sum(dim=0)
            atol = gradvac_error_bounds(trace, jac, problem.beta)[0]
            atol += RTOL * max_row_norm(rows) * problem.k
    got = update_from_coefficients(jac, coefs[0])
    assert_vectors_close(got, expected, atol + RTOL * max_row_norm(jac) * problem.k, method)


# ------------------------------------------------------------------- PCGrad properties


@pytest.mark.parametrize("which", BACKENDS)
@PROPERTIES
@given(problem=problems(nonnegative=True), reduction=st.sampled_from(REDUCTIONS))
def test_pcgrad_without_conflict_is_exactly_the_sum(problem: Problem, which: str, reduction: str) -> None:
    """All ``<g_i, g_j> >= 0`` -> coefficients exactly 1 (or 1/K): plain ``sum(losses)``."""
    gram = problem.gram
    assert (gram >= 0).all()
    with backend(which):
        coefs = pcgrad_coefficients(gram, problem.orders, reduction)
    value = 1.0 if reduction == "sum" else 1.0 / problem.k
    assert torch.equal(coefs, torch.full_like(coefs, value))


@pytest.mark.parametrize("which", BACKENDS)
@given(jac=jacobians(k=2))
def test_pcgrad_two_tasks_never_conflicts_with_either_task(jac: Tensor, which: str) -> None:
    """K = 2: ``<d, g_0> >= 0`` and ``<d, g_1> >= 0`` (not true in general for K > 2)."""
    orders = torch.tensor([[[1], [0]]])
    with backend(which):
        coefs = pcgrad_coefficients(gram_of([jac]), orders)
    update = update_from_coefficients(jac, coefs[0])
    norms = jac.norm(dim=1)
    for i in range(2):
        inner = float(update @ jac[i])
        # rounding of d (|c| ~ 1) against g_i: a few eps of max |g| * |g_i|
        tol = 1e-12 * float(norms.max() * norms[i])
        assert inner >= -tol, f"<d, g_{i}> = {inner:.3e} < 0 (tol {tol:.1e})"


@st.composite
def two_rows(draw: st.DrawFn) -> Tensor:
    """Two generic rows (P >= 2) with independent scales, for the cosine-target test."""
    p = draw(st.integers(2, 300), label="P")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    jac = torch.randn(2, p, generator=gen, dtype=torch.float64)
    row_exps = torch.tensor(draw(st.lists(st.floats(-3.0, 3.0), min_size=2, max_size=2)), dtype=torch.float64)
    return jac * 10.0 ** row_exps.unsqueeze(1) * 10.0 ** draw(st.floats(-20.0, 20.0), label="log10 scale")


@pytest.mark.parametrize("which", BACKENDS)
@given(jac=two_rows(), frac=st.floats(0.05, 0.95))
def test_gradvac_moves_the_cosine_up_to_its_target(jac: Tensor, frac: float, which: str) -> None:
    """K = 2: after correcting ``g_0`` towards ``g_1``, ``cos(g_0', g_1) == phi_hat[0, 1]``."""
    norms = jac.norm(dim=1)
    cos = float(jac[0] @ jac[1] / (norms[0] * norms[1]))
    assume(-0.999 < cos < 0.98)  # below the highest target, and not near-parallel (ill-conditioned)
    target = max(cos, 0.0) + frac * (0.99 - max(cos, 0.0))
    # task 1 keeps its gradient: no cosine is below -1
    targets = torch.tensor([[[0.0, target], [-1.0, 0.0]]], dtype=torch.float64)
    orders = torch.tensor([[[1], [0]]])
    with backend(which):
        coefs, _ = gradvac_coefficients(gram_of([jac]), orders, targets, 0.5)
    assert coefs[0, 0] == 1.0
    corrected = update_from_coefficients(jac, coefs[0]) - jac[1]
    new_cos = float(corrected @ jac[1] / (corrected.norm() * norms[1]))
    assert abs(new_cos - target) <= 1e-9, (cos, target, new_cos)


@pytest.mark.parametrize("which", BACKENDS)
@PROPERTIES
@given(problem=problems(zero_targets=True), reduction=st.sampled_from(REDUCTIONS))
def test_gradvac_with_zero_targets_is_pcgrad(problem: Problem, which: str, reduction: str) -> None:
    """Equal up to the cancellation rule: once a row's running gradient is below
    ``RELATIVE_ZERO ||g_i||`` GradVac stops correcting it and PCGrad does not, so such a
    row may differ by at most ``2 RELATIVE_ZERO ||g_i||`` (both norms are below that)."""
    with backend(which):
        pc = pcgrad_coefficients(problem.gram, problem.orders, reduction)
        gv, _ = gradvac_coefficients(problem.gram, problem.orders, problem.targets, problem.beta, reduction)
    div = problem.k / reduce_scale(problem.k, reduction)
    for b, jac in enumerate(problem.jacs):
        trace: List[PairVisit] = []
        gradvac_reference_rows(jac, problem.orders[b], problem.targets[b], problem.beta, trace)
        norms = jac.norm(dim=1)
        floored = {v.i for v in trace if 0.0 < v.rel_norm <= 1.01 * RELATIVE_ZERO}
        slack = sum(3.0 * RELATIVE_ZERO * float(norms[i]) for i in floored) / div
        atol = RTOL * max_row_norm(jac) * reduce_scale(problem.k, reduction) + slack
        got = update_from_coefficients(jac, gv[b])
        assert_vectors_close(got, update_from_coefficients(jac, pc[b]), atol, f"block {b}")


# ------------------------------------------------------------ invariances (both methods)


def run_method(method: str, problem: Problem, gram: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(coefs, new_targets)``; PCGrad returns the input targets unchanged."""
    gram = problem.gram if gram is None else gram
    if method == "pcgrad":
        return pcgrad_coefficients(gram, problem.orders), problem.targets
    return gradvac_coefficients(gram, problem.orders, problem.targets, problem.beta)


def invariance_tolerances(method: str, problem: Problem, b: int) -> tuple[float, Tensor]:
    """Tolerances for comparing two Gram-space runs on equivalent inputs (twice the
    reference bound: each run is within one bound of the reference)."""
    jac = problem.jacs[b]
    scale = max_row_norm(jac) * problem.k
    if method == "pcgrad":
        return 2 * RTOL * scale, torch.zeros(problem.k, problem.k, dtype=torch.float64)
    trace: List[PairVisit] = []
    rows, _ = gradvac_reference_rows(jac, problem.orders[b], problem.targets[b], problem.beta, trace)
    update_atol, target_atol = gradvac_error_bounds(trace, jac, problem.beta)
    scale = max(scale, max_row_norm(rows) * problem.k)
    return 2 * (RTOL * scale + update_atol), 2 * (RTOL + target_atol)


METHODS = ["pcgrad", "gradvac"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", INVARIANCE_BACKENDS)
@INVARIANCES
@given(problem=problems(), log10_c=st.floats(-20.0, 20.0))
def test_positive_homogeneity(problem: Problem, log10_c: float, which: str, method: str) -> None:
    """``f(cJ) = c f(J)``: the coefficients from the Gram of ``cJ`` give the same update."""
    c = 10.0**log10_c
    scaled = Problem([c * j for j in problem.jacs], problem.orders, problem.targets, problem.beta)
    with backend(which):
        coefs, targets = run_method(method, problem)
        coefs_c, targets_c = run_method(method, scaled)
    for b, jac in enumerate(problem.jacs):
        update_atol, target_atol = invariance_tolerances(method, problem, b)
        d = update_from_coefficients(jac, coefs[b])
        d_c = update_from_coefficients(scaled.jacs[b], coefs_c[b]) / c
        assert_vectors_close(d_c, d, update_atol, f"block {b} update")
        assert_vectors_close(targets_c[b], targets[b], target_atol, f"block {b} targets")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", INVARIANCE_BACKENDS)
@INVARIANCES
@given(problem=problems(), exponent=st.integers(-60, 60))
def test_power_of_two_scaling_is_bitwise(problem: Problem, exponent: int, which: str, method: str) -> None:
    """Scaling G by ``4^m`` (J by ``2^m``) is exact in floating point, and so must the
    coefficients and targets be: every step of the surgery is a ratio of like powers."""
    with backend(which):
        coefs, targets = run_method(method, problem)
        coefs_s, targets_s = run_method(method, problem, problem.gram * 4.0**exponent)
    assert torch.equal(coefs, coefs_s)
    assert torch.equal(targets, targets_s)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", INVARIANCE_BACKENDS)
@INVARIANCES
@given(problem=problems(max_blocks=2, max_p=120), seed=st.integers(0, 2**32 - 1))
def test_rotation_equivariance(problem: Problem, seed: int, which: str, method: str) -> None:
    """``f(JQ) = f(J) Q`` for orthogonal ``Q``: the method depends on J only through G."""
    gen = torch.Generator().manual_seed(seed)
    rotations = [
        torch.linalg.qr(torch.randn(j.shape[1], j.shape[1], generator=gen, dtype=torch.float64))[0]
        for j in problem.jacs
    ]
    rotated = Problem(
        [j @ q for j, q in zip(problem.jacs, rotations)], problem.orders, problem.targets, problem.beta
    )
    with backend(which):
        coefs, targets = run_method(method, problem)
        coefs_q, targets_q = run_method(method, rotated)
    for b, (jac, q) in enumerate(zip(problem.jacs, rotations)):
        update_atol, target_atol = invariance_tolerances(method, problem, b)
        expected = update_from_coefficients(jac, coefs[b]) @ q
        got = update_from_coefficients(rotated.jacs[b], coefs_q[b])
        assert_vectors_close(got, expected, update_atol, f"block {b} update")
        assert_vectors_close(targets_q[b], targets[b], target_atol, f"block {b} targets")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", INVARIANCE_BACKENDS)
@INVARIANCES
@given(problem=problems(), perm_seed=st.integers(0, 2**32 - 1))
def test_relabelling_tasks_leaves_the_update_unchanged(
    problem: Problem, perm_seed: int, which: str, method: str
) -> None:
    perm = torch.randperm(problem.k, generator=torch.Generator().manual_seed(perm_seed))
    relabelled = relabel(problem, perm)
    with backend(which):
        coefs, targets = run_method(method, problem)
        coefs_p, targets_p = run_method(method, relabelled)
    for b, jac in enumerate(problem.jacs):
        update_atol, target_atol = invariance_tolerances(method, problem, b)
        got = update_from_coefficients(relabelled.jacs[b], coefs_p[b])
        assert_vectors_close(got, update_from_coefficients(jac, coefs[b]), update_atol, f"block {b} update")
        # task pair (i, j) is now (perm[i], perm[j])
        moved = targets_p[b][perm][:, perm]
        assert_vectors_close(moved, targets[b], target_atol, f"block {b} targets")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", INVARIANCE_BACKENDS)
@INVARIANCES
@given(problem=problems(), row_exps=st.lists(st.floats(-170.0, 5.0), min_size=16, max_size=16))
def test_zero_rows_and_tiny_norms_stay_finite(
    problem: Problem, row_exps: List[float], which: str, method: str
) -> None:
    """Rows rescaled to norms down to 1e-170 (squared norms underflow to subnormals or
    zero), on top of the zero rows the strategy already draws."""
    scales = 10.0 ** torch.tensor(row_exps[: problem.k], dtype=torch.float64).unsqueeze(1)
    tiny = Problem(
        [j / j.norm(dim=1, keepdim=True).clamp_min(1e-300) * scales for j in problem.jacs],
        problem.orders,
        problem.targets,
        problem.beta,
    )
    with backend(which):
        coefs, targets = run_method(method, tiny)
    assert torch.isfinite(coefs).all(), coefs
    assert torch.isfinite(targets).all(), targets
    assert (targets.abs() <= 1.0).all()


@pytest.mark.parametrize("which", BACKENDS)
def test_pcgrad_subnormal_squared_norm_is_finite(which: str) -> None:
    """Minimal case: ``g_1`` has norm 1e-160, so ``||g_1||^2 = 1e-320`` is subnormal and
    ``1 / ||g_1||^2`` overflows to inf; ``g_0`` and ``g_1`` do not conflict, so
    PCGrad must return exactly ``[1, 1]``."""
    jac = torch.tensor([[1.0, 0.0], [0.0, 1e-160]], dtype=torch.float64)
    orders = torch.tensor([[[1], [0]]])
    with backend(which):
        coefs = pcgrad_coefficients(gram_of([jac]), orders)
    assert torch.equal(coefs, torch.ones(1, 2, dtype=torch.float64)), coefs


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize(
    "jac",
    [
        torch.tensor([[1.0], [-1.0]]),  # opposite, P = 1: the correction cancels g_0
        torch.tensor([[1.0], [-2.0], [3.0]]),
        torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]),  # and a zero row
        torch.tensor([[0.0, 0.0], [0.0, 0.0]]),
        torch.tensor([[1e-300, 0.0], [-1e-300, 1e-300]]),
    ],
)
def test_degenerate_inputs_stay_finite(jac: Tensor, which: str) -> None:
    jac = jac.to(torch.float64)
    k = jac.shape[0]
    gen = torch.Generator().manual_seed(0)
    orders = random_orders(1, k, gen)
    targets = (torch.rand(1, k, k, generator=gen, dtype=torch.float64) * 2 - 1) * 0.999
    with backend(which):
        pc = pcgrad_coefficients(gram_of([jac]), orders)
        gv, new_targets = gradvac_coefficients(gram_of([jac]), orders, targets, 0.5)
    for out in (pc, gv, new_targets):
        assert torch.isfinite(out).all(), out
    expected_pc = pcgrad_reference(jac, orders[0])
    assert_vectors_close(
        update_from_coefficients(jac, pc[0]), expected_pc, RTOL * max_row_norm(jac) * k, "pc"
    )


def test_cancelled_running_gradient_counts_as_zero() -> None:
    """Opposite rows, P = 1, zero targets: ``g_0' = 0`` after visiting task 1, so the
    later pair (0, 2) sees ``phi = 0`` and its target moves to ``(1 - beta) phi_hat``."""
    jac = torch.tensor([[1.0], [-1.0], [1.0]], dtype=torch.float64)
    orders = torch.tensor([[[1, 2], [0, 2], [0, 1]]])
    targets = torch.zeros(1, 3, 3, dtype=torch.float64)
    targets[0, 0, 2] = 0.5
    for which in BACKENDS:
        with backend(which):
            coefs, new_targets = gradvac_coefficients(gram_of([jac]), orders, targets, 0.5)
        _, expected_targets = gradvac_reference(jac, orders[0], targets[0], 0.5)
        assert new_targets[0, 0, 1] == -0.5  # phi(g_0, g_1) = -1, halfway from 0
        assert new_targets[0, 0, 2] == 0.25  # phi = 0 for the cancelled g_0'
        assert torch.allclose(new_targets[0], expected_targets, rtol=0, atol=1e-12)
        assert torch.isfinite(coefs).all()


# ------------------------------------------------------------------------ random_orders


@given(blocks=st.integers(1, 4), k=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_random_orders_are_permutations_of_the_other_tasks(blocks: int, k: int, seed: int) -> None:
    orders = random_orders(blocks, k, torch.Generator().manual_seed(seed))
    assert orders.shape == (blocks, k, max(k - 1, 0))
    assert orders.dtype == torch.long
    for b in range(blocks):
        for i in range(k):
            assert sorted(orders[b, i].tolist()) == [j for j in range(k) if j != i]
    again = random_orders(blocks, k, torch.Generator().manual_seed(seed))
    assert torch.equal(orders, again)


def test_random_orders_cover_all_permutations() -> None:
    orders = random_orders(200, 4, torch.Generator().manual_seed(0))
    seen = {tuple(row) for row in orders[:, 0].tolist()}
    assert len(seen) == 6  # all 3! orders of {1, 2, 3} for task 0


def test_random_orders_advance_the_generator() -> None:
    gen = torch.Generator().manual_seed(0)
    first = random_orders(2, 6, gen)
    second = random_orders(2, 6, gen)
    assert not torch.equal(first, second)


# -------------------------------------------------------------------- aggregator classes


def context(seed: int, k: int) -> AggregationContext:
    return AggregationContext(torch.Generator().manual_seed(seed), torch.ones(k, dtype=torch.float64))


@given(problem=problems(), seed=st.integers(0, 2**32 - 1), reduction=st.sampled_from(REDUCTIONS))
def test_pcgrad_class_uses_the_generator_orders(problem: Problem, seed: int, reduction: str) -> None:
    agg = PCGrad(reduction)
    state = agg.init_state(problem.k, len(problem.jacs))
    coefs, new_state = agg(problem.gram, state, context(seed, problem.k))
    orders = random_orders(len(problem.jacs), problem.k, torch.Generator().manual_seed(seed))
    assert torch.equal(coefs, pcgrad_coefficients(problem.gram, orders, reduction))
    assert new_state == state


@given(problem=problems(), seed=st.integers(0, 2**32 - 1))
def test_gradvac_state_round_trip(problem: Problem, seed: int) -> None:
    blocks, k = len(problem.jacs), problem.k
    agg = GradVac(beta=problem.beta)
    state = agg.init_state(k, blocks)
    assert set(state) == {"targets"}
    assert state["targets"].shape == (blocks, k, k)
    assert state["targets"].dtype == torch.float64
    assert not state["targets"].any()
    ctx = context(seed, k)
    coefs, state1 = agg(problem.gram, state, ctx)
    assert not state["targets"].any(), "the input state must not be mutated"
    assert state1["targets"].shape == (blocks, k, k)
    assert state1["targets"].dtype == torch.float64
    # second step from the returned state, with the generator's next orders
    gen = torch.Generator().manual_seed(seed)
    orders1 = random_orders(blocks, k, gen)
    orders2 = random_orders(blocks, k, gen)
    expected1 = gradvac_coefficients(problem.gram, orders1, state["targets"], problem.beta)
    assert torch.equal(coefs, expected1[0])
    assert torch.equal(state1["targets"], expected1[1])
    coefs2, state2 = agg(problem.gram, state1, ctx)
    expected2 = gradvac_coefficients(problem.gram, orders2, state1["targets"], problem.beta)
    assert torch.equal(coefs2, expected2[0])
    assert torch.equal(state2["targets"], expected2[1])
    assert torch.isfinite(state2["targets"]).all()


def test_gradvac_resets_targets_of_the_wrong_shape() -> None:
    agg = GradVac()
    gram = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    coefs, state = agg(gram, agg.init_state(2, 1), context(0, 3))
    assert state["targets"].shape == (1, 3, 3)
    assert torch.equal(coefs, torch.ones(1, 3, dtype=torch.float64))


def test_two_dimensional_gram_gives_one_coefficient_vector() -> None:
    gram = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
    for agg in (PCGrad(), GradVac(), Sum()):
        coefs, _ = agg(gram, agg.init_state(2, 1), context(0, 2))
        assert coefs.shape == (2,)
    coefs, _ = PCGrad()(gram, {}, context(0, 2))
    assert torch.allclose(coefs, torch.tensor([1.5, 1.5], dtype=torch.float64), rtol=0, atol=1e-15)


@given(problem=problems(), reduction=st.sampled_from(REDUCTIONS))
def test_sum_gives_ones_or_one_over_k(problem: Problem, reduction: str) -> None:
    state = {"untouched": torch.ones(1)}
    coefs, new_state = Sum(reduction)(problem.gram, state, context(0, problem.k))
    value = 1.0 if reduction == "sum" else 1.0 / problem.k
    assert torch.equal(coefs, torch.full((len(problem.jacs), problem.k), value, dtype=torch.float64))
    assert new_state is state


def test_invalid_hyper_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="reduction"):
        PCGrad("max")
    with pytest.raises(ValueError, match="reduction"):
        GradVac(reduction="median")
    with pytest.raises(ValueError, match="beta"):
        GradVac(beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        GradVac(beta=-0.1)
    assert "beta=0.25" in repr(GradVac(beta=0.25))
    assert "mean" in repr(PCGrad("mean"))
