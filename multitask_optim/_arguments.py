"""Constructor arguments of :class:`MultiTaskOptimizer` that belong to no component:
granularity, per-task learning rates, task names, and the deprecated spellings of
component hyper-parameters."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

from .partition import Partition, check_names, describe

Granularity = Union[str, Sequence[Iterable[Tensor]]]
TaskLR = Union[None, Mapping[str, float], Sequence[float]]

#: Old top-level spellings -> (component argument, hyper-parameter name).
DEPRECATED = {"reduction": "surgery", "beta": "surgery", "eps": "precondition", "beta2": "precondition"}


def component_kwargs(
    kind: str, spec: Any, given: Optional[Mapping[str, Any]], deprecated: Mapping[str, Any]
) -> Dict[str, Any]:
    """``<kind>_kwargs`` merged with the old top-level spellings (with a DeprecationWarning).

    As before the split, an old spelling is ignored when that component is off
    (``precondition=None`` with ``eps=``).
    """
    out = dict(given or {})
    for key, value in deprecated.items():
        if value is None or DEPRECATED[key] != kind:
            continue
        warnings.warn(
            f"MultiTaskOptimizer({key}=...) is deprecated: pass {kind}_kwargs={{{key!r}: ...}}",
            DeprecationWarning,
            stacklevel=4,
        )
        if spec is None and kind == "precondition":
            continue
        if key in out and out[key] != value:
            raise ValueError(f"{key}= and {kind}_kwargs[{key!r}] disagree")
        out[key] = value
    return out


def check_granularity(granularity: Granularity, index_of: Mapping[int, int]) -> Union[str, List[List[int]]]:
    if isinstance(granularity, str):
        if granularity not in ("global", "tensor"):
            raise ValueError(
                f"granularity must be 'global', 'tensor' or a list of parameter lists, got {granularity!r}"
            )
        return granularity
    blocks: List[List[int]] = []
    seen: Dict[int, int] = {}
    for b, block in enumerate(granularity):
        if isinstance(block, Tensor):
            raise TypeError("granularity: each block must be a list of parameters, not a single tensor")
        indices = []
        for p in block:
            if id(p) not in index_of:
                raise ValueError(
                    f"granularity: block {b} holds a parameter that is not in the inner optimizer"
                )
            n = index_of[id(p)]
            if n in seen:
                raise ValueError(f"granularity: parameter #{n} is in blocks {seen[n]} and {b}")
            seen[n] = b
            indices.append(n)
        blocks.append(indices)
    if not blocks:
        raise ValueError("granularity: the list of blocks is empty")
    return blocks


def blocks_of(
    granularity: Union[str, List[List[int]]], partition: Partition, index_of: Mapping[int, int]
) -> List[List[int]]:
    """Blocks as lists of positions in ``partition.shared``."""
    n = len(partition.shared)
    if granularity == "global":
        return [list(range(n))]
    if granularity == "tensor":
        return [[i] for i in range(n)] or [[]]
    position = {index_of[id(p)]: i for i, p in enumerate(partition.shared)}
    blocks = [[position[idx] for idx in block if idx in position] for block in granularity]
    covered = {i for block in blocks for i in block}
    missing = [i for i in range(n) if i not in covered]
    if missing:
        shown = ", ".join(
            describe(index_of[id(partition.shared[i])], partition.shared[i]) for i in missing[:5]
        )
        raise ValueError(f"granularity: shared {shown} is in no block")
    return [block for block in blocks if block] or [[]]


def check_task_lr(task_lr: TaskLR) -> Union[None, Dict[str, float], List[float]]:
    if task_lr is None:
        return None
    if isinstance(task_lr, Mapping):
        out: Union[Dict[str, float], List[float]] = {str(k): float(v) for k, v in task_lr.items()}
        values: Iterable[float] = out.values()  # type: ignore[union-attr]
    elif isinstance(task_lr, (list, tuple)):
        out = [float(v) for v in task_lr]
        values = out
    else:
        raise TypeError(f"task_lr must be a mapping or a list of floats, got {type(task_lr).__name__}")
    for v in values:
        if not v >= 0.0:
            raise ValueError(f"task_lr: learning rates must be >= 0, got {v!r}")
    return out


def task_rates(task_lr: Union[None, Dict[str, float], List[float]], names: Sequence[str]) -> Dict[str, float]:
    """``task_lr`` as ``{role: lr}`` for these task names (ValueError on a mismatch)."""
    if isinstance(task_lr, list):
        if len(task_lr) != len(names):
            raise ValueError(f"task_lr lists {len(task_lr)} rates for {len(names)} tasks")
        return dict(zip(names, task_lr))
    rates = dict(task_lr or {})
    unknown = [k for k in rates if k != "shared" and k not in names]
    if unknown:
        raise ValueError(f"task_lr names unknown task(s) {unknown}; tasks are {list(names)} (and 'shared')")
    return rates


def task_names_from(
    names: Optional[Tuple[str, ...]], task_names: Optional[Sequence[str]], num_tasks: Optional[int]
) -> Optional[Tuple[str, ...]]:
    """The task names known at construction, from ``tasks=``, ``task_names=`` or ``num_tasks=``."""
    if task_names is not None:
        if isinstance(task_names, str):
            raise TypeError("task_names must be a sequence of names, not one string")
        given = check_names(list(task_names))
        if not given:
            raise ValueError("task_names is empty")
        if names is not None and given != names:
            raise ValueError(f"task_names {list(given)} differ from the names in tasks= {list(names)}")
        names = given
    if num_tasks is not None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if names is not None and len(names) != num_tasks:
            raise ValueError(f"num_tasks={num_tasks} but {len(names)} task names are given")
        if names is None:
            names = tuple(str(i) for i in range(num_tasks))
    return names
