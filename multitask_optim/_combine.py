"""How the shared updates ``J_b^T c_b`` are combined, decided on the host beforehand.

The old rule was "combine in the parameters' dtype, read whether the result is finite,
and recombine in float64 if not": one host read per step. Here the host decides from
what it already has -- the coefficients and a bound on every row's entries (the square
root of the Gram's diagonal, ``|J_ij| <= ||g_i|| = sqrt(G_ii)``; for a factored layer, its
inputs' and output gradients' largest entries) -- so the device combines without a
read:

- every value the combination forms is at most ``sum_i |c_i| bound_i``; when that is
  below a quarter of the dtype's largest number (room for rounding), the dtype cannot
  overflow and the result is the one the old rule gave;
- otherwise the combination runs in float64, and only when even the result may not fit
  the parameters' dtype is it checked after (one more host read: a gradient near
  ``1e38`` in float32);
- coefficients so small that a block's largest is below ``2^-60`` are divided by a
  power of two first and the update multiplied back once, in float64; a coefficient
  below the dtype's smallest normal number, or beyond a quarter of its largest (a
  ``1e40`` that meets rows of ``1e-20``), makes the combination float64 (as before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._host import host_stage

#: A block whose largest coefficient is below this is rescaled by a power of two first.
TINY_COEF = 2.0**-60


@dataclass
class CombinePlan:
    """The host's decisions for one combination.

    Attributes:
        mix: ``(B, K)`` float64 host coefficients, divided by ``scale`` when it is set.
        scale: per block, the power of two divided out of ``mix`` and multiplied back
            into the update once (None: none).
        wide: combine in float64 (tiny coefficients, or a bound beyond the dtype).
        checked: the result is known finite; False: read whether it is (rare).
        raw: the coefficients as given, when ``mix`` was rescaled.
    """

    mix: Tensor
    scale: Optional[List[float]] = None
    wide: bool = False
    checked: bool = True
    raw: Optional[Tensor] = None

    @property
    def coefficients(self) -> Tensor:
        """The coefficients as given (before any rescaling)."""
        return self.mix if self.raw is None else self.raw


def below_normal(values: Sequence[float], dtype: torch.dtype) -> bool:
    """Whether a non-zero value is below ``dtype``'s smallest normal (not representable)."""
    if dtype == torch.float64:
        return False
    tiny = torch.finfo(dtype).tiny
    return any(v != 0.0 and abs(v) < tiny for v in values)


def plan(mix: Tensor, bounds: Sequence[Sequence[float]], dtype: Optional[torch.dtype]) -> CombinePlan:
    """Decide how to combine ``mix`` (``(B, K)`` host coefficients) over rows of ``dtype``.

    ``bounds[b][i]`` bounds the entries of task ``i``'s rows in block ``b`` (and anything
    a factored layer forms from them, per unit coefficient). ``dtype`` None: no rows.
    """
    with host_stage():
        rows = mix.tolist()
    given, scale = mix, None
    if any(0.0 < max((abs(c) for c in row), default=0.0) < TINY_COEF for row in rows):
        scale = []
        for row in rows:
            peak = max((abs(c) for c in row), default=0.0)
            scale.append(2.0 ** math.floor(math.log2(peak)) if peak > 0 else 1.0)
        rows = [[c / s for c in row] for row, s in zip(rows, scale)]
        mix = torch.tensor(rows, dtype=torch.float64).reshape(mix.shape)
    raw = None if scale is None else given
    if dtype is None or dtype == torch.float64:
        return CombinePlan(mix, scale, raw=raw)
    limit = torch.finfo(dtype).max / 4
    reach = [sum(abs(c) * b for c, b in zip(row, bound)) for row, bound in zip(rows, bounds)]
    unbounded = any(not r <= limit for r in reach)  # NaN counts as unbounded
    flat = [c for row in rows for c in row]
    beyond = any(abs(c) > limit for c in flat)  # a coefficient the dtype cannot hold (1e40 in float32)
    wide = below_normal(flat, dtype) or unbounded or beyond
    after = reach if scale is None else [r * s for r, s in zip(reach, scale)]
    checked = all(r <= limit for r in after)
    return CombinePlan(mix, scale, wide, checked, raw)
