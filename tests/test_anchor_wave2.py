"""Second-wave aggregators agree with TorchJD 0.18 on the same Jacobians.

For every method TorchJD has, ``J^T c`` from our Gram-space coefficients is compared
with ``torchjd.aggregation.X(...)(J)`` (same scale, no constant factor), relative to
``max(||TorchJD's update||, 1e-3 max_i ||g_i||)`` (the floor only matters at
Pareto-stationary points where the update itself is ~0):

- UPGrad / DualProj: TorchJD's default projector adds a ridge ``1e-4`` to ``G / tr(G)``;
  ours with ``reg_eps=1e-4, norm_eps=1e-4`` matches it to 1e-5 (observed ~1e-12), and
  our default (the exact projection, the paper's) matches TorchJD with a negligible
  ridge (``reg_eps=1e-11``) on full-rank Jacobians.
- CAGrad: 1e-4 (TorchJD's Clarabel solve is the less accurate of the two: see
  ``test_aggregators_wave2.test_cagrad_attains_its_worst_case_improvement_bound``).
- FairGrad: 1e-3 (TorchJD solves with SciPy's ``least_squares``).
- IMTL-G, Aligned-MTL (three scale modes), ConFIG, Krum: 1e-5.
- Nash-MTL is checked on the paper's bargaining condition instead (TorchJD's port stops
  short of it), in ``test_aggregators_wave2``.
"""

from __future__ import annotations

from typing import Callable, List

import pytest
import torch
from torch import Tensor

from multitask_optim.aggregators import (
    IMTLG,
    AggregationContext,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    Krum,
    UPGrad,
)

ta = pytest.importorskip("torchjd.aggregation")


def needs(*modules: str) -> None:
    for name in modules:
        pytest.importorskip(name)


def jacobians(full_rank: bool, min_k: int = 2) -> List[Tensor]:
    out = []
    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        k = min_k + seed % (17 - min_k)
        p = [10, 50, 200][seed % 3] if full_rank else [3, 10, 50, 200][seed % 4]
        p = max(p, k + 2) if full_rank else p
        jac = torch.randn(k, p, generator=g, dtype=torch.float64)
        jac = jac + [0.0, 0.5, 2.0][seed % 3] * torch.randn(1, p, generator=g, dtype=torch.float64)
        jac = jac * 10.0 ** (torch.rand(k, 1, generator=g, dtype=torch.float64) - 0.5)
        if not full_rank and seed % 4 == 1:
            jac[1] = 2.0 * jac[0]
        out.append(jac)
    return out


def ours(agg: Aggregator, jac: Tensor) -> Tensor:
    k = jac.shape[0]
    ctx = AggregationContext(
        generator=torch.Generator().manual_seed(0), losses=torch.ones(k, dtype=torch.float64)
    )
    coefs, _ = agg(jac @ jac.T, agg.init_state(k, 1), ctx)
    return jac.T @ coefs


def max_relative_difference(
    mine: Callable[[], Aggregator], theirs: Callable[[], object], jacs: List[Tensor]
) -> float:
    worst = 0.0
    for jac in jacs:
        want = theirs()(jac)
        got = ours(mine(), jac)
        floor = 1e-3 * float(jac.norm(dim=1).max())
        worst = max(worst, float((got - want).norm()) / max(float(want.norm()), floor))
    return worst


def test_upgrad_with_torchjd_regularisation_matches_torchjd_default() -> None:
    needs("quadprog", "qpsolvers")
    diff = max_relative_difference(lambda: UPGrad(norm_eps=1e-4, reg_eps=1e-4), ta.UPGrad, jacobians(False))
    assert diff <= 1e-5


def test_dualproj_with_torchjd_regularisation_matches_torchjd_default() -> None:
    needs("quadprog", "qpsolvers")
    diff = max_relative_difference(
        lambda: DualProj(norm_eps=1e-4, reg_eps=1e-4), ta.DualProj, jacobians(False)
    )
    assert diff <= 1e-5


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_exact_projection_matches_torchjd_without_ridge(name: str) -> None:
    needs("quadprog", "qpsolvers")
    from torchjd._linalg import QuadprogProjector

    mine = UPGrad if name == "upgrad" else DualProj
    cls = ta.UPGrad if name == "upgrad" else ta.DualProj
    diff = max_relative_difference(
        mine, lambda: cls(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-11)), jacobians(True)
    )
    assert diff <= 1e-5


def test_upgrad_default_differs_from_torchjd_only_by_its_ridge() -> None:
    """Documented departure: TorchJD's ridge moves the result (up to ~1% here)."""
    needs("quadprog", "qpsolvers")
    diff = max_relative_difference(UPGrad, ta.UPGrad, jacobians(True))
    assert 1e-8 < diff <= 5e-2


@pytest.mark.parametrize("c", [0.4, 1.0])
def test_cagrad_matches_torchjd(c: float) -> None:
    """Within 1e-4, or else ours is the better solution of the paper's problem: in the
    ball ``||d - g_0|| <= c ||g_0||`` with a larger worst-case improvement
    ``min_i <g_i, d>`` (TorchJD's cvxpy/Clarabel solve stops early; with c = 1 one of
    these Jacobians gives 2.3e-4)."""
    needs("cvxpy", "clarabel")
    for jac in jacobians(True):
        want = ta.CAGrad(c=c)(jac)
        got = ours(CAGrad(c=c), jac)
        if float((got - want).norm()) <= 1e-4 * float(want.norm()):
            continue
        g0 = jac.mean(0)
        rho = c * float(g0.norm())
        assert float((got - g0).norm()) <= rho * (1 + 1e-9)
        assert float((jac @ got).min()) > float((jac @ want).min())
        assert float((got - want).norm()) <= 1e-3 * float(want.norm())


def test_imtl_g_matches_torchjd() -> None:
    assert max_relative_difference(IMTLG, ta.IMTLG, jacobians(False)) <= 1e-5


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_matches_torchjd(scale_mode: str) -> None:
    diff = max_relative_difference(
        lambda: AlignedMTL(scale_mode=scale_mode),
        lambda: ta.AlignedMTL(scale_mode=scale_mode),
        jacobians(False),
    )
    assert diff <= 1e-5


def test_aligned_mtl_preference_vector_matches_torchjd() -> None:
    jac = jacobians(True)[5]
    pref = torch.linspace(0.5, 2.0, jac.shape[0], dtype=torch.float64)
    diff = max_relative_difference(
        lambda: AlignedMTL(pref_vector=pref), lambda: ta.AlignedMTL(pref_vector=pref), [jac]
    )
    assert diff <= 1e-5


def test_config_matches_torchjd() -> None:
    assert max_relative_difference(ConFIG, ta.ConFIG, jacobians(True)) <= 1e-5


@pytest.mark.parametrize("n_byzantine, n_selected", [(0, 1), (1, 1), (1, 3)])
def test_krum_matches_torchjd(n_byzantine: int, n_selected: int) -> None:
    """``K >= f + 4``: with ``K = f + 3`` every score is one nearest-neighbour distance,
    the closest pair always ties, and TorchJD's ``topk`` and our lower-index rule may
    break the tie differently."""
    diff = max_relative_difference(
        lambda: Krum(n_byzantine, n_selected),
        lambda: ta.Krum(n_byzantine, n_selected),
        jacobians(False, min_k=n_byzantine + 4),
    )
    assert diff <= 1e-5


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_matches_torchjd(alpha: float) -> None:
    needs("scipy")
    diff = max_relative_difference(
        lambda: FairGrad(alpha=alpha), lambda: ta.FairGrad(alpha=alpha), jacobians(True)
    )
    assert diff <= 1e-3
