"""The inner optimizer's param groups: per-task splits (``task_lr``) and the weighting's group.

Groups are the user's and change only when asked: split into ``shared`` + one per task
(each keeping the hyper-parameters of the group it came from, plus a ``task`` key) when
per-task learning rates are requested, and one group added for a learnable weighting.
A split or an added group after a scheduler was attached would leave groups
unscheduled, so both refuse with a clear error then.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

from torch import Tensor
from torch.optim import Optimizer

from .partition import Partition
from .weighting import Weighting


def scheduler_attached(groups: Sequence[Mapping[str, Any]]) -> bool:
    """A learning-rate scheduler records ``initial_lr`` in every group it drives."""
    return any("initial_lr" in g for g in groups)


def check_can_split(optimizer: Optimizer) -> None:
    if scheduler_attached(optimizer.param_groups):
        raise RuntimeError(
            "task_lr with an automatic partition splits the param groups at the first step, but a "
            "learning-rate scheduler is already attached (a group has 'initial_lr'). Pass shared= and "
            "tasks= to partition explicitly, or build the scheduler after the first step."
        )


def check_can_add_weighting(optimizer: Optimizer, weighting: Weighting) -> None:
    if weighting.learnable and scheduler_attached(optimizer.param_groups):
        raise RuntimeError(
            f"weighting {weighting.name!r} adds a param group at the first step, but a "
            "learning-rate scheduler is already attached. Pass task_names=, num_tasks= or tasks= so it is "
            "created at construction, or build the scheduler after the first step."
        )


def split_groups(optimizer: Optimizer, partition: Partition, rates: Mapping[str, float]) -> None:
    """Split every group into ``shared`` + one group per task (+ ``unused``), in place."""
    optimizer.param_groups[:] = split_layout(optimizer.param_groups, partition, rates)


def split_layout(
    groups: Sequence[Mapping[str, Any]], partition: Partition, rates: Mapping[str, float]
) -> List[Dict[str, Any]]:
    """The groups :func:`split_groups` makes of ``groups`` (new dicts; ``groups`` unchanged)."""
    roles = partition.role_of()
    new_groups: List[Dict[str, Any]] = []
    for group in groups:
        if group.get("task") == "weighting":
            new_groups.append(group)  # type: ignore[arg-type]
            continue
        buckets: Dict[str, List[Tensor]] = {}
        for p in group["params"]:
            buckets.setdefault(roles.get(id(p), "unused"), []).append(p)
        for role in ("shared", *partition.names, "unused"):
            if not buckets.get(role):
                continue
            new = {key: value for key, value in group.items() if key != "params"}
            new["params"] = buckets[role]
            new["task"] = role
            if role in rates:
                new["lr"] = float(rates[role])
            new_groups.append(new)
    return new_groups


def add_weighting_group(optimizer: Optimizer, weighting: Weighting) -> None:
    """Give a learnable weighting's parameters a group of their own."""
    params = weighting.parameters()
    if not params:
        return
    group: Dict[str, Any] = {"params": params, "task": "weighting"}
    group["lr"] = weighting.lr if weighting.lr is not None else optimizer.param_groups[0]["lr"]
    if "weight_decay" in optimizer.defaults:
        group["weight_decay"] = 0.0
    optimizer.add_param_group(group)
