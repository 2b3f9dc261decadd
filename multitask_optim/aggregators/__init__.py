"""Gram-space aggregators and their registry by name."""

from __future__ import annotations

from typing import Any, Callable, Dict, Type, Union

from .aligned_mtl import AlignedMTL
from .base import AggregationContext, Aggregator, random_orders
from .cagrad import CAGrad
from .config import ConFIG
from .dualproj import DualProj
from .fairgrad import FairGrad
from .gradvac import GradVac, gradvac_coefficients
from .imtl_g import IMTLG
from .krum import Krum
from .mgda import MGDA, mgda_coefficients
from .nash_mtl import NashMTL
from .pareto import ParetoWeights
from .pcgrad import PCGrad, pcgrad_coefficients
from .sum import Sum
from .upgrad import UPGrad

AGGREGATORS: Dict[str, Type[Aggregator]] = {}


def register_aggregator(cls: Type[Aggregator]) -> Type[Aggregator]:
    """Register an :class:`Aggregator` subclass under its ``name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name to register under")
    AGGREGATORS[cls.name] = cls
    return cls


for _cls in (
    Sum,
    PCGrad,
    GradVac,
    MGDA,
    ParetoWeights,
    UPGrad,
    DualProj,
    CAGrad,
    IMTLG,
    AlignedMTL,
    ConFIG,
    NashMTL,
    FairGrad,
    Krum,
):
    register_aggregator(_cls)


def get_aggregator(spec: Union[None, str, Aggregator], **kwargs: Any) -> Aggregator:
    """Resolve ``None`` (plain sum), a registered name or an instance to an aggregator."""
    if spec is None:
        return Sum(**kwargs)
    if isinstance(spec, Aggregator):
        if kwargs:
            raise TypeError("keyword arguments are only accepted with a surgery given by name")
        return spec
    if isinstance(spec, str):
        cls: Callable[..., Aggregator] | None = AGGREGATORS.get(spec.lower())
        if cls is None:
            known = ", ".join(sorted(AGGREGATORS))
            raise ValueError(f"unknown surgery {spec!r}; known: {known}")
        return cls(**kwargs)
    raise TypeError(f"surgery must be None, a name or an Aggregator, got {type(spec).__name__}")


__all__ = [
    "AGGREGATORS",
    "AggregationContext",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "IMTLG",
    "Krum",
    "NashMTL",
    "UPGrad",
    "GradVac",
    "MGDA",
    "PCGrad",
    "ParetoWeights",
    "Sum",
    "get_aggregator",
    "gradvac_coefficients",
    "mgda_coefficients",
    "pcgrad_coefficients",
    "random_orders",
    "register_aggregator",
]
