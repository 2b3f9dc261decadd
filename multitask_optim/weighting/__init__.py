"""Loss weightings and their registry by name."""

from __future__ import annotations

from typing import Any, Dict, Type, Union

from .base import Equal, Weighting, WeightingContext
from .dwa import DynamicWeightAverage
from .gradnorm import GradNorm
from .htw import HTW
from .rlw import RandomLossWeighting
from .staged import StagedStart
from .static import StaticWeights
from .uncertainty import UncertaintyWeighting

WEIGHTINGS: Dict[str, Type[Weighting]] = {}


def register_weighting(cls: Type[Weighting]) -> Type[Weighting]:
    """Register a :class:`Weighting` subclass under its ``name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name to register under")
    WEIGHTINGS[cls.name] = cls
    return cls


for _cls in (
    Equal,
    StaticWeights,
    StagedStart,
    UncertaintyWeighting,
    DynamicWeightAverage,
    HTW,
    GradNorm,
    RandomLossWeighting,
):
    register_weighting(_cls)


def get_weighting(spec: Union[None, str, Weighting], **kwargs: Any) -> Weighting:
    """Resolve ``None`` (equal weights), a registered name or an instance."""
    if spec is None:
        return Equal()
    if isinstance(spec, Weighting):
        if kwargs:
            raise TypeError("keyword arguments are only accepted with a weighting given by name")
        return spec
    if isinstance(spec, str):
        cls = WEIGHTINGS.get(spec.lower())
        if cls is None:
            raise ValueError(f"unknown weighting {spec!r}; known: {', '.join(sorted(WEIGHTINGS))}")
        return cls(**kwargs)
    raise TypeError(f"weighting must be None, a name or a Weighting, got {type(spec).__name__}")


__all__ = [
    "HTW",
    "WEIGHTINGS",
    "DynamicWeightAverage",
    "Equal",
    "GradNorm",
    "RandomLossWeighting",
    "StagedStart",
    "StaticWeights",
    "UncertaintyWeighting",
    "Weighting",
    "WeightingContext",
    "get_weighting",
    "register_weighting",
]
