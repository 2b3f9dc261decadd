"""The optimizer's checkpoint entry, assembled from its components.

``state_dict()["multitask"]`` records the configuration (each component's name and
settings, the task names, the partition) and the state (each component's state dict,
learnable weighting parameters, the generator, counters). Everything is tensors,
numbers, strings and lists, so it loads with ``torch.load(..., weights_only=True)``.
Loading a checkpoint of another configuration raises a ``ValueError`` naming what
differs, before anything changes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .components import Component, State
from .partition import Partition

VERSION = 2


def record(component: Optional[Component]) -> Optional[Dict[str, Any]]:
    """``{"name", "settings"}`` of a component, settings as their ``repr`` (plain strings)."""
    if component is None:
        return None
    return {"name": component.name, "settings": {k: repr(v) for k, v in component.settings().items()}}


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise a ValueError naming every entry of the configuration that differs."""
    differences: List[str] = []
    for key in current:
        if key in saved and saved[key] != current[key]:
            differences.append(f"{key}: checkpoint {_show(saved[key])}, this optimizer {_show(current[key])}")
    if differences:
        raise ValueError(
            "state_dict is from an optimizer with another configuration; nothing was loaded. "
            + "; ".join(differences)
        )


def _show(value: Any) -> str:
    if isinstance(value, Mapping) and "name" in value:
        settings = ", ".join(f"{k}={v}" for k, v in value.get("settings", {}).items())
        return f"{value['name']}({settings})"
    return repr(value)


def clone_state(state: State) -> State:
    return {key: value.clone() for key, value in state.items()}


def saved_partition(
    data: Optional[Mapping[str, Any]],
    params: Sequence[Tensor],
    current: Optional[Partition],
    index_of: Mapping[int, int],
) -> Optional[Partition]:
    """The checkpoint's partition over ``params``; raises if it cannot be this optimizer's."""
    if data is None:
        return None
    every = [n for key in ("shared", "unused") for n in data[key]] + [n for t in data["tasks"] for n in t]
    if every and max(every) >= len(params):
        raise ValueError("state_dict's partition refers to more parameters than this optimizer has")
    if current is not None and current.to_indices(index_of) != data:
        raise ValueError("state_dict's partition differs from this optimizer's partition")
    return Partition.from_indices(data, params)


def place_precondition_state(state: State, params: Sequence[Tensor]) -> None:
    """Move loaded accumulators to their parameter's device and dtype (counters: float64, CPU)."""
    for key in list(state):
        index, kind = key.split(".")
        p = params[int(index)]
        if kind == "step":
            state[key] = state[key].to(device=torch.device("cpu"), dtype=torch.float64)
        else:
            state[key] = state[key].to(device=p.device, dtype=p.dtype)
