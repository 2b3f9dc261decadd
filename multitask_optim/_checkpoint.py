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

from ._components import Component, State
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
    if current is not None:
        mine = current.to_indices(index_of)
        differs = [key for key in ("names", "shared", "tasks", "unused") if mine[key] != data[key]]
        if differs:
            raise ValueError(
                f"state_dict's partition differs from this optimizer's partition ({', '.join(differs)}: "
                f"checkpoint {[data[k] for k in differs]}, this optimizer {[mine[k] for k in differs]}, as "
                "parameter positions); nothing was loaded"
            )
    return Partition.from_indices(data, params)


def check_task_names(saved: Optional[Sequence[str]], current: Optional[Sequence[str]]) -> None:
    """Raise a ValueError unless the checkpoint's task names are this optimizer's, in order.

    Per-task state is stored by position: the same names in another order would hand
    each task another task's state, so that is refused too, saying how to fix it.
    """
    if saved is None or current is None or list(saved) == list(current):
        return
    if sorted(saved) == sorted(current):
        raise ValueError(
            f"state_dict has the same tasks in another order (checkpoint {list(saved)}, this optimizer "
            f"{list(current)}): per-task state is stored by position and would go to the wrong tasks; "
            "list the tasks in the checkpoint's order (task_names= / tasks=); nothing was loaded"
        )
    raise ValueError(f"state_dict is for tasks {list(saved)}, this optimizer has {list(current)}")


def place_precondition_state(state: State, params: Sequence[Tensor]) -> None:
    """Move loaded accumulators to their parameter's device and dtype (counters: float64, CPU)."""
    for key in list(state):
        index, kind = key.split(".")
        p = params[int(index)]
        if kind == "step":
            state[key] = state[key].to(device=torch.device("cpu"), dtype=torch.float64)
        else:
            state[key] = state[key].to(device=p.device, dtype=p.dtype)


def entry(opt: Any) -> Dict[str, Any]:
    """The ``"multitask"`` entry of ``opt.state_dict()``."""
    weighting_params = opt.weighting.parameters() if opt._weighting_ready else []
    return {
        "version": VERSION,
        "config": opt._config(),
        "names": list(opt._names) if opt._names is not None else None,
        "partition": opt._partition.to_indices(opt._index_of) if opt._partition is not None else None,
        "split": opt._split,
        "steps": opt._steps,
        "generator": opt._generator.get_state(),
        "states": {key: dict(state) for key, state in opt._states.items()},
        "weighting_params": [p.detach().clone() for p in weighting_params],
        "gradient_mode": opt.engine.remembered(),
        "representation_path": opt.engine.heads.remembered(),
    }


def restore(opt: Any, mt: Mapping[str, Any], inner: Mapping[str, Any]) -> None:
    """Load an :func:`entry` (and the inner optimizer's ``inner`` state) into ``opt``.

    Everything that can be refused is checked before anything changes.
    """
    if mt.get("version") != VERSION:
        raise ValueError(f"unsupported multitask state version {mt.get('version')!r}")
    check_config(mt["config"], opt._config())
    names = tuple(mt["names"]) if mt["names"] is not None else None
    check_task_names(names, opt._names)
    partition = saved_partition(mt["partition"], opt._params, opt._partition, opt._index_of)
    if names is not None and not opt._weighting_ready:
        opt.weighting.bind(names)
    params = opt.weighting.parameters() if names is not None else []
    if len(params) != len(mt["weighting_params"]):
        raise ValueError("state_dict's weighting parameters do not match this optimizer's weighting")
    if partition is not None and opt._partition is None:
        opt._adopt_partition(partition, warn=False, split=bool(mt["split"]))
    if names is not None and not opt._weighting_ready:
        opt._adopt_weighting(names)
    opt.optimizer.load_state_dict(inner)
    with torch.no_grad():
        for p, value in zip(params, mt["weighting_params"]):
            p.copy_(value)
    opt._states = {key: clone_state(state) for key, state in mt["states"].items()}
    place_precondition_state(opt._states.get("precondition", {}), opt._params)
    opt._generator.set_state(mt["generator"].clone())
    opt._steps = int(mt["steps"])
    opt.engine.restore(mt["gradient_mode"])
    opt.engine.heads.restore(mt.get("representation_path"))  # absent from checkpoints before it was measured
