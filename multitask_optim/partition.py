"""Which parameters are shared, which belong to one task, which are unused."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

from ._graph import LossGraph, popcount

ParamsArg = Iterable[Tensor]
TasksArg = Union[Mapping[str, ParamsArg], Sequence[ParamsArg]]
RESERVED = ("shared", "unused", "weighting")

#: The public names; the other functions are the optimizer's bookkeeping.
__all__ = ["Partition", "explicit"]


#: What an empty ``shared=`` or ``tasks=`` entry usually is, and what to do.
_EMPTY = (
    " (a generator such as model.parameters() yields its parameters once: if it was consumed "
    "before, e.g. by the inner optimizer, pass list(...) of a fresh call)"
)


def describe(index: int, param: Tensor) -> str:
    return f"parameter #{index} (shape {tuple(param.shape)})"


@dataclass
class Partition:
    """The role of every parameter of the inner optimizer.

    Attributes:
        names: task names, in order.
        shared: parameters reached by two or more losses (or declared shared).
        tasks: per task, the parameters only its loss trains.
        unused: parameters no loss reaches; left to the inner optimizer.
    """

    names: Tuple[str, ...]
    shared: List[Tensor]
    tasks: List[List[Tensor]]
    unused: List[Tensor] = field(default_factory=list)

    def role_of(self) -> Dict[int, str]:
        """The role of every parameter.

        Returns:
            ``id(param) -> role`` where the role is ``"shared"``, a task name or ``"unused"``.
        """
        roles: Dict[int, str] = {id(p): "shared" for p in self.shared}
        for name, params in zip(self.names, self.tasks):
            roles.update({id(p): name for p in params})
        roles.update({id(p): "unused" for p in self.unused})
        return roles

    def to_indices(self, index_of: Mapping[int, int]) -> Dict[str, Any]:
        """The partition as parameter indices (for a checkpoint).

        Args:
            index_of: ``id(param) -> index`` in the inner optimizer's parameters.

        Returns:
            ``{"names", "shared", "tasks", "unused"}`` with indices in place of parameters.
        """
        return {
            "names": list(self.names),
            "shared": [index_of[id(p)] for p in self.shared],
            "tasks": [[index_of[id(p)] for p in params] for params in self.tasks],
            "unused": [index_of[id(p)] for p in self.unused],
        }

    @classmethod
    def from_indices(cls, data: Mapping[str, Any], params: Sequence[Tensor]) -> Partition:
        """The partition :meth:`to_indices` recorded, over these parameters.

        Args:
            data: what :meth:`to_indices` returned.
            params: the inner optimizer's parameters, in order.

        Returns:
            The partition.
        """
        return cls(
            tuple(data["names"]),
            [params[n] for n in data["shared"]],
            [[params[n] for n in task] for task in data["tasks"]],
            [params[n] for n in data["unused"]],
        )


def check_names(names: Sequence[str]) -> Tuple[str, ...]:
    out = tuple(str(n) for n in names)
    if len(set(out)) != len(out):
        raise ValueError(f"task names must be unique, got {list(out)}")
    for name in out:
        if name in RESERVED:
            raise ValueError(f"task name {name!r} is reserved ({', '.join(RESERVED)})")
    return out


def explicit(params: Sequence[Tensor], shared: Optional[ParamsArg], tasks: TasksArg) -> Partition:
    """Build a partition from the user's ``shared=`` and ``tasks=`` arguments.

    Args:
        params: the inner optimizer's parameters, in order.
        shared: the shared parameters (None: none).
        tasks: per-task parameters, ``{name: params}`` or a list (tasks ``"0"``, ``"1"``, ...).

    Returns:
        The partition; parameters given no role are unused.

    Raises:
        ValueError: a parameter given two roles, or unknown to the inner optimizer; an
            empty ``shared=`` or task entry (e.g. a generator such as
            ``model.parameters()`` that was already consumed).
        TypeError: ``tasks`` is neither a mapping nor a sequence of parameter iterables.
    """
    index_of = {id(p): n for n, p in enumerate(params)}
    if isinstance(tasks, Mapping):
        names = check_names(list(tasks.keys()))
        groups = [list(v) for v in tasks.values()]
    elif isinstance(tasks, (list, tuple)):
        names = tuple(str(i) for i in range(len(tasks)))
        groups = [list(v) for v in tasks]
    else:
        raise TypeError(
            f"tasks must be a mapping or a list of parameter iterables, got {type(tasks).__name__}"
        )
    if not names:
        raise ValueError("tasks must name at least one task")
    shared_list = list(shared) if shared is not None else []
    if shared is not None and not shared_list:
        raise ValueError(f"shared= is empty{_EMPTY}")
    for name, group in zip(names, groups):
        if not group:
            raise ValueError(
                f"tasks= gives task {name!r} no parameters{_EMPTY}; a task without parameters of its own "
                "needs the automatic partition (leave shared= and tasks= out)"
            )
    owner: Dict[int, str] = {}

    def claim(param: Any, role: str) -> None:
        if not isinstance(param, Tensor):
            raise TypeError(f"{role}: expected parameters (tensors), got {type(param).__name__}")
        if id(param) not in index_of:
            raise ValueError(
                f"{role}: a parameter of shape {tuple(param.shape)} is not in the inner optimizer's param_groups"
            )
        if id(param) in owner:
            where = describe(index_of[id(param)], param)
            if owner[id(param)] == role:
                raise ValueError(f"{where} is listed twice in {role}")
            raise ValueError(f"{where} is given two roles: {owner[id(param)]} and {role}")
        owner[id(param)] = role

    for p in shared_list:
        claim(p, "shared")
    for name, group in zip(names, groups):
        for p in group:
            claim(p, f"task {name!r}")
    unused = [p for p in params if id(p) not in owner]
    return Partition(names, shared_list, groups, unused)


def discover(params: Sequence[Tensor], graph: LossGraph, names: Sequence[str]) -> Partition:
    """Partition from the autograd graph: reached by >= 2 losses -> shared; by 1 -> that task's.

    Through a compiled region (``torch.compile``) reachability over-approximates, so
    task parameters inside it look shared: a warning says to compile only the trunk or
    to partition explicitly. Losses that are elements of one tensor computed from the
    same values cannot be told apart: a ValueError says to pass separate losses or to
    partition explicitly.
    """
    if graph.ambiguous is not None:
        raise ValueError(graph.ambiguous)
    if graph.opaque:
        warnings.warn(
            "MultiTaskOptimizer: the losses pass through a torch.compile region, which the automatic "
            "partition sees as one node: every parameter inside it that two losses reach counts as shared. "
            "If the region holds task-specific parameters (heads), compile only the trunk or pass shared= "
            "and tasks=.",
            stacklevel=4,
        )
    shared: List[Tensor] = []
    tasks: List[List[Tensor]] = [[] for _ in names]
    unused: List[Tensor] = []
    for p in params:
        m = graph.reached_by(p)
        if m == 0:
            unused.append(p)
        elif popcount(m) >= 2:
            shared.append(p)
        else:
            tasks[m.bit_length() - 1].append(p)
    return Partition(tuple(names), shared, tasks, unused)


def check_against_graph(partition: Partition, graph: LossGraph, params: Sequence[Tensor]) -> None:
    """Every loss must reach a managed parameter; a task's parameter only its own loss.

    Raises:
        ValueError: naming the task whose loss reaches nothing, or the parameter of one
            task that another task's loss reaches.
    """
    index_of = {id(p): n for n, p in enumerate(params)}
    reached = 0
    for p in params:
        reached |= graph.reached_by(p)
    for i, name in enumerate(partition.names):
        if not reached & (1 << i):
            raise ValueError(f"the loss of task {name!r} is not connected to any parameter of the optimizer")
    if graph.opaque:
        # A compiled region is one node: every loss appears to reach every parameter
        # inside it. Trust the declared partition (each task's parameters still get
        # only their own loss's gradient).
        return
    for i, (name, group) in enumerate(zip(partition.names, partition.tasks)):
        for p in group:
            others = graph.reached_by(p) & ~(1 << i)
            if others:
                j = others.bit_length() - 1
                raise ValueError(
                    f"{describe(index_of[id(p)], p)} belongs to task {name!r} but the loss of task "
                    f"{partition.names[j]!r} also reaches it; declare it shared"
                )


def warn_unused(params: Sequence[Tensor], index_of: Mapping[int, int], why: str) -> None:
    shown = ", ".join(describe(index_of[id(p)], p) for p in params[:8])
    more = f" and {len(params) - 8} more" if len(params) > 8 else ""
    warnings.warn(
        f"MultiTaskOptimizer: {shown}{more} {why}; they are left to the inner optimizer unchanged",
        stacklevel=4,
    )
