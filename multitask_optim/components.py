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

Components are found by name in a :class:`Registry`; a new method is one file whose
class registers itself with the registry's decorator.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Generic, Mapping, Optional, Type, TypeVar, Union

from torch import Tensor

State = Dict[str, Tensor]


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
                raise ValueError(f"unknown {self.kind} {spec!r}; known: {', '.join(sorted(self.classes))}")
            cls = found
        else:
            raise TypeError(
                f"{self.kind} must be None, a name or a {self.base.__name__}, got {type(spec).__name__}"
            )
        try:
            return cls(**options)
        except TypeError as error:
            raise TypeError(f"{self.kind} {cls.name!r}: {error}") from None

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
