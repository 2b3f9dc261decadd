"""Loss weightings (``weighting=``) and their registry by name.

Each method is one module whose class registers itself with ``@WEIGHTINGS.register``.
"""

from __future__ import annotations

from typing import Any, Union

from . import dwa, famo, gls, gradnorm, htw, imtl_l, rlw, staged, static, stch, uncertainty  # noqa: F401
from .base import WEIGHTINGS, Equal, Weighting, WeightingContext
from .dwa import DynamicWeightAverage
from .famo import FAMO
from .gls import GeometricLossStrategy
from .gradnorm import GradNorm
from .htw import HTW
from .imtl_l import IMTLL
from .rlw import RandomLossWeighting
from .staged import StagedStart
from .static import StaticWeights
from .stch import SmoothTchebycheff
from .uncertainty import UncertaintyWeighting


def register_weighting(cls: type) -> type:
    """Register a :class:`Weighting` subclass under its ``name`` (usable as a decorator).

    Args:
        cls: the subclass; its ``name`` becomes ``weighting="name"``.

    Returns:
        ``cls`` itself.
    """
    return WEIGHTINGS.register(cls)


def get_weighting(spec: Union[None, str, Weighting], **kwargs: Any) -> Weighting:
    """Resolve ``None`` (equal weights), a registered name or an instance.

    Args:
        spec: ``None``, a registered name (``"dwa"``) or a :class:`Weighting`.
        **kwargs: hyper-parameters of a method given by name.

    Returns:
        The weighting.

    Raises:
        ValueError: an unknown name.
        TypeError: keyword arguments with an instance, or a spec of another type.
    """
    out = WEIGHTINGS.build(spec, kwargs)
    assert out is not None
    return out


__all__ = [
    "FAMO",
    "HTW",
    "IMTLL",
    "WEIGHTINGS",
    "DynamicWeightAverage",
    "Equal",
    "GeometricLossStrategy",
    "GradNorm",
    "RandomLossWeighting",
    "SmoothTchebycheff",
    "StagedStart",
    "StaticWeights",
    "UncertaintyWeighting",
    "Weighting",
    "WeightingContext",
    "get_weighting",
    "register_weighting",
]
