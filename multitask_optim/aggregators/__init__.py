"""Gram-space aggregators (``surgery=``) and their registry by name.

Each method is one module whose class registers itself with ``@AGGREGATORS.register``;
importing the module is all it takes to make ``surgery="name"`` work.
"""

from __future__ import annotations

from typing import Any, Union

from . import (  # noqa: F401  (each module registers its method)
    aligned_mtl,
    cagrad,
    config,
    db_mtl,
    dualproj,
    excess_mtl,
    fairgrad,
    graddrop,
    gradvac,
    imtl_g,
    krum,
    mgda,
    moco,
    nash_mtl,
    pareto,
    pcgrad,
    sum,
    trimmed_mean,
    upgrad,
)
from .aligned_mtl import AlignedMTL
from .base import AGGREGATORS, AggregationContext, Aggregator, RowAggregator, Shards, random_orders
from .cagrad import CAGrad
from .config import ConFIG
from .db_mtl import DBMTL
from .dualproj import DualProj
from .excess_mtl import ExcessMTL
from .external import GramianCallable
from .fairgrad import FairGrad
from .graddrop import GradDrop
from .gradvac import GradVac, gradvac_coefficients
from .imtl_g import IMTLG
from .krum import Krum
from .mgda import MGDA, mgda_coefficients
from .moco import MoCo
from .nash_mtl import NashMTL
from .pareto import ParetoWeights
from .pcgrad import PCGrad, pcgrad_coefficients
from .sum import Sum
from .trimmed_mean import TrimmedMean
from .upgrad import UPGrad


def register_aggregator(cls: type) -> type:
    """Register an :class:`Aggregator` subclass under its ``name`` (usable as a decorator).

    Args:
        cls: the subclass; its ``name`` becomes ``surgery="name"``.

    Returns:
        ``cls`` itself.
    """
    return AGGREGATORS.register(cls)


def get_aggregator(spec: Union[None, str, Aggregator], **kwargs: Any) -> Aggregator:
    """Resolve ``None`` (plain sum), a registered name or an instance to an aggregator.

    Args:
        spec: ``None``, a registered name (``"pcgrad"``) or an :class:`Aggregator`.
        **kwargs: hyper-parameters of a method given by name.

    Returns:
        The aggregator.

    Raises:
        ValueError: an unknown name.
        TypeError: keyword arguments with an instance, or a spec of another type.
    """
    out = AGGREGATORS.build(spec, kwargs)
    assert out is not None
    return out


__all__ = [
    "AGGREGATORS",
    "AggregationContext",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DBMTL",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "GramianCallable",
    "IMTLG",
    "Krum",
    "MGDA",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "ParetoWeights",
    "RowAggregator",
    "Shards",
    "Sum",
    "TrimmedMean",
    "UPGrad",
    "get_aggregator",
    "gradvac_coefficients",
    "mgda_coefficients",
    "pcgrad_coefficients",
    "random_orders",
    "register_aggregator",
]
