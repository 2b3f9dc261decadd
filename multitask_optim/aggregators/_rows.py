"""Helpers shared by the row-based surgeries: per-block buffers, counters, argument checks.

A row method keeps its per-task vectors (EMAs, tracked gradients, accumulators) per
block ``b`` under keys such as ``f"ema.{b}"``, shape ``(K, P_b)``, in the rows' dtype.
They are created at first use (``P_b`` is only known then) and never mutated: every
update builds a new tensor, so a skipped step can drop it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._host import host_stage
from .base import Shards, State


def block_buffer(state: State, key: str, rows: Tensor) -> Tensor:
    """``state[key]`` on the rows' device and dtype, or zeros shaped like ``rows`` when absent.

    Raises:
        ValueError: naming ``key`` when the stored buffer's shape is not the rows' shape.
    """
    found = state.get(key)
    if found is None:
        return torch.zeros_like(rows)
    if tuple(found.shape) != tuple(rows.shape):
        raise ValueError(
            f"surgery state {key!r} has shape {tuple(found.shape)} but the block's rows have shape "
            f"{tuple(rows.shape)}: the state is from another model or granularity"
        )
    return found.to(device=rows.device, dtype=rows.dtype)


def block_vector(
    state: State,
    key: str,
    num_blocks: int,
    num_tasks: int,
    fill: float,
    device: Optional[torch.device] = None,
) -> Tensor:
    """``state[key]`` as a ``(B, K)`` float64 tensor on ``device`` (the rows'; default the
    CPU), or ``fill`` everywhere when absent. The method's per-step work stays there: no
    host read (the state follows the rows)."""
    found = state.get(key)
    if found is None or tuple(found.shape) != (num_blocks, num_tasks):
        return torch.full((num_blocks, num_tasks), fill, dtype=torch.float64, device=device)
    return found.to(device=device or torch.device("cpu"), dtype=torch.float64)


def calls(state: State) -> int:
    """How many steps the method has taken (its ``"steps"`` counter, 0 when absent)."""
    found = state.get("steps")
    with host_stage():  # a host counter (CPU int64 state)
        return 0 if found is None else int(found)


def counter(value: int) -> Tensor:
    return torch.tensor(value, dtype=torch.int64)


def row_norms(rows: Tensor) -> Tensor:
    """``(K,)`` float64 Euclidean norms of the rows, on their device (no overflow for
    float32 rows, no host read)."""
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)


def whole_norms(rows: Sequence[Tensor], shards: Shards) -> Tensor:
    """``(B, K)`` float64 norms of every block's whole rows (on the rows' device).

    Whole rows: :func:`row_norms` of each block. Shards (FSDP2): the square root of the
    ranks' summed squared shard norms, one :meth:`Shards.sum` for every block (float64
    squares: no overflow for float32 or bfloat16 rows).
    """
    local = torch.stack([row_norms(r) for r in rows]) if rows else torch.zeros(0, 0, dtype=torch.float64)
    if not shards.sharded:
        return local
    return shards.sum(local.square()).sqrt()


def combine(coefs: Tensor, rows: Tensor) -> Tensor:
    """``rows^T coefs``: the ``(P,)`` update ``sum_i coefs[i] rows[i]`` in the rows' dtype."""
    return coefs.to(device=rows.device, dtype=rows.dtype) @ rows


def check_number(
    name: str, value: float, low: float, high: float = math.inf, open_low: bool = False
) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` if ``open_low``), else a ValueError naming it."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number, got {value!r}") from err
    below = number <= low if open_low else number < low
    if not math.isfinite(number) or below or number > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
    return number


def check_count(name: str, value: int) -> int:
    """``value`` as a non-negative int, else a ValueError naming it."""
    try:
        number = int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from err
    if isinstance(value, bool) or number != value or number < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return number
