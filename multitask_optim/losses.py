"""Checking what ``step`` / ``accumulate`` are handed: the losses (names, count, types) and the
``representation=`` / ``features=`` tensors (they must require grad and feed the losses)."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .graph import LossGraph
from .partition import check_names

Losses = Union[Sequence[Tensor], Mapping[str, Tensor], Tensor]


def check_losses(losses: Losses, known: Optional[Tuple[str, ...]]) -> Tuple[Tuple[str, ...], List[Tensor]]:
    """Names and scalar losses in task order; raises naming the task, before any change.

    Args:
        losses: a sequence or a mapping of scalar tensors, or one 1-D tensor of ``K`` losses.
        known: the task names when already known (the losses must match them).
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise TypeError(
                "losses as one tensor must be 1-D, one loss per task (as torch.stack(losses) gives), "
                f"got shape {tuple(losses.shape)}"
            )
        losses = [losses[i] for i in range(losses.shape[0])]  # one node per task; the graph walk sees through
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


def check_tensor(tensor: Any, name: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if not tensor.requires_grad:
        raise ValueError(f"{name} does not require grad: pass the shared trunk's output, not a detached copy")


def named_features(features: Optional[Union[Tensor, Sequence[Tensor]]]) -> List[Tuple[str, Tensor]]:
    if features is None:
        return []
    items = [features] if isinstance(features, Tensor) else list(features)
    out = []
    for n, t in enumerate(items):
        name = "features" if isinstance(features, Tensor) else f"features[{n}]"
        check_tensor(t, name)
        out.append((name, t))
    return out


def check_passes(tensor: Tensor, graph: LossGraph, name: str) -> None:
    if not graph.passes_through(tensor):
        raise ValueError(
            f"{name}: no loss is computed from this tensor, so nothing would train through it. Pass the "
            "tensor the heads actually read (for a multi-input model, one per task: features=[z_1, ..., z_K]), "
            "or leave it out."
        )


def observed_values(losses: Any, known: Tuple[str, ...]) -> Tensor:
    """Loss values recomputed after a step (``update_weighting``), as a float64 CPU vector.

    Accepts a sequence or a mapping by task name of real scalars (tensors, with or
    without grad, or numbers), or a 1-D tensor of ``K`` values; raises a ``ValueError`` /
    ``TypeError`` naming the task before any change. Values are not checked for
    finiteness here: under torch.distributed that check follows the averaging, so every
    rank reaches the same verdict.
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(
                f"losses as one tensor must have shape ({len(known)},), got {tuple(losses.shape)}"
            )
        items: List[Any] = list(losses.unbind())
    elif isinstance(losses, Mapping):
        items = _from_mapping(losses, known)[1]
    elif isinstance(losses, (list, tuple)):
        items = list(losses)
    else:
        raise TypeError(f"losses must be a sequence, a mapping or a 1-D tensor, got {type(losses).__name__}")
    if len(items) != len(known):
        raise ValueError(f"expected {len(known)} losses (tasks {list(known)}), got {len(items)}")
    values = []
    for name, item in zip(known, items):
        if isinstance(item, Tensor):
            if item.numel() != 1 or item.is_complex() or not item.is_floating_point():
                raise TypeError(f"loss of task {name!r} must be a real floating-point scalar, got {item!r}")
            value = float(item.detach().reshape(()).to(torch.float64).cpu())
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            value = float(item)
        else:
            raise TypeError(f"loss of task {name!r} must be a real scalar, got {type(item).__name__}")
        values.append(value)
    return torch.tensor(values, dtype=torch.float64)
