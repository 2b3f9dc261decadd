"""The optimizer's checkpoint entry, assembled from its components.

``state_dict()["multitask"]`` records the configuration (each component's name and
settings, the task names, the partition) and the state (each component's state dict,
learnable weighting parameters, the generator, counters, the skip count and the reason
of the last skip). Everything is tensors,
numbers, strings and lists, so it loads with ``torch.load(..., weights_only=True)``.
Loading a checkpoint of another configuration raises a ``ValueError`` naming what
differs, before anything changes.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._arguments import task_rates
from ._components import Component, State
from ._engine import HEAD_PATHS
from ._groups import split_layout
from ._jacobian import MODES
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
        "skipped": {"count": opt.skipped, "last_reason": opt.last_skip_reason},
    }


def restore(opt: Any, mt: Mapping[str, Any], inner: Mapping[str, Any]) -> None:
    """Load an :func:`entry` (and the inner optimizer's ``inner`` state) into ``opt``.

    The whole dict is checked first (:func:`validate`): a refused load raises a
    ``ValueError`` and changes nothing -- not the partition, the task names, the param
    groups, the weighting, any state. Should the inner optimizer still refuse its part
    (a check of its own that cannot be foreseen), what was adopted is rolled back.
    """
    plan = validate(opt, mt, inner)
    with _rolled_back_on_error(opt):
        if plan.partition is not None and opt._partition is None:
            opt._adopt_partition(plan.partition, warn=False, split=bool(mt["split"]))
        if plan.names is not None and not opt._weighting_ready:
            opt._adopt_weighting(plan.names)
        opt.optimizer.load_state_dict(inner)
    params = opt.weighting.parameters() if plan.names is not None else []
    with torch.no_grad():
        for p, value in zip(params, mt["weighting_params"]):
            p.copy_(value)
    opt._states = {key: clone_state(state) for key, state in mt["states"].items()}
    place_precondition_state(opt._states.get("precondition", {}), opt._params)
    opt._generator.set_state(mt["generator"].clone())
    opt._steps = int(mt["steps"])
    opt.engine.restore(mt["gradient_mode"])
    opt.engine.heads.restore(mt.get("representation_path"))  # absent from checkpoints before it was measured
    opt.skipped, opt.last_skip_reason = plan.skipped


@dataclass
class Plan:
    """What a validated checkpoint entry will set (see :func:`validate`)."""

    names: Optional[Tuple[str, ...]]
    partition: Optional[Partition]
    skipped: Tuple[int, Optional[str]]


def validate(opt: Any, mt: Mapping[str, Any], inner: Mapping[str, Any]) -> Plan:
    """Check a whole checkpoint entry against ``opt`` without changing anything.

    Raises:
        ValueError: naming what does not fit: the version, the configuration, the tasks,
            the partition, the weighting's parameters, the inner optimizer's param
            groups, or a malformed entry.
    """
    if mt.get("version") != VERSION:
        raise ValueError(f"unsupported multitask state version {mt.get('version')!r}")
    missing = [key for key in _KEYS if key not in mt]
    if missing:
        raise ValueError(f"state_dict's multitask entry lacks {missing}; nothing was loaded")
    check_config(mt["config"], opt._config())
    names = tuple(mt["names"]) if mt["names"] is not None else None
    check_task_names(names, opt._names)
    partition = saved_partition(mt["partition"], opt._params, opt._partition, opt._index_of)
    params = _weighting_preview(opt, names)
    saved = mt["weighting_params"]
    if len(params) != len(saved) or any(
        not isinstance(v, Tensor) or v.shape != p.shape for p, v in zip(params, saved)
    ):
        raise ValueError("state_dict's weighting parameters do not match this optimizer's weighting")
    _check_groups(opt, partition, names is not None and not opt._weighting_ready, params, inner, mt)
    _check_states(mt["states"], len(opt._params))
    try:
        torch.Generator().set_state(mt["generator"])
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"state_dict's generator state is not a generator state: {error}") from None
    if mt["gradient_mode"] is not None and mt["gradient_mode"] not in MODES:
        raise ValueError(f"state_dict's gradient_mode {mt['gradient_mode']!r} is not one of {MODES}")
    if mt.get("representation_path") not in (None, *HEAD_PATHS):
        raise ValueError(
            f"state_dict's representation_path {mt['representation_path']!r} is not one of {HEAD_PATHS}"
        )
    skipped = mt.get("skipped") or {}  # a checkpoint from before the skip record: none
    reason = skipped.get("last_reason")
    if not isinstance(skipped.get("count", 0), int) or not (reason is None or isinstance(reason, str)):
        raise ValueError(f"state_dict's skip record is malformed: {skipped!r}")
    return Plan(names, partition, (int(skipped.get("count", 0)), reason))


#: The entries :func:`restore` reads (``"skipped"`` is optional: older checkpoints lack it).
_KEYS = ("config", "names", "partition", "split", "steps", "generator", "states", "weighting_params")
_KEYS += ("gradient_mode",)


def _weighting_preview(opt: Any, names: Optional[Tuple[str, ...]]) -> List[Tensor]:
    """The weighting's parameters once bound to ``names``, without binding it (a shallow copy
    is bound instead: binding creates new attributes, it does not change shared ones)."""
    if names is None:
        return []
    if opt._weighting_ready:
        return list(opt.weighting.parameters())
    preview = copy.copy(opt.weighting)
    preview.bind(names)  # raises (naming the argument) when a per-task setting does not fit
    return list(preview.parameters())


def _check_groups(
    opt: Any,
    partition: Optional[Partition],
    adds_weighting: bool,
    weighting_params: Sequence[Tensor],
    inner: Mapping[str, Any],
    mt: Mapping[str, Any],
) -> None:
    """The inner optimizer's groups as loading will leave them must match the saved ones."""
    groups = [list(g["params"]) for g in opt.optimizer.param_groups]
    if partition is not None and opt._partition is None and (opt._task_lr is not None or mt["split"]):
        if not opt._split:
            rates = task_rates(opt._task_lr, partition.names)
            groups = [g["params"] for g in split_layout(opt.optimizer.param_groups, partition, rates)]
    if adds_weighting and weighting_params:
        groups.append(list(weighting_params))
    saved = inner.get("param_groups")
    if not isinstance(saved, (list, tuple)) or [len(g.get("params", ())) for g in saved] != [
        len(g) for g in groups
    ]:
        got = None if not isinstance(saved, (list, tuple)) else [len(g.get("params", ())) for g in saved]
        raise ValueError(
            "state_dict's inner optimizer has param groups of sizes "
            f"{got}, this optimizer {[len(g) for g in groups]}; nothing was loaded"
        )


