"""Building every registered component for the contract tests.

The contract suites (``test_contracts.py``) run over ``sorted(AGGREGATORS)`` and
``sorted(WEIGHTINGS)``, so a method registered later inherits them with no new test
code. Most components build with their defaults; :data:`REQUIRED_KWARGS` is the one
place keyed by name: constructor arguments of the weightings that have no usable
default, as a function of the number of tasks ``K``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from multitask_optim import AGGREGATORS, WEIGHTINGS, Aggregator, Weighting

#: name -> (K -> constructor kwargs), for components that cannot be built with defaults.
REQUIRED_KWARGS: Dict[str, Callable[[int], Dict[str, Any]]] = {
    "static": lambda k: {"weights": [1.0 + 0.5 * i for i in range(k)]},
    "staged": lambda k: {"start_steps": [2 * i for i in range(k)]},
    "htw": lambda k: {"total_steps": 20},
}


def kwargs_for(name: str, num_tasks: int) -> Dict[str, Any]:
    """Constructor kwargs of component ``name`` for ``num_tasks`` tasks ({} for defaults)."""
    make = REQUIRED_KWARGS.get(name)
    return make(num_tasks) if make is not None else {}


def weighting_kwargs(name: Optional[str], num_tasks: int) -> Optional[Dict[str, Any]]:
    """``weighting_kwargs=`` for ``MultiTaskOptimizer`` (None when there are none)."""
    if name is None:
        return None
    return kwargs_for(name, num_tasks) or None


def make_aggregator(name: str, num_tasks: int = 2) -> Aggregator:
    return AGGREGATORS[name](**kwargs_for(name, num_tasks))


def make_weighting(name: str, num_tasks: int) -> Weighting:
    """A weighting bound to tasks ``"0" .. "K-1"``."""
    weighting = WEIGHTINGS[name](**kwargs_for(name, num_tasks))
    weighting.bind(task_names(num_tasks))
    return weighting


def task_names(num_tasks: int) -> tuple:
    return tuple(str(i) for i in range(num_tasks))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
