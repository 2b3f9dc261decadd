"""Mistakes a newcomer makes get an error (or a warning) that says what to do (issue 19, item 10).

Each error changes nothing: the parameters, their ``.grad`` and the whole
``state_dict`` are as before it.
"""

from __future__ import annotations

import warnings
from typing import List, Optional

import pytest
import torch
from faultkit import round_trip, state_diff
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.trunk = nn.Linear(3, 4)
            self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
        self.x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))

    def losses(self) -> List[Tensor]:
        z = torch.tanh(self.trunk(self.x))
        return [head(z).pow(2).mean() for head in self.heads]


def grads_of(model: nn.Module) -> List[Optional[Tensor]]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def unchanged(model: nn.Module, params: List[Tensor], grads: List[Optional[Tensor]]) -> bool:
    now = list(model.parameters())
    same_params = all(torch.equal(a, b) for a, b in zip(params, now))
    same_grads = all(
        (g is None and p.grad is None) or (g is not None and p.grad is not None and torch.equal(g, p.grad))
        for g, p in zip(grads, now)
    )
    return same_params and same_grads


# ---------------------------------------------------------------------- unknown names
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"surgery": "pcgard"}, r"surgery 'pcgard'; did you mean 'pcgrad'"),
        ({"surgery": "PCGrd"}, r"did you mean 'pcgrad'"),
        ({"weighting": "uncertanty"}, r"weighting 'uncertanty'; did you mean 'uncertainty'\?"),
        ({"precondition": "adamm"}, r"precondition 'adamm'; did you mean 'adam'"),
        ({"surgery": "nash"}, r"did you mean 'nash_mtl'"),
    ],
)
def test_an_unknown_method_name_suggests_the_closest_registered_names(kwargs, expected) -> None:
    model = Net()
    with pytest.raises(ValueError, match=expected) as info:
        MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    assert "known: " in str(info.value)  # and still lists every name


def test_a_name_close_to_nothing_lists_the_names_only() -> None:
    model = Net()
    with pytest.raises(ValueError, match=r"unknown surgery 'zzzz'; known: aligned_mtl") as info:
        MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery="zzzz")
    assert "did you mean" not in str(info.value)


# ---------------------------------------------------------------------- empty shared= / tasks= entries
def test_an_exhausted_generator_for_shared_is_refused_at_construction() -> None:
    model = Net()
    trunk = model.trunk.parameters()
    inner = torch.optim.SGD([*trunk, *model.heads.parameters()], lr=0.1)  # consumes `trunk`
    groups = [list(g["params"]) for g in inner.param_groups]
    with pytest.raises(ValueError, match=r"shared= is empty.*model\.parameters\(\).*list\("):
        MultiTaskOptimizer(
            inner,
            shared=trunk,
            tasks=[model.heads[0].parameters(), model.heads[1].parameters()],
        )
    assert [list(g["params"]) for g in inner.param_groups] == groups


def test_an_empty_task_entry_is_refused_at_construction_naming_the_task() -> None:
    model = Net()
    head = model.heads[1].parameters()
    inner = torch.optim.SGD([*model.trunk.parameters(), *model.heads[0].parameters(), *head], lr=0.1)
    with pytest.raises(ValueError, match=r"task 'b' no parameters.*generator"):
        MultiTaskOptimizer(
            inner, shared=model.trunk.parameters(), tasks={"a": model.heads[0].parameters(), "b": head}
        )


# ---------------------------------------------------------------------- the caller's own backward()
@pytest.mark.parametrize("surgery", ["pcgrad", "mgda", None])
@pytest.mark.parametrize("call", ["step", "accumulate"])
def test_losses_whose_graph_was_freed_say_so_and_change_nothing(surgery, call) -> None:
    model = Net()
    opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), surgery=surgery, seed=0)
    opt.step(model.losses())
    saved = round_trip(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    losses = model.losses()
    sum(losses).backward()  # the newcomer's habit: backward first, then step
    grads = grads_of(model)
    with pytest.raises(RuntimeError, match=r"graph was already freed.*remove your loss\.backward\(\)"):
        getattr(opt, call)(losses)
    assert unchanged(model, params, grads)
    assert state_diff(opt.state_dict(), saved) is None
    opt.zero_grad()
    opt.step(model.losses())  # the next, correct call works
    assert opt.last_stats.get("skipped_step") is None


def test_other_runtime_errors_are_not_rewritten() -> None:
    model = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            return x.clone()

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom from a custom backward")

    losses = model.losses()
    with pytest.raises(RuntimeError, match="boom|no gradient path") as info:
        opt.step([Boom.apply(losses[0]), losses[1]])
    assert "already freed" not in str(info.value)


# ---------------------------------------------------------------------- one task only
def test_a_single_task_warns_once_that_nothing_multi_task_applies() -> None:
    model = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(UserWarning, match=r"single task.*nothing multi-task applies") as record:
        opt.step([sum(model.losses())])
    single = [w for w in record if "single task" in str(w.message)]
    assert len(single) == 1 and single[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        opt.step([sum(model.losses())])  # once


def test_a_step_with_one_task_present_of_several_does_not_warn() -> None:
    model = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), task_names=["a", "b"], seed=0)
    opt.step(dict(zip("ab", model.losses())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        opt.step({"a": model.losses()[0]})
