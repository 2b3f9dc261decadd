"""GradNorm on the paper's synthetic setup, through the optimizer.

Chen et al. (2018), section 5.1: tasks ``f_i(x) = sigma_i * tanh((B + eps_i) x)`` with
a shared random matrix ``B`` and small task-specific ``eps_i``; the scales ``sigma_i``
make the gradient norms differ by orders of magnitude. GradNorm's learned weights
must pull the per-task gradient norms on the last shared layer together.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer
from multitask_optim.weighting.gradnorm import GradNorm

SIGMAS = (1.0, 4.0, 16.0, 64.0)
D_IN, D_OUT, HIDDEN = 40, 10, 48


def _targets_fn() -> Tuple[Tensor, List[Tensor]]:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(D_OUT, D_IN, generator=g) * (10.0**0.5) / D_IN**0.5
    eps = [torch.randn(D_OUT, D_IN, generator=g) * (3.5**0.5) / D_IN**0.5 for _ in SIGMAS]
    return b, eps


def _batch(step: int, b: Tensor, eps: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, D_IN, generator=g)
    return x, [s * torch.tanh(x @ (b + e).T) for s, e in zip(SIGMAS, eps)]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(HIDDEN, D_OUT) for _ in SIGMAS])

    def losses(self, x: Tensor, ys: List[Tensor]) -> List[Tensor]:
        z = self.trunk(x)
        return [((h(z) - y) ** 2).mean() for h, y in zip(self.heads, ys)]


def _train(weighting: Optional[GradNorm], steps: int = 250) -> Tuple[Net, List[float]]:
    torch.manual_seed(0)
    model = Net()
    opt = MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        surgery=None,
        weighting=weighting,
        num_tasks=len(SIGMAS),
        seed=0,
    )
    b, eps = _targets_fn()
    for step in range(steps):
        x, ys = _batch(step, b, eps)
        opt.zero_grad()
        opt.step(model.losses(x, ys))
    weights = opt.last_stats["weights"]
    return model, weights


def _log_spread(model: Net, weights: List[float]) -> float:
    """Std of log ||grad_W (w_i L_i)|| over tasks, W the last shared layer, fresh batch."""
    b, eps = _targets_fn()
    x, ys = _batch(10_000, b, eps)
    last = list(model.trunk[2].parameters())
    norms = []
    for w, loss in zip(weights, model.losses(x, ys)):
        grads = torch.autograd.grad(loss, last, retain_graph=True)
        norms.append(w * math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
    logs = torch.tensor([math.log(n) for n in norms])
    return float(logs.std())


def test_gradnorm_equalises_gradient_norms_on_the_last_shared_layer() -> None:
    equal_model, equal_weights = _train(None)
    model, weights = _train(GradNorm(alpha=1.5, lr=0.05, layer=None))
    spread_equal = _log_spread(equal_model, equal_weights)
    spread_gradnorm = _log_spread(model, weights)
    assert spread_gradnorm <= spread_equal / 2, (spread_equal, spread_gradnorm, weights)
    assert all(w > 0 for w in weights)
    assert abs(sum(weights) - len(SIGMAS)) < 1e-4
    # the largest-scale task gets the smallest weight
    assert weights.index(min(weights)) == len(SIGMAS) - 1


def test_gradnorm_with_an_explicit_layer_reads_that_layer() -> None:
    torch.manual_seed(0)
    model = Net()
    layer = list(model.trunk[2].parameters())
    opt = MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        surgery="pcgrad",
        weighting=GradNorm(alpha=1.5, lr=0.05, layer=layer),
        num_tasks=len(SIGMAS),
        seed=0,
    )
    b, eps = _targets_fn()
    for step in range(60):
        x, ys = _batch(step, b, eps)
        opt.zero_grad()
        opt.step(model.losses(x, ys))
    weights = opt.last_stats["weights"]
    assert all(w > 0 for w in weights) and abs(sum(weights) - len(SIGMAS)) < 1e-4
    assert weights[-1] < weights[0]
