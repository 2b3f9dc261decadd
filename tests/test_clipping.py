"""Gradient clipping of the final update (issue 14): ``max_grad_norm=``.

The update the inner optimizer sees (after aggregation, before the inner step) is
scaled by ``min(1, max_norm / (total + 1e-6))`` with ``total`` its global 2-norm over
the model parameters, as ``torch.nn.utils.clip_grad_norm_`` does; ``last_stats``
reports the unclipped norm.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List

import pytest
import torch
from models import MultiHead, conflicting_losses, multihead
from torch import Tensor

from multitask_optim import MultiTaskOptimizer
from multitask_optim._clipping import clip_, total_norm

#: Runs on every available device (the CPU always, CUDA when present).
pytestmark = pytest.mark.devices

K = 3


def model_of(seed: int = 0) -> MultiHead:
    return multihead(K, seed)


def losses_of(model: MultiHead, step: int, scale: float = 1.0) -> List[Tensor]:
    return conflicting_losses(model, 7 * step + 2, scale)


def captured(opt: MultiTaskOptimizer, model: MultiHead) -> Dict[int, Tensor]:
    """``.grad`` of every model parameter just before the inner step."""
    grads: Dict[int, Tensor] = {}

    def pre(optimizer, args, kwargs) -> None:
        grads.clear()
        grads.update(
            {n: p.grad.detach().clone() for n, p in enumerate(model.parameters()) if p.grad is not None}
        )

    opt.optimizer.register_step_pre_hook(pre)
    return grads


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_max_grad_norm_is_refused_naming_the_argument(bad) -> None:
    with pytest.raises(ValueError, match="max_grad_norm"):
        MultiTaskOptimizer(torch.optim.SGD(model_of().parameters(), lr=0.1), max_grad_norm=bad)


@pytest.mark.parametrize("surgery", ["pcgrad", "mgda", None])
@pytest.mark.parametrize("surgery_every", [1, 2])
def test_the_update_is_clipped_to_the_global_norm_and_the_unclipped_norm_reported(
    surgery, surgery_every
) -> None:
    model = model_of()
    other = copy.deepcopy(model)
    kw = {"surgery": surgery, "seed": 1, "num_tasks": K, "surgery_every": surgery_every}
    clipped = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=0.05, **kw)
    free = MultiTaskOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), **kw)
    got, want = captured(clipped, model), captured(free, other)
    for step in range(3):
        other.load_state_dict(model.state_dict())
        for opt, m in ((clipped, model), (free, other)):
            opt.zero_grad()
            opt.step(losses_of(m, step))
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in want.values()))
        assert clipped.last_stats["grad_norm"] == pytest.approx(norm, rel=1e-6)
        assert norm > 0.05  # the case clips
        coef = 0.05 / (norm + 1e-6)
        for key, g in want.items():
            torch.testing.assert_close(got[key], g * coef, rtol=1e-5, atol=1e-9)
        assert math.sqrt(sum(float(g.double().pow(2).sum()) for g in got.values())) <= 0.05 * (1 + 1e-5)


def test_plain_configuration_with_clipping_matches_clip_grad_norm() -> None:
    model = model_of()
    other = copy.deepcopy(model)
    opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), surgery=None, max_grad_norm=0.1)
    inner = torch.optim.Adam(other.parameters(), lr=1e-2)
    for step in range(4):
        opt.zero_grad()
        opt.step(losses_of(model, step))
        inner.zero_grad()
        sum(losses_of(other, step)).backward()
        norm = torch.nn.utils.clip_grad_norm_(other.parameters(), 0.1)
        inner.step()
        assert opt.last_stats["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
        for a, b in zip(model.parameters(), other.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_below_the_threshold_the_step_is_bitwise_unclipped() -> None:
    model = model_of()
    other = copy.deepcopy(model)
    a = MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), surgery="pcgrad", seed=0, max_grad_norm=1e6
    )
    b = MultiTaskOptimizer(torch.optim.Adam(other.parameters(), lr=1e-2), surgery="pcgrad", seed=0)
    for step in range(3):
        for opt, m in ((a, model), (b, other)):
            opt.zero_grad()
            opt.step(losses_of(m, step))
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), other.parameters()))
    assert "grad_norm" in a.last_stats and "grad_norm" not in b.last_stats


def test_a_huge_finite_gradient_is_clipped_not_zeroed() -> None:
    """torch's float32 norm of 1e20-sized gradients overflows to inf (and would zero them)."""
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 1e20)
    assert not math.isfinite(float(torch.linalg.vector_norm(p.grad)))
    norm = clip_([p], 1.0)
    assert norm == pytest.approx(2e20, rel=1e-6)
    assert float(total_norm([p])) == pytest.approx(1.0, rel=1e-5)


def test_weighting_parameters_are_not_clipped() -> None:
    """The clipped norm is the model's (what clip_grad_norm_(model.parameters()) sees); the
    uncertainty log-variances' gradients are left to their own param group."""
    model = model_of()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        surgery="pcgrad",
        weighting="uncertainty",
        num_tasks=K,
        max_grad_norm=1e-3,
    )
    opt.step(losses_of(model, 0, scale=100.0))
    s_grads = torch.stack([p.grad for p in opt.weighting.parameters()])
    losses = torch.tensor(opt.last_stats["losses"], dtype=torch.float64)
    torch.testing.assert_close(s_grads.double(), 0.5 - 0.5 * losses, rtol=1e-6, atol=1e-6)
    assert total_norm(list(model.parameters())) <= 1e-3 * (1 + 1e-5)
