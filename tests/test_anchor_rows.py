"""Row-based surgeries agree with their anchors on the same Jacobians.

- TorchJD 0.18 has ``GradDrop``, ``TrimmedMean`` and ``ExcessMTL``: our update on the
  same ``(K, P)`` Jacobian equals the aggregator's output, same scale, to 1e-5 relative
  (GradDrop with the same uniform draws: TorchJD draws from torch's global generator,
  we from the optimizer's, so both are seeded alike). ExcessMTL is stateful: compared
  over several consecutive Jacobians, with and without warm-up.
- LibMTL's ``GradDrop`` (PyPI 1.1.5) works on a representation: driven with one sample
  whose input signs are all +1 it is the parameter-row form, up to its ``1e-7`` in the
  sign purity's denominator.
- LibMTL's ``DB_MTL`` and ``MoCo`` are only on its GitHub (not in the PyPI release): the
  tests read them from a LibMTL source tree, ``$LIBMTL_SOURCE`` (a checkout or a git
  directory), and skip when it is not set. Their classes
  are driven with a stand-in ``self`` (``task_num``, ``device``, ``_compute_grad``,
  ``_reset_grad``): the losses are ``L = c + J x`` at ``x = 0``, so their own autograd
  (through ``log`` for DB-MTL) sees the Jacobian ``J`` and the loss values ``c``; the
  shared gradient they write is compared with ours over several steps.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from libmtl import load_weighting
from torch import Tensor

from multitask_optim.aggregators import (
    DBMTL,
    AggregationContext,
    ExcessMTL,
    GradDrop,
    MoCo,
    RowAggregator,
    TrimmedMean,
)

ta = pytest.importorskip("torchjd.aggregation")

RTOL = 1e-5


def rel(ours: Tensor, theirs: Tensor) -> float:
    scale = max(float(theirs.double().norm()), 1e-30)
    return float((ours.double() - theirs.double()).norm()) / scale


def jacobian(seed: int, k: int, p: int, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(k, p, generator=g, dtype=torch.float64)
    jac = jac + [0.0, 0.5, 2.0][seed % 3] * torch.randn(1, p, generator=g, dtype=torch.float64)
    jac = jac * 10.0 ** (torch.rand(k, 1, generator=g, dtype=torch.float64) - 0.5)
    return jac.to(dtype)


def run_ours(
    method: RowAggregator,
    jac: Tensor,
    state: Dict[str, Tensor],
    seed: int = 0,
    losses: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    gram = (jac.double() @ jac.double().T).unsqueeze(0)
    k = jac.shape[0]
    values = torch.ones(k, dtype=torch.float64) if losses is None else losses.double()
    ctx = AggregationContext(torch.Generator().manual_seed(seed), values, 0)
    updates, _, new_state = method.aggregate_rows([jac], gram, state, ctx)
    return updates[0], new_state


# ---------------------------------------------------------------------- TorchJD
CASES = [(seed, 2 + seed % 7, [7, 64, 500][seed % 3]) for seed in range(12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("leak", [None, "per-task"])
def test_graddrop_equals_torchjd_with_the_same_draws(dtype: torch.dtype, leak: Optional[str]) -> None:
    worst = 0.0
    for seed, k, p in CASES:
        jac = jacobian(seed, k, p, dtype)
        jac[:, :3] = 0.0  # coordinates every task leaves at 0
        leaks = None if leak is None else torch.linspace(0.0, 1.0, k, dtype=dtype)
        ours, _ = run_ours(GradDrop() if leaks is None else GradDrop(leaks.tolist()), jac, {}, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            theirs = ta.GradDrop(leak=leaks)(jac)
        worst = max(worst, rel(ours, theirs))
    assert worst <= RTOL, worst


@pytest.mark.parametrize("trim_number", [0, 1, 2])
def test_trimmed_mean_equals_torchjd(trim_number: int) -> None:
    for seed, k, p in CASES:
        k = max(k, 2 * trim_number + 1)
        jac = jacobian(seed, k, p)
        ours, _ = run_ours(TrimmedMean(trim_number), jac, {})
        assert rel(ours, ta.TrimmedMean(trim_number)(jac)) <= RTOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("warmup", [0, 1, 3])
@pytest.mark.parametrize("step_size", [0.1, 1.0])
def test_excess_mtl_is_k_times_torchjd_over_several_steps(
    dtype: torch.dtype, warmup: int, step_size: float
) -> None:
    """Our weights sum to K (the authors' code), TorchJD's to 1; TorchJD's warm-up 0 updates
    with the raw excess risk on its first call, ours (the authors') only measures it, as
    TorchJD's warm-up 1 does."""
    worst = 0.0
    for k in (2, 3, 5):
        ours_method, theirs = ExcessMTL(step_size, warmup), ta.ExcessMTL(step_size, max(warmup, 1))
        state = ours_method.init_state(k, 1)
        for step in range(8):
            jac = jacobian(100 * k + step, k, 40, dtype) * (0.3 + 0.1 * step)
            ours, state = run_ours(ours_method, jac, state)
            worst = max(worst, rel(ours, k * theirs(jac)))
    assert worst <= RTOL, worst


# ---------------------------------------------------------------------- LibMTL
def _load_libmtl(name: str, tmp: Path) -> type:
    """LibMTL's weighting class ``name`` without running ``LibMTL/__init__.py`` (torchvision)."""
    return getattr(load_weighting(name, tmp), name)


class _Driver:
    """Runs a LibMTL weighting on given Jacobians and loss values, step after step."""

    def __init__(self, cls: type, k: int, p: int) -> None:
        shared = torch.zeros(p)

        class Driver(cls):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.task_num, self.device, self.rep_grad = k, torch.device("cpu"), False
                self.x = shared.clone().requires_grad_(True)
                self.result: Optional[Tensor] = None
                # ExcessMTL backpropagates its weighted sum itself: the update is then x.grad.
                self.encoder = SimpleNamespace(zero_grad=lambda: setattr(self.x, "grad", None))

            def _compute_grad_dim(self) -> None:
                self.grad_index, self.grad_dim = [p], p

            def _compute_grad(self, losses: Tensor, mode: str, rep_grad: bool = False) -> Tensor:
                rows = [torch.autograd.grad(losses[i], self.x, retain_graph=True)[0] for i in range(k)]
                return torch.stack(rows)

            def _get_grads(self, losses: Tensor, mode: str) -> Tensor:
                return self._compute_grad(losses, mode)

            def _reset_grad(self, new_grads: Tensor) -> None:
                self.result = new_grads.detach().clone()

        self.weighting = Driver()
        self.weighting.init_param()

    def step(self, jac: Tensor, values: Tensor, **kwargs: Any) -> Tensor:
        w = self.weighting
        losses = values.float() + jac.float() @ w.x  # L = c + J x at x = 0: gradient J, value c
        w.result = None
        w.backward(losses, **kwargs)
        result = w.x.grad if w.result is None else w.result
        assert result is not None
        return result.detach().clone()


def _libmtl_agreement(
    name: str, ours: RowAggregator, kwargs: Dict[str, Any], tmp: Path, steps: int = 6
) -> float:
    cls = _load_libmtl(name, tmp)
    worst = 0.0
    for k in (2, 3, 5):
        p = 120
        driver, state = _Driver(cls, k, p), ours.init_state(k, 1)
        for step in range(steps):
            jac = jacobian(31 * k + step, k, p)
            g = torch.Generator().manual_seed(7 * k + step)
            values = (10.0 ** (2 * torch.rand(k, generator=g) - 1)).float()  # 0.1 .. 10
            mine, state = run_ours(ours, jac, state, losses=values.double())
            worst = max(worst, rel(mine, driver.step(jac, values, **kwargs)))
    return worst


def test_db_mtl_equals_libmtl_over_several_steps(tmp_path: Path) -> None:
    for beta, sigma in ((0.9, 0.0), (0.5, 0.5)):
        worst = _libmtl_agreement(
            "DB_MTL", DBMTL(beta, sigma), {"DB_beta": beta, "DB_beta_sigma": sigma}, tmp_path
        )
        assert worst <= RTOL, (beta, sigma, worst)


def test_moco_equals_libmtl_over_several_steps(tmp_path: Path) -> None:
    for beta, gamma, rho in ((0.5, 0.1, 0.0), (0.9, 1.0, 0.1)):
        kwargs = {"MoCo_beta": beta, "MoCo_beta_sigma": 0.5, "MoCo_gamma": gamma, "MoCo_gamma_sigma": 0.5}
        kwargs["MoCo_rho"] = rho
        worst = _libmtl_agreement("MoCo", MoCo(beta, 0.5, gamma, 0.5, rho), kwargs, tmp_path)
        assert worst <= RTOL, (beta, gamma, rho, worst)


def test_excess_mtl_equals_libmtl_over_several_steps(tmp_path: Path) -> None:
    """LibMTL's ExcessMTL is the authors' code: first step stores the baseline, weights sum to K."""
    for step_size in (1e-2, 1.0):
        worst = _libmtl_agreement(
            "ExcessMTL", ExcessMTL(step_size), {"robust_step_size": step_size}, tmp_path, steps=10
        )
        assert worst <= RTOL, (step_size, worst)


class _Rep:
    """LibMTL's representation stand-in: one sample whose input signs are all +1."""

    def __init__(self, p: int) -> None:
        self.p = p
        self.captured: List[Tensor] = []

    def sign(self) -> Tensor:
        return torch.ones(1, self.p)

    def unsqueeze(self, dim: int) -> Tensor:
        return torch.ones(1, 1, self.p)

    def backward(self, grad: Tensor) -> None:
        self.captured.append(grad.reshape(-1).clone())


def test_graddrop_equals_libmtl_on_one_positive_sample(tmp_path: Path) -> None:
    cls = _load_libmtl("GradDrop", tmp_path)
    worst = 0.0
    for seed, k, p in CASES:
        jac = jacobian(seed, k, p)
        rep = _Rep(p)
        weighting = cls()
        weighting.task_num, weighting.rep_grad, weighting.rep = k, True, rep
        weighting._compute_grad = lambda losses, mode, rep_grad=False, jac=jac: jac.unsqueeze(1).clone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            weighting.backward([None] * k, leak=0.0)
        ours, _ = run_ours(GradDrop(), jac, {}, seed=seed)
        worst = max(worst, rel(ours, rep.captured[0]))
    assert worst <= RTOL, worst
