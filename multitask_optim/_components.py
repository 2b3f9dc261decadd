"""The component contract shared by surgeries, weightings and preconditioners.

A component is one pluggable stage of the step. It

- validates its own hyper-parameters in ``__init__`` (errors name the argument) and
  reports them in :meth:`Component.settings` (shown by ``repr`` and recorded in the
  optimizer's checkpoint, so a checkpoint of another configuration is refused);
- owns its state through one functional contract: :meth:`Component.init_state` gives a
  fresh state for ``K`` tasks, every update *returns* a new state (the old one is never
  mutated, so a skipped step simply drops the new one), and the state is a flat
  ``dict[str, Tensor]`` that round-trips through ``torch.save`` /
  ``torch.load(weights_only=True)`` as it is.

A step may lack some tasks (``step({"depth": l})``): the stages then run on the
present tasks only, each component on its *sub-state*. A component declares which axes
of its state tensors index tasks (:meth:`Component.task_axes`); the optimizer selects
the present tasks' slices before the stage (:func:`select_tasks`) and writes the new
slices back after it (:func:`merge_tasks`), so an absent task's state stays bitwise as
it was. A component that keeps state but declares nothing is refused a partial step
(:func:`check_partial`) rather than sliced wrongly. Per-task *settings* (a preference
vector, per-task lower bounds or leaks: one entry per task) follow the present tasks the
same way: a component declares them in :attr:`Component.per_task`, and
:meth:`Component.for_tasks` gives the component a partial step runs (the present tasks'
entries, rescaled where the setting is a distribution).

Components are found by name in a :class:`Registry`; a new method is one file whose
class registers itself with the registry's decorator.
"""

from __future__ import annotations

import copy
from difflib import get_close_matches
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Dict, Generic, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch
from torch import Tensor

State = Dict[str, Tensor]
#: State key (or ``fnmatch`` pattern such as ``"*.v"``) -> the axes of that tensor that index tasks.
TaskAxes = Dict[str, Tuple[int, ...]]


class Component:
    """Base of every pluggable stage: a name, settings and a functional state."""

    #: Registry key (``surgery="pcgrad"``).
    name: ClassVar[str] = ""

    def init_state(self, num_tasks: int, num_blocks: int) -> State:
        """Fresh state for ``num_tasks`` tasks and ``num_blocks`` blocks of shared parameters."""
        return {}

    def settings(self) -> Dict[str, Any]:
        """Hyper-parameters, as plain values (shown by ``repr``, checked on load)."""
        return {}

    #: Settings that hold one entry per task, by attribute name: ``"slice"`` (a partial
    #: step uses the present tasks' entries) or ``"rescale"`` (their entries rescaled to
    #: the sum of all ``K``, for a distribution over the tasks such as a preference
    #: vector: ``1/K`` each becomes ``1/K'`` each). A scalar or ``None`` applies to every
    #: task and is left as it is.
    per_task: ClassVar[Mapping[str, str]] = {}

    def for_tasks(self, present: Sequence[int], num_tasks: int) -> Component:
        """The component a step with only the ``present`` of ``num_tasks`` tasks runs.

        Itself when every task is present or it declares no :attr:`per_task` setting;
        otherwise a shallow copy whose per-task settings are the present tasks' entries
        (see :attr:`per_task`). The copy is used for that step only: ``settings()`` and
        checkpoints keep the full ones.
        """
        if len(present) == num_tasks or not self.per_task:
            return self
        changes = {}
        for attr, how in self.per_task.items():
            value = getattr(self, attr)
            if isinstance(value, (tuple, list)) and len(value) == num_tasks:
                changes[attr] = present_entries(value, present, how)
        if not changes:
            return self
        out = copy.copy(self)
        for attr, value in changes.items():
            setattr(out, attr, value)
        return out

    def task_axes(self) -> Optional[TaskAxes]:
        """Which axes of each state tensor index tasks, for steps that lack some tasks.

        Keys are state keys or ``fnmatch`` patterns (``"*.v"``); a key no entry matches
        holds no per-task values (it is replaced by the new value after a step). ``{}``
        declares a state with nothing per task; ``None`` (the default) declares nothing,
        and a component that then keeps state is refused a step with absent tasks.
        """
        return None

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings().items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


C = TypeVar("C", bound=Component)


