"""multitask_optim: multi-task training for PyTorch, inside the optimizer."""

from __future__ import annotations

from .aggregators import AGGREGATORS, Aggregator, GradVac, PCGrad, Sum, get_aggregator

__version__ = "0.1.0"

__all__ = ["AGGREGATORS", "Aggregator", "GradVac", "PCGrad", "Sum", "get_aggregator"]
