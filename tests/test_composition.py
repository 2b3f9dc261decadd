"""Weighting, preconditioning and surgery compose in one step and resume bitwise."""

from __future__ import annotations

import copy
from typing import Any, Dict, List

import pytest
import torch
from torch import Tensor, nn

from multitask_optim import AGGREGATORS, WEIGHTINGS, MultiTaskOptimizer


class ThreeTasks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh())
        self.reg = nn.Linear(24, 1)
        self.cls = nn.Linear(24, 3)
        self.aux = nn.Linear(24, 1)

    def losses(self, step: int) -> Dict[str, Tensor]:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(32, 6, generator=g)
        z = self.trunk(x)
        y_reg = 100.0 * torch.sin(x[:, 0]) + torch.randn(32, generator=g)  # large loss scale
        y_cls = (x[:, 1] > 0).long() + (x[:, 2] > 0).long()
        y_aux = -x[:, 0]  # pulls against the regression
        return {
            "reg": nn.functional.mse_loss(self.reg(z).squeeze(-1), y_reg),
            "cls": nn.functional.cross_entropy(self.cls(z), y_cls),
            "aux": nn.functional.mse_loss(self.aux(z).squeeze(-1), y_aux),
        }


def _build(model: nn.Module, **options: Any) -> MultiTaskOptimizer:
    return MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=3e-3), task_names=["reg", "cls", "aux"], seed=11, **options
    )


COMPOSED = dict(
    weighting="uncertainty",
    weighting_kwargs={"kind": {"cls": "classification"}, "lr": 0.05},
    surgery="pcgrad",
    precondition="adam",
)


def test_uncertainty_pcgrad_adam_trains_end_to_end() -> None:
    torch.manual_seed(0)
    model = ThreeTasks()
    opt = _build(model, **COMPOSED)
    first = {k: v.item() for k, v in model.losses(0).items()}
    for step in range(150):
        opt.zero_grad()
        opt.step(model.losses(step))
    last = {k: v.item() for k, v in model.losses(10_000).items()}
    for name in ("reg", "cls", "aux"):
        assert last[name] < first[name], (name, first, last)
    assert opt.param_groups[-1].get("task") == "weighting"
    stats = opt.last_stats
    assert set(stats) >= {"cosine", "weights", "coefficients", "objective", "skipped"}
    assert stats["weights"][0] != stats["weights"][1]  # learned, task-specific weights


def _state_tensors(sd: Dict[str, Any]) -> List[Tensor]:
    out: List[Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            out.append(x)
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            for item in x:
                walk(item)

    walk(sd)
    return out


SURGERIES = ["pcgrad", "gradvac"] + [m for m in ("mgda", "pareto") if m in AGGREGATORS]
WEIGHTING_CASES = [
    ("uncertainty", {"lr": 0.05}),
    ("gradnorm", {"lr": 0.02}),
    ("dwa", {"steps_per_epoch": 2}),
    ("htw", {"total_steps": 20}),
    ("rlw", {}),
]


@pytest.mark.parametrize("weighting,kwargs", WEIGHTING_CASES, ids=[w for w, _ in WEIGHTING_CASES])
@pytest.mark.parametrize("surgery", SURGERIES)
def test_every_state_field_resumes_bitwise(
    tmp_path, weighting: str, kwargs: Dict[str, Any], surgery: str
) -> None:
    if weighting not in WEIGHTINGS:
        pytest.skip(f"{weighting} not registered")
    precondition = "adam" if surgery in ("pcgrad", "gradvac") else None
    options = dict(weighting=weighting, weighting_kwargs=kwargs, surgery=surgery, precondition=precondition)
    torch.manual_seed(0)
    model = ThreeTasks()
    twin = copy.deepcopy(model)
    opt = _build(model, **options)
    for step in range(7):
        opt.zero_grad()
        opt.step(model.losses(step))
        if step == 3:
            path = tmp_path / "opt.pt"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    assert _state_tensors(saved["opt"]["multitask"]), "the multitask state holds tensors"
    twin.load_state_dict(saved["model"])
    resumed = _build(twin, **options)
    resumed.load_state_dict(saved["opt"])
    for step in range(4, 7):
        resumed.zero_grad()
        resumed.step(twin.losses(step))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(_state_tensors(opt.state_dict()), _state_tensors(resumed.state_dict())):
        assert torch.equal(a, b)
