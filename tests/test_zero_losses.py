"""A loss of exactly 0 never ends a run (issue 19, item 5).

A separable classification loss underflows to exactly ``0.0`` in float32 after a few
steps of a legitimate run. Every method that reads the loss values through a log, a
ratio or ``1 / L`` floors them at its epsilon (as its reference code does, or says
why not) instead of raising; a *negative* loss is still refused with a ``ValueError``
that names the task and changes nothing.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from faultkit import round_trip, state_diff
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer

STEPS = 24
NAMES = ["cls", "reg"]

#: (weighting, weighting_kwargs, surgery, surgery_kwargs): every method that reads the
#: loss values through a log, a ratio or 1 / L.
METHODS: Dict[str, Tuple[Optional[str], Dict[str, Any], Optional[str], Dict[str, Any]]] = {
    "famo": ("famo", {}, "pcgrad", {}),
    "gls": ("gls", {}, "pcgrad", {}),
    "imtl_l": ("imtl_l", {}, "imtl_g", {}),
    # the warm-up ends mid-run, so both of STCH's phases see the zero loss
    "stch": ("stch", {"warmup_epochs": 2, "steps_per_epoch": 4}, "pcgrad", {}),
    "gradnorm": ("gradnorm", {}, "pcgrad", {}),
    "htw": ("htw", {"total_steps": STEPS, "main_task": "reg"}, "pcgrad", {}),
    "db_mtl": (None, {}, "db_mtl", {}),
    "mgda_loss": (None, {}, "mgda", {"normalization": "loss"}),
}


class Model(nn.Module):
    """A shared trunk, a classification head on separable data and a regression head."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.trunk = nn.Linear(4, 8)
            self.cls = nn.Linear(8, 2)
            self.reg = nn.Linear(8, 1)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, generator=g)
        x[:, 0] += 2.0 * torch.sign(x[:, 0])  # a margin: the classes are separable
        self.x, self.label, self.target = x, (x[:, 0] > 0).long(), 0.5 * x[:, 1:2]

    def losses(self, scale: float = 50.0) -> Dict[str, Tensor]:
        z = self.trunk(self.x)
        return {
            "cls": F.cross_entropy(scale * self.cls(z), self.label),
            "reg": F.mse_loss(self.reg(z), self.target),
        }


def make(model: Model, method: str) -> MultiTaskOptimizer:
    weighting, wkw, surgery, skw = METHODS[method]
    return MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.03),
        shared=list(model.trunk.parameters()),
        tasks={"cls": list(model.cls.parameters()), "reg": list(model.reg.parameters())},
        surgery=surgery,
        surgery_kwargs=skw or None,
        weighting=weighting,
        weighting_kwargs=wkw or None,
        seed=0,
    )


def finite(values: Any) -> bool:
    return all(v == v and abs(v) != float("inf") for v in values)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_loss_that_reaches_exactly_zero_mid_training_does_not_end_the_run(method: str) -> None:
    model = Model()
    opt = make(model, method)
    zero_steps: List[int] = []
    for step in range(STEPS):
        losses = model.losses()
        if float(losses["cls"].detach()) == 0.0:
            zero_steps.append(step)
        opt.zero_grad()
        opt.step(losses)
        assert not opt.last_stats.get("skipped_step", False), (step, opt.last_stats)
        assert finite(opt.last_stats["weights"]), (step, opt.last_stats["weights"])
    assert zero_steps and zero_steps[0] >= 2, zero_steps  # it reached 0.0 mid-training ...
    assert len(zero_steps) >= 3  # ... and stayed there for steps while the run went on
    assert opt.skipped == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("method", ["gradnorm", "htw"])
def test_a_first_loss_of_zero_waits_for_a_positive_baseline(method: str) -> None:
    """A loss ratio's ``L(0)`` is the first *positive* loss: a task that starts at 0 has
    ratio 1 until then, and the run goes on."""
    model = Model()
    opt = make(model, method)
    losses = model.losses()
    opt.step({"cls": losses["cls"] * 0.0, "reg": losses["reg"]})
    state = opt.state_dict()["multitask"]["states"]["weighting"]
    assert state["initialized"].tolist() == [False, True]
    losses = model.losses()
    opt.zero_grad()
    opt.step(losses)
    state = opt.state_dict()["multitask"]["states"]["weighting"]
    assert state["initialized"].tolist() == [True, True]
    assert float(state["initial_losses"][0]) == float(losses["cls"].detach()) > 0.0
    assert opt.skipped == 0 and all(bool(torch.isfinite(p).all()) for p in model.parameters())


#: MGDA's loss normalisation replaces a divisor that is not positive by 1 (its docstring);
#: DB-MTL, a surgery, does not know the task names and names the task's position.
REFUSED = {m: "'cls'.*negative|negative.*'cls'" for m in METHODS if m != "mgda_loss"}
REFUSED["db_mtl"] = r"position\(s\) \[0\] have a negative"


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_a_negative_loss_is_refused_naming_the_task_and_changes_nothing(method: str) -> None:
    model = Model()
    opt = make(model, method)
    for _ in range(3):
        opt.zero_grad()
        opt.step(model.losses())
    saved = round_trip(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    losses = model.losses()
    losses["cls"] = losses["cls"] * 0.0 - 1.0
    with pytest.raises(ValueError, match=REFUSED[method]):
        opt.step(losses)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(
        (g is None and p.grad is None) or (g is not None and p.grad is not None and torch.equal(g, p.grad))
        for g, p in zip(grads, model.parameters())
    )
    assert state_diff(opt.state_dict(), saved) is None