class Registry(Generic[C]):
    """Components of one kind by name.

    Args:
        kind: the constructor argument that names them (``"surgery"``), for errors.
        base: the component base class instances must derive from.
        default: the class built for ``None`` (``None``: no component).
    """

    def __init__(self, kind: str, base: Type[C], default: Optional[Type[C]] = None) -> None:
        self.kind = kind
        self.base = base
        self.default = default
        self.classes: Dict[str, Type[C]] = {}

    def register(self, cls: Type[C]) -> Type[C]:
        """Register ``cls`` under ``cls.name`` (usable as a class decorator)."""
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name to register under")
        self.classes[cls.name] = cls
        return cls

    def build(self, spec: Union[None, str, C], kwargs: Optional[Mapping[str, Any]] = None) -> Optional[C]:
        """Resolve ``None`` (the default), a registered name (with ``kwargs``) or an instance."""
        options = dict(kwargs or {})
        if isinstance(spec, self.base):
            if options:
                raise TypeError(f"{self.kind}_kwargs are only accepted with a {self.kind} given by name")
            return spec
        if spec is None:
            if self.default is None:
                if options:
                    raise TypeError(f"{self.kind}_kwargs given without a {self.kind}")
                return None
            cls = self.default
        elif isinstance(spec, str):
            found = self.classes.get(spec.lower())
            if found is None:
                raise ValueError(self.unknown(spec))
            cls = found
        else:
            raise TypeError(
                f"{self.kind} must be None, a name or a {self.base.__name__}, got {type(spec).__name__}"
            )
        try:
            return cls(**options)
        except TypeError as error:
            raise TypeError(f"{self.kind} {cls.name!r}: {error}") from None

    def unknown(self, spec: str) -> str:
        """The message for an unknown name: the closest registered names, then all of them."""
        close = [repr(c) for c in get_close_matches(spec.lower(), list(self.classes), n=3, cutoff=0.6)]
        listed = " or ".join([", ".join(close[:-1]), close[-1]] if len(close) > 1 else close)
        hint = f"did you mean {listed}? " if close else ""
        return f"unknown {self.kind} {spec!r}; {hint}known: {', '.join(sorted(self.classes))}"

    def __contains__(self, name: object) -> bool:
        return name in self.classes

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.classes)

    def __getitem__(self, name: str) -> Type[C]:
        return self.classes[name]

    def __len__(self) -> int:
        return len(self.classes)

    def keys(self):  # type: ignore[no-untyped-def]
        return self.classes.keys()

    def items(self):  # type: ignore[no-untyped-def]
        return self.classes.items()

    def values(self):  # type: ignore[no-untyped-def]
        return self.classes.values()

    def get(self, name: str, default: Any = None) -> Any:
        return self.classes.get(name, default)


# ---------------------------------------------------------------------- partial task sets
def present_entries(values: Sequence[float], present: Sequence[int], how: str) -> Tuple[float, ...]:
    """A per-task setting's entries for the ``present`` tasks (see :attr:`Component.per_task`).

    ``"rescale"`` multiplies them by ``sum(values) / sum(present entries)`` (when both
    are non-zero), so they sum to what all ``K`` entries sum to.
    """
    if how not in ("slice", "rescale"):
        raise ValueError(f"per_task: unknown rule {how!r} (expected 'slice' or 'rescale')")
    kept = tuple(float(values[i]) for i in present)
    total, part = float(sum(values)), sum(kept)
    if how == "rescale" and total != 0.0 and part != 0.0:
        kept = tuple(v * (total / part) for v in kept)
    return kept


def axes_of(key: str, axes: TaskAxes) -> Tuple[int, ...]:
    """The task axes of state ``key`` (exact key first, then the first matching pattern)."""
    if key in axes:
        return tuple(axes[key])
    for pattern, value in axes.items():
        if fnmatchcase(key, pattern):
            return tuple(value)
    return ()


def select_tasks(state: State, axes: TaskAxes, present: Sequence[int]) -> State:
    """The sub-state of the ``present`` tasks (a new dict; ``state`` is not touched)."""
    index = torch.tensor(list(present), dtype=torch.long)
    out: State = {}
    for key, value in state.items():
        for axis in axes_of(key, axes):
            if axis < value.dim():  # a 0-d legacy entry has no task axis
                value = value.index_select(axis, index.to(value.device))
        out[key] = value
    return out


def _put(full: Tensor, sub: Tensor, task_axes: Sequence[int], index: Tensor) -> Tensor:
    """``full`` with its ``index`` slices along every axis in ``task_axes`` replaced by ``sub``."""
    if not task_axes:
        return sub
    axis, rest = task_axes[0], task_axes[1:]
    inner = _put(full.index_select(axis, index), sub, rest, index)
    return full.index_copy(axis, index, inner.to(full.dtype))


def merge_tasks(
    old: State, new_sub: State, axes: TaskAxes, present: Sequence[int], num_tasks: int, fresh: State
) -> State:
    """Write a partial step's sub-state back into the full state (a new dict).

    Per-task slices of absent tasks keep their old values bitwise; entries without task
    axes take the new value. A key the old state lacks starts from ``fresh`` (the
    component's :meth:`~Component.init_state`), else from zeros.
    """
    index = torch.tensor(list(present), dtype=torch.long)
    out: State = dict(old)
    for key, value in new_sub.items():
        task_axes = axes_of(key, axes)
        base = old.get(key, fresh.get(key))
        shape = list(value.shape)
        for axis in task_axes:
            shape[axis] = num_tasks
        if task_axes and (base is None or list(base.shape) != shape):
            # none yet, or one of another layout (the component resets it itself, e.g.
            # a surgery state per parameter block met in representation mode's one block)
            base = torch.zeros(shape, dtype=value.dtype, device=value.device)
        out[key] = (
            _put(base.to(value.device, value.dtype), value, task_axes, index.to(value.device))
            if task_axes
            else value
        )
    return out


def check_partial(component: Optional[Component], kind: str, state: State, always: bool = False) -> None:
    """Refuse a step with absent tasks for a component that cannot be sliced by task.

    Args:
        component: the component (None: nothing to check).
        kind: its constructor argument (``"surgery"``), for the error.
        state: its current state.
        always: refuse without declared axes even when the state is empty (weightings,
            whose per-task arguments are bound to every task).

    Raises:
        ValueError: naming the method.
    """
    if component is None or component.task_axes() is not None:
        return
    if state or always:
        raise ValueError(
            f"{kind} {component.name or type(component).__name__!r} keeps per-task state but does not declare "
            "which state axes index tasks (task_axes()), so it cannot take a step with absent tasks; give "
            "every task's loss in each step, or declare task_axes() on the method"
        )
