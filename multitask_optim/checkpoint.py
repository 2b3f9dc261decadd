"""The optimizer's checkpoint entry, assembled from its components.

``state_dict()["multitask"]`` records the configuration (each component's name and
settings, the task names, the partition) and the state (each component's state dict,
learnable weighting parameters, the generator, counters). Everything is tensors,
numbers, strings and lists, so it loads with ``torch.load(..., weights_only=True)``.
Loading a checkpoint of another configuration raises a ``ValueError`` naming what
differs, before anything changes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from .components import Component, State

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
