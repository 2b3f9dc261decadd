"""GradNorm's weights through the optimizer equal a plain-loop reference of the paper's update.

Chen et al. (2018), Algorithm 1, written out with autograd on a small model: at each step
``G_i = ||grad_W (w_i L_i)||`` on the last shared layer ``W`` (kept differentiable in
``w``), ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))``, the target
``mean_j G_j * r_i ** alpha`` held constant, ``L_grad = sum_i |G_i - target_i|``; the
weights take a plain SGD step on ``grad_w L_grad`` and are renormalised to sum to ``K``,
the model a plain SGD step on ``grad sum_i w_i L_i`` (with the weights before their
step). The weights are float32 parameters, so they agree to float32 rounding. Inner SGD
without momentum: a weight gradient off by a factor (e.g. the own-layer
Gram left unweighted, which is exact only while every ``w_i`` is 1) shows in the weights
from the second step on, where Adam's normalisation could hide it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import pytest
import torch
from models import TrunkHeads, build, twin
from torch import Tensor

from multitask_optim import MultiTaskOptimizer

LR, WEIGHT_LR, ALPHA, STEPS = 0.05, 0.02, 1.5, 6
RTOL = 2e-6  # float32 weights
SCALES = (1.0, 5.0, 0.2)  # different gradient norms, so the weights move from the first step


def losses_of(model: TrunkHeads, step: int) -> List[Tensor]:
    return [s * loss for s, loss in zip(SCALES, model.losses(model.batch(step % 3)))]


def reference_run(model: TrunkHeads) -> Tuple[List[List[float]], List[List[float]]]:
    """The paper's update by hand; returns the weights after each step and the weights used in it."""
    layer = list(model.trunk[2].parameters())
    k = model.num_tasks
    w = torch.ones(k)  # float32, like the optimizer's weight parameters
    initial: Optional[Tensor] = None
    after, used = [], []
    for step in range(STEPS):
        losses = losses_of(model, step)
        values = torch.stack([loss.detach() for loss in losses])
        initial = values if initial is None else initial
        used.append(w.tolist())
        weights = w.double().requires_grad_(True)
        norms = []
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(weights[i] * loss, layer, retain_graph=True, create_graph=True)
            norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        norm = torch.stack(norms)
        ratio = values / initial
        target = (norm.mean() * (ratio / ratio.mean()).pow(ALPHA)).detach()
        (weight_grad,) = torch.autograd.grad((norm - target).abs().sum(), weights, retain_graph=True)
        total = sum(float(w[i]) * loss for i, loss in enumerate(losses))
        params = list(model.parameters())
        grads = torch.autograd.grad(total, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= LR * g
        w = (w - WEIGHT_LR * weight_grad.float()).clamp_min(1e-6)
        w = w * k / w.sum()
        after.append(w.tolist())
    return after, used


def optimizer_run(model: TrunkHeads, granularity: str) -> Tuple[List[List[float]], List[List[float]]]:
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        shared=model.trunk.parameters(),
        tasks=[h.parameters() for h in model.heads],
        surgery=None,
        granularity=granularity,
        weighting="gradnorm",
        weighting_kwargs={"alpha": ALPHA, "lr": WEIGHT_LR, "layer": list(model.trunk[2].parameters())},
    )
    after, used = [], []
    for step in range(STEPS):
        opt.zero_grad()
        opt.step(losses_of(model, step))
        used.append(list(opt.last_stats["weights"]))
        weights = opt.weighting.task_weights
        assert weights is not None
        after.append(weights.tolist())
    return after, used


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_gradnorm_weights_follow_the_papers_update_step_by_step(granularity: str) -> None:
    """The plain sum (no surgery): the Gram-space path, where the weights are applied to
    the Grams (the layer's own Gram included) rather than carried by the rows."""
    model = build(TrunkHeads, seed=7, dtype=torch.float64, out_dims=(2, 3, 1))
    copy = twin(model)
    after, used = optimizer_run(model, granularity)
    want_after, want_used = reference_run(copy)
    torch.testing.assert_close(torch.tensor(used), torch.tensor(want_used), rtol=RTOL, atol=0.0)
    torch.testing.assert_close(torch.tensor(after), torch.tensor(want_after), rtol=RTOL, atol=0.0)
    for p, q in zip(model.parameters(), copy.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-9)
    moved: Sequence[float] = want_after[-1]
    assert max(moved) - min(moved) > 0.05, moved  # the weights did move: the comparison is not vacuous
