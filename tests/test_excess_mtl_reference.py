"""ExcessMTL through the optimizer equals a plain-loop reference of the authors' algorithm.

The reference follows the authors' code (uiuctml/ExcessMTL, ``LibMTL/weighting/ExcessMTL.py``;
LibMTL repeats it) one task at a time on plain flattened gradient vectors: the running
sum of squared gradients, ``h_i = sqrt(S_i + 1e-7)``, the excess risk ``E_i = <g_i / h_i,
g_i>``; the first step only stores ``E`` as the baseline; every later step multiplies
each weight by ``exp(eta E_i / E_i^0)`` and renormalises the weights to sum to ``K``.
The paper's warm-up (Appendix C.1: the baseline is the mean ``E`` over the warm-up
steps, the weights stay 1) is the one extension it also follows. The heads get their
own loss's gradient (the library's convention, stated in the class docstring), the
shared parameters ``sum_i alpha_i g_i``, and an SGD step (no moments that could hide a
scale) is applied by hand.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from models import TrunkHeads, build, twin
from torch import Tensor

from multitask_optim import MultiTaskOptimizer

LR = 0.02
STEPS = 120


class AuthorsExcessMTL:
    """The authors' weight update, one task at a time, on plain Python floats."""

    def __init__(self, num_tasks: int, step_size: float, warmup: int) -> None:
        self.k, self.eta, self.warmup = num_tasks, step_size, max(warmup, 1)
        self.weights = [1.0] * num_tasks
        self.squares: List[Tensor] = []
        self.baseline = [0.0] * num_tasks
        self.steps = 0

    def weigh(self, grads: Sequence[Tensor]) -> List[float]:
        if not self.squares:
            self.squares = [torch.zeros_like(g) for g in grads]
        excess = []
        for i, g in enumerate(grads):
            self.squares[i] = self.squares[i] + g * g
            h = torch.sqrt(self.squares[i] + 1e-7)
            excess.append(float((g / h) @ g))
        if self.steps < self.warmup:
            for i in range(self.k):
                self.baseline[i] += excess[i] / self.warmup
        else:
            moved = [w * math.exp(self.eta * e / b) for w, e, b in zip(self.weights, excess, self.baseline)]
            self.weights = [self.k * m / sum(moved) for m in moved]
        self.steps += 1
        return list(self.weights)


def fixed_batch(model: TrunkHeads, step: int) -> Tuple[Tensor, List[Tensor]]:
    return model.batch(step % 4)  # four fixed batches, visited in turn


def scaled_losses(model: TrunkHeads, step: int, scales: Sequence[float]) -> List[Tensor]:
    return [s * loss for s, loss in zip(scales, model.losses(fixed_batch(model, step)))]


def reference_run(
    model: TrunkHeads, scales: Sequence[float], step_size: float, warmup: int
) -> List[List[float]]:
    """Train ``model`` in place with the plain loop; returns the weights of every step."""
    shared = list(model.trunk.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    method = AuthorsExcessMTL(model.num_tasks, step_size, warmup)
    history = []
    for step in range(STEPS):
        losses = scaled_losses(model, step, scales)
        grads = []
        for i, loss in enumerate(losses):
            got = torch.autograd.grad(loss, shared + heads[i], retain_graph=True)
            grads.append((torch.cat([t.flatten() for t in got[: len(shared)]]), got[len(shared) :]))
        weights = method.weigh([g for g, _ in grads])
        history.append(weights)
        update = sum(w * g for w, (g, _) in zip(weights, grads))
        with torch.no_grad():
            offset = 0
            for p in shared:
                p -= LR * update[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            for params, (_, own) in zip(heads, grads):
                for p, g in zip(params, own):
                    p -= LR * g
    return history


def optimizer_run(model: TrunkHeads, scales: Sequence[float], kwargs: Dict[str, float]) -> List[List[float]]:
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        shared=model.trunk.parameters(),
        tasks=[h.parameters() for h in model.heads],
        surgery="excess_mtl",
        surgery_kwargs=kwargs,
        gradient_mode="frontier",
    )
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        opt.step(scaled_losses(model, step, scales))
        history.append(list(opt.last_stats["coefficients"]))
    return history


@pytest.mark.parametrize(
    "scales, step_size, warmup",
    [
        ((1.0, 1.0, 1.0), None, 0),  # the defaults: eta = 1e-2, the first step stores the baseline
        ((1.0, 20.0, 1e-2), 0.2, 0),  # losses of different sizes, faster weights
        ((1.0, 30.0, 1.0), 0.1, 5),  # the paper's warm-up
    ],
    ids=["defaults", "scales", "warmup"],
)
def test_many_steps_equal_the_authors_algorithm(
    scales: Tuple[float, ...], step_size: float, warmup: int
) -> None:
    model = build(TrunkHeads, seed=3, dtype=torch.float64, out_dims=(2, 3, 1))
    copy = twin(model)
    kwargs: Dict[str, float] = {} if step_size is None else {"robust_step_size": step_size}
    if warmup:
        kwargs["n_warmup_steps"] = warmup
    ours = optimizer_run(model, scales, kwargs)
    theirs = reference_run(copy, scales, 1e-2 if step_size is None else step_size, warmup)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-9, atol=0.0)
    for p, q in zip(model.parameters(), copy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    first = max(warmup, 1)
    assert theirs[first - 1] == [1.0, 1.0, 1.0]  # the baseline steps leave the weights at 1
    spread = max(theirs[-1]) / min(theirs[-1])
    assert spread > 1.05, theirs[-1]  # the weights did move: the comparison is not vacuous


def test_weights_are_not_one_hot_after_the_first_update_on_imbalanced_scales() -> None:
    """Losses 1e6 apart (the quality benchmark's scale suite): the first step only stores
    the excess risks, so the next one moves the weights by exp(eta E / E^0), E / E^0 near
    1, instead of exp(eta E) with E near 1e6 (one-hot at once, and for good)."""
    model = build(TrunkHeads, seed=5, out_dims=(2, 3, 1))
    opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), surgery="excess_mtl")
    for step in range(3):
        opt.zero_grad()
        opt.step(scaled_losses(model, step, (1e-3, 1.0, 1e3)))
        weights = opt.last_stats["coefficients"]
        assert abs(sum(weights) - 3.0) < 1e-9
        assert min(weights) > 0.5 and max(weights) < 1.5, (step, weights)
