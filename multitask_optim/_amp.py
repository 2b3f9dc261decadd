"""Mixed precision: a ``torch.amp.GradScaler`` driven by the multi-task optimizer.

With ``grad_scaler=scaler`` the optimizer multiplies each loss by the current scale
before differentiating, divides every per-task gradient by it before any weighting,
normalisation or Gram, and, at the end of the step, tells the scaler whether an
inf/NaN was found and updates its scale (backing off on a skipped step, growing it
after ``growth_interval`` clean steps) -- what ``scaler.step(opt); scaler.update()``
does for a plain optimizer. Do not call ``scaler.step`` or ``scaler.update`` yourself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def current_scale(scaler: Any) -> float:
    """The scaler's scale as a float (1.0 when the scaler is disabled)."""
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def update(scaler: Any, optimizer: torch.optim.Optimizer, found_inf: bool, device: torch.device) -> None:
    """Record this step's inf check for ``optimizer`` and update the scale."""
    if scaler is None or not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    if scaler._scale is None:
        scaler._lazy_init_scale_growth_tracker(device)
    scale: Tensor = scaler._scale
    state = scaler._per_optimizer_states[id(optimizer)]
    flag = torch.full((), 1.0 if found_inf else 0.0, dtype=torch.float32, device=scale.device)
    state["found_inf_per_device"] = {scale.device: flag}
    state["stage"] = OptState.STEPPED
    scaler.update()
