"""Any callable that maps a Gram matrix to task weights, used as a surgery.

TorchJD's Gramian weightings (``torchjd.aggregation.UPGradWeighting()``,
``MGDAWeighting()``, ...) map a ``(K, K)`` Gramian to ``K`` weights, and TorchJD's
aggregator returns ``J^T w``: exactly our coefficient contract. Passing such an object
as ``surgery=`` wraps it in :class:`GramianCallable`, which calls it once per block,
so ``MultiTaskOptimizer(..., surgery=UPGradWeighting())`` gives TorchJD's result.

A wrapped callable keeps whatever state it has itself (e.g. TorchJD's GradVac targets
or its use of torch's global generator): that state is not in the optimizer's
checkpoint. Prefer the built-in method of the same name when there is one.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch
from torch import Tensor

from .base import AggregationContext, Aggregator, State


class GramianCallable(Aggregator):
    """Coefficients ``c_b = fn(G_b)`` from a callable on ``(K, K)`` Gram matrices.

    Args:
        fn: a callable taking a ``(K, K)`` float64 tensor and returning ``K`` weights.

    Raises:
        TypeError: ``fn`` is not callable.
    """

    name = "gramian_callable"

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not callable(fn):
            raise TypeError(
                f"surgery: expected an Aggregator, a name or a callable on a Gram matrix, got {fn!r}"
            )
        if _is_torchjd_matrix_weighting(fn):
            raise TypeError(
                f"surgery: {type(fn).__name__} is a TorchJD weighting of the Jacobian matrix, not of its Gramian; "
                "given a Gram matrix it would compute something else. Pass a Gramian weighting (e.g. "
                "UPGradWeighting()) or the built-in method by name."
            )
        self.fn = fn

    def aggregate(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        """Call the wrapped weighting on every block's Gram matrix.

        Raises:
            ValueError: the callable returned weights of another shape than ``(K,)``.
        """
        out = []
        for g in gram:
            weights = torch.as_tensor(self.fn(g)).detach().to(device="cpu", dtype=torch.float64)
            if weights.shape != (gram.shape[-1],):
                raise ValueError(
                    f"surgery {self.fn!r} returned weights of shape {tuple(weights.shape)} for a "
                    f"{gram.shape[-1]} x {gram.shape[-1]} Gram matrix; expected ({gram.shape[-1]},)"
                )
            out.append(weights)
        return torch.stack(out), state

    def settings(self) -> Dict[str, Any]:
        return {"fn": type(self.fn).__qualname__}


def _is_torchjd_matrix_weighting(fn: object) -> bool:
    """A TorchJD ``Weighting`` that is not one of its Gramian weightings (which read ``J J^T``)."""
    bases = [f"{c.__module__}.{c.__qualname__}" for c in type(fn).__mro__]
    from_torchjd = any(b.startswith("torchjd.") and b.endswith(".Weighting") for b in bases)
    gramian = any(b.startswith("torchjd.") and "GramianWeighting" in b for b in bases)
    return from_torchjd and not gramian
