"""Checking the losses handed to ``step`` / ``accumulate``: names, count, types."""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .partition import check_names

Losses = Union[Sequence[Tensor], Mapping[str, Tensor], Tensor]


def check_losses(losses: Losses, known: Optional[Tuple[str, ...]]) -> Tuple[Tuple[str, ...], List[Tensor]]:
    """Names and scalar losses in task order; raises naming the task, before any change.

    Args:
        losses: a sequence or a mapping of scalar tensors.
        known: the task names when already known (the losses must match them).
    """
    if isinstance(losses, Tensor):
        raise TypeError(
            "losses must be a sequence or a mapping of scalar tensors, one per task, not one tensor"
        )
    if isinstance(losses, Mapping):
        names, items = _from_mapping(losses, known)
    elif isinstance(losses, (list, tuple)):
        items = list(losses)
        if known is not None and len(items) != len(known):
            raise ValueError(f"expected {len(known)} losses (tasks {list(known)}), got {len(items)}")
        names = known if known is not None else tuple(str(i) for i in range(len(items)))
    else:
        raise TypeError(f"losses must be a sequence or a mapping of tensors, got {type(losses).__name__}")
    if not items:
        raise ValueError("losses is empty: give one loss per task")
    for name, loss in zip(names, items):
        _check_one(name, loss)
    return names, [loss.reshape(()) for loss in items]


def _from_mapping(
    losses: Mapping[str, Tensor], known: Optional[Tuple[str, ...]]
) -> Tuple[Tuple[str, ...], List[Tensor]]:
    keys = tuple(str(k) for k in losses.keys())
    if known is None:
        return check_names(keys), list(losses.values())
    if set(keys) != set(known) or len(keys) != len(known):
        missing = [n for n in known if n not in keys]
        extra = [n for n in keys if n not in known]
        raise ValueError(
            f"losses do not match the tasks {list(known)}: missing {missing}, unknown {extra}"
            " (name the tasks with tasks= or task_names= to use other keys)"
        )
    by_name = {str(k): v for k, v in losses.items()}
    return known, [by_name[n] for n in known]


def _check_one(name: str, loss: object) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss of task {name!r} must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss of task {name!r} must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise TypeError(f"loss of task {name!r} must be a real floating-point tensor, got {loss.dtype}")
    if not loss.requires_grad or loss.grad_fn is None:
        raise ValueError(f"loss of task {name!r} does not require grad (is it detached?)")


def loss_values(losses: Sequence[Tensor]) -> Tensor:
    """The losses' values as a detached float64 CPU vector."""
    return torch.stack([loss.detach().reshape(()).to(torch.float64).cpu() for loss in losses])
