"""A refused ``load_state_dict`` changes nothing; the skip record survives a checkpoint
(issue 19, items 7b and 7c).

``load_state_dict`` checks the whole dict before it changes anything: a refusal leaves
the partition, the task names, the param groups, the weighting (its binding and its
parameters), every component state, the parameters and therefore the whole
``state_dict`` bitwise as they were. The skip count and the reason of the last skip are
public (``opt.skipped``, ``opt.last_skip_reason``, ``last_stats``) and go through
``state_dict()`` / ``load_state_dict()``; a checkpoint written before they were recorded
still loads.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List

import pytest
import torch
from faultkit import clone_state, round_trip, state_diff
from models import TrunkHeads, build, snapshot
from torch import nn

from multitask_optim import MultiTaskOptimizer


def make(model: TrunkHeads, groups: int = 1, **kw: Any) -> MultiTaskOptimizer:
    """An automatic partition (nothing known before the first step or a load)."""
    params = list(model.parameters())
    if groups == 1:
        inner = torch.optim.Adam(params, lr=1e-2)
    else:
        inner = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    kw.setdefault("seed", 0)
    return MultiTaskOptimizer(inner, **kw)


def trained(**kw: Any) -> MultiTaskOptimizer:
    model = build(TrunkHeads, seed=0)
    opt = make(model, **kw)
    for step in range(3):
        opt.zero_grad()
        opt.step(model.losses(model.batch(step)))
    return opt


def everything(opt: MultiTaskOptimizer, model: nn.Module) -> Dict[str, Any]:
    """What a refused load must not change."""
    return {
        "state_dict": clone_state(opt.state_dict()),
        "params": snapshot(model),
        "tasks": opt.tasks,
        "partition": opt.partition,
        "groups": [list(map(id, g["params"])) for g in opt.param_groups],
        "group_keys": [sorted(g) for g in opt.param_groups],
        "weighting_params": [p.detach().clone() for p in opt.weighting.parameters()],
        "weighting_names": opt.weighting.task_names,
        "states": clone_state(opt._states),
    }


def assert_unchanged(before: Dict[str, Any], opt: MultiTaskOptimizer, model: nn.Module) -> None:
    after = everything(opt, model)
    assert state_diff(after["state_dict"], before["state_dict"]) is None
    assert all(torch.equal(a, b) for a, b in zip(after["params"], before["params"]))
    assert after["tasks"] == before["tasks"] and after["partition"] is before["partition"]
    assert after["groups"] == before["groups"] and after["group_keys"] == before["group_keys"]
    assert len(after["weighting_params"]) == len(before["weighting_params"])
    assert all(torch.equal(a, b) for a, b in zip(after["weighting_params"], before["weighting_params"]))
    assert after["weighting_names"] == before["weighting_names"]
    assert state_diff(after["states"], before["states"]) is None


@pytest.mark.parametrize("weighting", ["uncertainty", "gradnorm", None])
@pytest.mark.parametrize("task_lr", [None, [0.1, 0.2]])
def test_a_load_refused_for_the_param_groups_changes_nothing(weighting, task_lr) -> None:
    """The issue's case: the inner optimizer has another number of param groups. Before
    the fix the partition, the task names and the weighting's group were adopted first."""
    saved = round_trip(trained(weighting=weighting, task_lr=task_lr).state_dict())
    model = build(TrunkHeads, seed=1)
    opt = make(model, groups=2, weighting=weighting, task_lr=task_lr)
    before = everything(opt, model)
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(saved)
    assert_unchanged(before, opt, model)
    assert opt.partition is None and opt.tasks == ()
    opt.step(model.losses(model.batch(0)))  # the optimizer still works as a fresh one
    assert opt.tasks == ("0", "1") and not opt.last_stats.get("skipped_step")


def _mutations() -> Dict[str, Callable[[Dict[str, Any]], None]]:
    def set_key(key: str, value: Any) -> Callable[[Dict[str, Any]], None]:
        return lambda sd: sd["multitask"].__setitem__(key, value)

    def drop(key: str) -> Callable[[Dict[str, Any]], None]:
        return lambda sd: sd["multitask"].pop(key)

    def weighting_shape(sd: Dict[str, Any]) -> None:
        sd["multitask"]["weighting_params"] = [torch.zeros(5)]

    def precondition_key(sd: Dict[str, Any]) -> None:
        sd["multitask"]["states"]["precondition"]["99.v"] = torch.zeros(3)

    def inner_group_size(sd: Dict[str, Any]) -> None:
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]

    return {
        "names": set_key("names", ["a", "b"]),
        "version": set_key("version", 1),
        "generator": set_key("generator", torch.zeros(3, dtype=torch.uint8)),
        "gradient_mode": set_key("gradient_mode", "sideways"),
        "missing_states": drop("states"),
        "states_not_tensors": set_key("states", {"surgery": {"x": 1.0}}),
        "weighting_params": weighting_shape,
        "precondition_key": precondition_key,
        "inner_group_size": inner_group_size,
        "skip_record": set_key("skipped", {"count": "many", "last_reason": None}),
    }


