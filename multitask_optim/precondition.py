"""Per-task adaptive preconditioning of the shared gradients.

Each task keeps its own second-moment accumulator ``v_i`` over the shared parameters
and its gradient is rescaled element-wise::

    g_hat_i = g_i / (sqrt(v_hat_i) + eps)

- ``adagrad``: ``v_i <- v_i + g_i^2``, ``v_hat_i = v_i``;
- ``rmsprop``: ``v_i <- beta2 v_i + (1 - beta2) g_i^2``, ``v_hat_i = v_i``;
- ``adam``: the RMSProp EMA with bias correction ``v_hat_i = v_i / (1 - beta2^t)``.

This gives every task its own adaptive learning rate on the shared trunk: multiplying
one task's loss by ``c > 0`` leaves ``g_hat_i`` unchanged (up to ``eps``), so a task
whose loss is 1000x larger no longer dominates the shared update. With an inner SGD the
wrapper is exactly per-task Adagrad/RMSProp/Adam on the shared trunk.

The update is functional: :meth:`Preconditioner.apply` returns the rescaled gradients
and the new accumulators; the optimizer commits them only if the step is not skipped.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

KINDS = ("adagrad", "rmsprop", "adam")
ParamState = Dict[str, Tensor]


class Preconditioner:
    """Per-task second-moment accumulators over the shared parameters.

    Args:
        kind: ``"adagrad"``, ``"rmsprop"`` or ``"adam"``.
        eps: added to ``sqrt(v_hat)`` (must be > 0).
        beta2: EMA rate of ``rmsprop`` and ``adam``, in ``[0, 1)``.
    """

    def __init__(self, kind: str, eps: float = 1e-8, beta2: float = 0.999) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown precondition {kind!r}; known: None, {', '.join(KINDS)}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
        self.kind = kind
        self.eps = float(eps)
        self.beta2 = float(beta2)

    def apply(
        self, jacobians: Sequence[Optional[Tensor]], states: Sequence[Optional[ParamState]]
    ) -> Tuple[List[Optional[Tensor]], List[Optional[ParamState]]]:
        """Rescale each ``(K, *shape)`` Jacobian; return it and the new per-parameter state.

        ``states[p]`` is None for a parameter never seen before. A parameter no loss
        reached (``jacobians[p] is None``) keeps its state unchanged.
        """
        out: List[Optional[Tensor]] = []
        new_states: List[Optional[ParamState]] = []
        for jac, state in zip(jacobians, states):
            if jac is None:
                out.append(None)
                new_states.append(state)
                continue
            square = jac * jac
            if state is None:
                v_old = torch.zeros_like(jac)
                step = torch.zeros((), dtype=torch.float64)
            else:
                v_old, step = state["v"], state["step"]
            step = step + 1
            if self.kind == "adagrad":
                v = v_old + square
                denom = v.sqrt()
            else:
                v = torch.lerp(v_old, square, 1.0 - self.beta2)
                if self.kind == "adam":
                    correction = 1.0 - self.beta2 ** float(step)
                    denom = (v / correction).sqrt()
                else:
                    denom = v.sqrt()
            out.append(jac / denom.add_(self.eps))
            new_states.append({"v": v, "step": step})
        return out, new_states

    def __repr__(self) -> str:
        return f"Preconditioner(kind={self.kind!r}, eps={self.eps}, beta2={self.beta2})"
