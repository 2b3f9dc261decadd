"""What the framework adapters share: imports that name their extra, finding the
``MultiTaskOptimizer`` inside a framework's wrappers, and per-task statistics as scalars."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..diagnostics import log_stats
from ..optimizer import MultiTaskOptimizer


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise an ImportError that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"multitask_optim.integrations.{extra} needs {module!r}: pip install -e '.[{extra}]' "
            f"in the checkout (or pip install {module})"
        ) from error


def find_multitask(optimizer: Any) -> Optional[MultiTaskOptimizer]:
    """The ``MultiTaskOptimizer`` inside framework wrappers (each keeps the one it wraps as
    ``.optimizer``: Accelerate, Lightning, DeepSpeed), or None.

    The innermost one: Lightning's ``LightningOptimizer`` is itself an instance of the
    optimizer's class holding a copy of its attributes, which a step must not update."""
    found = None
    for _ in range(8):
        if optimizer is None:
            break
        if isinstance(optimizer, MultiTaskOptimizer):
            found = optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return found


class _Collect:
    def add_scalar(self, tag: str, value: float, step: int) -> None:
        pass


def step_scalars(
    stats: Mapping[str, Any], task_names: Sequence[str], prefix: str = "multitask"
) -> Dict[str, float]:
    """One step's ``last_stats`` as ``{tag: float}`` (the tags of :func:`~multitask_optim.diagnostics.log_stats`)."""
    if not stats:
        return {}
    return log_stats(_Collect(), stats, 0, prefix=prefix, task_names=list(task_names) or None)


class Means:
    """Running means of named scalars between two logging steps."""

    def __init__(self) -> None:
        self._sums: Dict[str, float] = {}
        self._counts: Dict[str, int] = {}

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1

    def pop(self) -> Dict[str, float]:
        """The means since the last call (and start again)."""
        out = {key: total / self._counts[key] for key, total in self._sums.items()}
        self._sums, self._counts = {}, {}
        return out


def task_values(losses: Any, names: Sequence[str]) -> Dict[str, float]:
    """Detached per-task loss values by name from a mapping or a sequence (absent tasks left out)."""
    items: List[Any]
    if isinstance(losses, Mapping):
        items = [(str(k), v) for k, v in losses.items()]
    else:
        items = [(names[i] if i < len(names) else str(i), v) for i, v in enumerate(losses)]
    return {
        name: float(v.detach()) if hasattr(v, "detach") else float(v) for name, v in items if v is not None
    }
