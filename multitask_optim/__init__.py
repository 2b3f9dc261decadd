"""multitask_optim: multi-task training for PyTorch, inside the optimizer.

Wrap the optimizer you already have and hand ``step`` the per-task losses::

    opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), surgery="pcgrad")
    opt.zero_grad()
    opt.step([loss_a, loss_b])
"""

from __future__ import annotations

from .aggregators import AGGREGATORS, AggregationContext, Aggregator, get_aggregator, register_aggregator
from .optimizer import MultiTaskOptimizer
from .precondition import PRECONDITIONERS, Preconditioner
from .weighting import WEIGHTINGS, Weighting, WeightingContext, get_weighting, register_weighting

__version__ = "0.2.0"

__all__ = [
    "AGGREGATORS",
    "WEIGHTINGS",
    "AggregationContext",
    "Aggregator",
    "MultiTaskOptimizer",
    "PRECONDITIONERS",
    "Preconditioner",
    "Weighting",
    "WeightingContext",
    "get_aggregator",
    "get_weighting",
    "register_aggregator",
    "register_weighting",
]
