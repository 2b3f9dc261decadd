"""Per-step statistics, as plain Python numbers for any logger."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

from torch import Tensor


def step_stats(
    gram: Optional[Tensor],
    coefficients: Optional[Tensor],
    weights: Sequence[float],
    losses: Sequence[float],
    skipped: int,
) -> Dict[str, Any]:
    """Statistics of one step from the summed Gram matrix ``(K, K)`` of the shared gradients.

    Keys: ``cosine`` (K x K list), ``grad_norms`` (per task), ``conflicts`` (pairs i < j
    with a negative inner product), ``coefficients`` (per block, lists), ``weights``,
    ``losses`` and ``skipped`` (steps skipped so far for non-finite values).
    """
    stats: Dict[str, Any] = {
        "weights": [float(w) for w in weights],
        "losses": [float(v) for v in losses],
        "skipped": int(skipped),
    }
    if gram is not None:
        g = gram.tolist()
        k = len(g)
        norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
        cosine = [
            [g[i][j] / (norms[i] * norms[j]) if norms[i] > 0 and norms[j] > 0 else 0.0 for j in range(k)]
            for i in range(k)
        ]
        stats["grad_norms"] = norms
        stats["cosine"] = cosine
        stats["conflicts"] = sum(1 for i in range(k) for j in range(i + 1, k) if g[i][j] < 0)
    if coefficients is not None:
        stats["coefficients"] = coefficients.tolist()
    return stats