def _check_states(states: Any, num_params: int) -> None:
    """Every component state is a dict of tensors; accumulators name this optimizer's parameters."""
    if not isinstance(states, Mapping) or not all(
        isinstance(state, Mapping) and all(isinstance(v, Tensor) for v in state.values())
        for state in states.values()
    ):
        raise ValueError("state_dict's component states are not dicts of tensors; nothing was loaded")
    for key in states.get("precondition", {}):
        index, _, kind = str(key).partition(".")
        if not (index.isdigit() and int(index) < num_params and kind):
            raise ValueError(
                f"state_dict's preconditioner state names no parameter of this optimizer: {key!r}"
            )


@contextmanager
def _rolled_back_on_error(opt: Any) -> Iterator[None]:
    """Undo the adoption of the partition and the weighting if the block raises."""
    attrs = {name: getattr(opt, name) for name in _ADOPTED}
    groups = list(opt.optimizer.param_groups)
    weighting = dict(vars(opt.weighting))
    try:
        yield
    except BaseException:
        for name, value in attrs.items():
            setattr(opt, name, value)
        opt.optimizer.param_groups[:] = groups
        vars(opt.weighting).clear()
        vars(opt.weighting).update(weighting)
        raise


#: What adopting a partition and a weighting changes on the optimizer.
_ADOPTED = ("_partition", "_names", "_blocks", "_split", "_weighting_ready", "_states")
