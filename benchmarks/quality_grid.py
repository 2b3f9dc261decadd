"""Every configuration the library offers, as ``MultiTaskOptimizer`` keyword dicts.

The advisor's validation (:mod:`benchmarks.advisor_check`) trains each of these on the
real datasets of :mod:`benchmarks.quality_real`: every registered surgery alone (the plain
sum is ``surgery=None``), every registered weighting alone, each per-task preconditioner,
and the settings of DB-MTL and MoCo for an Adam-like inner optimizer (no moving average
of gradients in front of Adam's own). The list is built from the registries, so a method
registered later joins it; the few methods that need arguments (a step budget, epochs,
the last shared layer, per-task kinds) get them from :class:`GridContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from multitask_optim import AGGREGATORS, PRECONDITIONERS, WEIGHTINGS


@dataclass(frozen=True)
class GridContext:
    """What a configuration's arguments may depend on."""

    tasks: Tuple[str, ...]
    kinds: Tuple[str, ...]  # "classification" / "regression" per task
    total_steps: int
    steps_per_epoch: int
    first_losses: Tuple[float, ...]
    last_shared: Optional[Callable[[], List[Tensor]]] = None


Builder = Callable[[GridContext], Dict[str, Any]]

#: arguments of the weightings that need some (the quality benchmark's settings)
_WEIGHTING_ARGS: Dict[str, Builder] = {
    "static": lambda c: {
        "weights": [len(c.tasks) * (1 / v) / sum(1 / v for v in c.first_losses) for v in c.first_losses]
    },
    "staged": lambda c: {"start_steps": [0] + [c.total_steps // 10] * (len(c.tasks) - 1)},
    "uncertainty": lambda c: {"kind": dict(zip(c.tasks, c.kinds)), "lr": 2e-2},
    "dwa": lambda c: {"temperature": 2.0, "steps_per_epoch": c.steps_per_epoch},
    "gradnorm": lambda c: {"alpha": 1.5, "lr": 2e-2, **({"layer": c.last_shared()} if c.last_shared else {})},
    "htw": lambda c: {"main_task": 0, "total_steps": c.total_steps, "warmup": 0.1},
    "rlw": lambda c: {"scale": "sumK"},
    "stch": lambda c: {"warmup_epochs": 1, "steps_per_epoch": c.steps_per_epoch},
}
#: arguments of the surgeries that need some
_SURGERY_ARGS: Dict[str, Builder] = {
    "pareto": lambda c: {"lower_bounds": 0.2 / len(c.tasks)},
}
#: settings beyond the defaults (each a name and a config)
EXTRA: Tuple[Tuple[str, Dict[str, Any]], ...] = (
    ("db_mtl(beta=0)", {"surgery": "db_mtl", "surgery_kwargs": {"beta": 0.0}}),
    ("moco(beta=1)", {"surgery": "moco", "surgery_kwargs": {"beta": 1.0, "beta_sigma": 0.0}}),
)


def _names(registry: Any) -> List[str]:
    return sorted(registry.keys())


def grid(num_tasks: int) -> List[Tuple[str, Builder]]:
    """``(name, builder)`` of every configuration defined for ``num_tasks`` tasks."""
    out: List[Tuple[str, Builder]] = [("sum", lambda c: {"surgery": None})]
    for name in _names(AGGREGATORS):
        if name == "sum" or _min_tasks(name) > num_tasks:
            continue
        extra = _SURGERY_ARGS.get(name)
        out.append((name, _surgery(name, extra)))
    for name in _names(WEIGHTINGS):
        if name != "equal":
            out.append((name, _weighting(name, _WEIGHTING_ARGS.get(name))))
    for name in _names(PRECONDITIONERS):
        out.append((f"precondition={name}", _fixed({"surgery": None, "precondition": name})))
    out += [(name, _fixed(cfg)) for name, cfg in EXTRA]
    return out


def _min_tasks(name: str) -> int:
    method = AGGREGATORS[name]()
    return int(method.min_tasks()) if hasattr(method, "min_tasks") else 2


def _surgery(name: str, extra: Optional[Builder]) -> Builder:
    return lambda c: {"surgery": name, **({"surgery_kwargs": extra(c)} if extra else {})}


def _weighting(name: str, extra: Optional[Builder]) -> Builder:
    return lambda c: {"surgery": None, "weighting": name, **({"weighting_kwargs": extra(c)} if extra else {})}


def _fixed(config: Dict[str, Any]) -> Builder:
    return lambda c: dict(config)


def same_config(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two configs are the same method with the same arguments (None = absent)."""
    keys = set(a) | set(b)
    return all(_plain(a.get(k)) == _plain(b.get(k)) for k in keys)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None} or None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def names_of(entries: Sequence[Tuple[str, Builder]]) -> List[str]:
    return [n for n, _ in entries]