@pytest.mark.parametrize("mutation", sorted(_mutations()))
def test_every_refused_load_changes_nothing(mutation: str) -> None:
    source = trained(weighting="uncertainty", precondition="adam")
    saved = round_trip(source.state_dict())
    _mutations()[mutation](saved)
    model = build(TrunkHeads, seed=1)
    opt = make(model, weighting="uncertainty", precondition="adam")
    opt.step(model.losses(model.batch(0)))  # committed state to keep
    before = everything(opt, model)
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)
    assert_unchanged(before, opt, model)


class PickyAdam(torch.optim.Adam):
    """An inner optimizer with a check of its own that the wrapper cannot foresee."""

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        raise ValueError("PickyAdam refuses every state dict")


def test_an_inner_refusal_after_the_checks_is_rolled_back() -> None:
    saved = round_trip(trained(weighting="uncertainty", task_lr=[0.1, 0.2]).state_dict())
    model = build(TrunkHeads, seed=1)
    opt = MultiTaskOptimizer(
        PickyAdam(model.parameters(), lr=1e-2), weighting="uncertainty", task_lr=[0.1, 0.2], seed=0
    )
    before = everything(opt, model)
    with pytest.raises(ValueError, match="PickyAdam"):
        opt.load_state_dict(saved)
    assert_unchanged(before, opt, model)
    assert opt.partition is None and opt.weighting.task_names is None and len(opt.param_groups) == 1


# ---------------------------------------------------------------------- the skip record
def _skip_once(opt: MultiTaskOptimizer, model: TrunkHeads, step: int) -> None:
    losses = model.losses(model.batch(step))
    losses[1] = losses[1] * float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(losses)


def test_the_skip_count_and_reason_are_public_and_survive_a_checkpoint() -> None:
    model = build(TrunkHeads, seed=0)
    opt = make(model)
    assert opt.skipped == 0 and opt.last_skip_reason is None
    opt.step(model.losses(model.batch(0)))
    _skip_once(opt, model, 1)
    _skip_once(opt, model, 2)
    assert (
        opt.skipped == 2 and "non-finite loss" in str(opt.last_skip_reason) and "'1'" in opt.last_skip_reason
    )
    assert opt.last_stats["skipped"] == 2 and opt.last_stats["skip_reason"] == opt.last_skip_reason
    saved = round_trip(opt.state_dict())
    assert saved["multitask"]["skipped"] == {"count": 2, "last_reason": opt.last_skip_reason}

    resumed_model = build(TrunkHeads, seed=0)
    resumed = make(resumed_model)
    resumed.load_state_dict(saved)
    assert resumed.skipped == 2 and resumed.last_skip_reason == opt.last_skip_reason
    resumed.step(resumed_model.losses(resumed_model.batch(3)))
    assert resumed.last_stats["skipped"] == 2  # the count goes on where it was, not from 0


def test_a_checkpoint_without_the_skip_record_still_loads() -> None:
    model = build(TrunkHeads, seed=0)
    opt = make(model)
    opt.step(model.losses(model.batch(0)))
    _skip_once(opt, model, 1)
    old = copy.deepcopy(round_trip(opt.state_dict()))
    del old["multitask"]["skipped"]  # as written before the skip record existed
    resumed_model = build(TrunkHeads, seed=0)
    resumed = make(resumed_model)
    resumed.load_state_dict(old)
    assert resumed.skipped == 0 and resumed.last_skip_reason is None
    resumed.step(resumed_model.losses(resumed_model.batch(2)))
    assert not resumed.last_stats.get("skipped_step")


def test_a_taken_step_keeps_the_reason_of_the_last_skip() -> None:
    model = build(TrunkHeads, seed=0)
    opt = make(model)
    _skip_once(opt, model, 0)
    reason = opt.last_skip_reason
    opt.step(model.losses(model.batch(1)))
    assert opt.last_skip_reason == reason and opt.skipped == 1
    names: List[str] = list(opt.state_dict()["multitask"]["skipped"])
    assert names == ["count", "last_reason"]
