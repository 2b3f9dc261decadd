"""Checking what ``step`` / ``accumulate`` are handed: the losses (names, count, types) and the
``representation=`` / ``features=`` tensors (they must require grad and feed the losses)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._graph import LossGraph
from .partition import check_names

Losses = Union[Sequence[Optional[Tensor]], Mapping[str, Optional[Tensor]], Tensor]
Samples = Union[None, Sequence[float], Mapping[str, float]]


@dataclass
class Parsed:
    """The losses of one step, with the tasks absent from it.

    Attributes:
        names: every task's name, in task order (``K``).
        present: indices (into ``names``) of the tasks this step has, increasing.
        losses: their scalar losses, in the same order (``K'``).
    """

    names: Tuple[str, ...]
    present: Tuple[int, ...]
    losses: List[Tensor]

    @property
    def partial(self) -> bool:
        """Whether some task is absent from this step."""
        return len(self.present) < len(self.names)

    @property
    def present_names(self) -> Tuple[str, ...]:
        return tuple(self.names[i] for i in self.present)


def parse_losses(losses: Losses, known: Optional[Tuple[str, ...]]) -> Parsed:
    """The losses of a step that may lack some tasks; raises naming the task, before any change.

    A task is absent when a mapping does not name it (or maps it to ``None``), or a
    sequence holds ``None`` in its place. An absent task is neither a zero nor a NaN
    loss: it takes no part in the step. A mapping can leave tasks out only once the task
    names are known (``tasks=`` / ``task_names=`` / ``num_tasks=``, or an earlier step
    that named them all).

    Raises:
        ValueError: no task present, unknown task names, a wrong count, or a bad loss.
        TypeError: a loss that is not a real floating-point tensor.
    """
    if isinstance(losses, Mapping) and known is not None:
        unknown = [str(k) for k in losses.keys() if str(k) not in known]
        if unknown:
            missing = [n for n in known if n not in {str(k) for k in losses.keys()}]
            raise ValueError(
                f"losses do not match the tasks {list(known)}: missing {missing}, unknown {unknown}"
                " (name the tasks with tasks= or task_names= to use other keys; a task left out is absent)"
            )
        by_name = {str(k): v for k, v in losses.items()}
        present = tuple(i for i, n in enumerate(known) if by_name.get(n) is not None)
        items = [by_name[known[i]] for i in present]
        names = known
    elif isinstance(losses, Mapping):
        if any(v is None for v in losses.values()):
            raise ValueError(
                "losses: a task given as None is absent, which needs the task names first "
                "(pass tasks=, task_names= or num_tasks=, or name every task in the first step)"
            )
        names, items = _from_mapping(losses, None)  # type: ignore[arg-type]
        present = tuple(range(len(names)))
    elif isinstance(losses, (list, tuple)) and any(loss is None for loss in losses):
        if known is not None and len(losses) != len(known):
            raise ValueError(f"expected {len(known)} losses (tasks {list(known)}), got {len(losses)}")
        names = known if known is not None else tuple(str(i) for i in range(len(losses)))
        present = tuple(i for i, loss in enumerate(losses) if loss is not None)
        items = [losses[i] for i in present]
    else:
        names, items = check_losses(losses, known)  # type: ignore[arg-type]
        return Parsed(names, tuple(range(len(names))), items)
    if not items:
        raise ValueError(f"no task is present in this step (tasks {list(names)}): give at least one loss")
    for i, loss in zip(present, items):
        _check_one(names[i], loss)
    return Parsed(tuple(names), present, [scalar(loss) for loss in items])


def task_samples(samples: Samples, parsed: Parsed) -> Optional[List[float]]:
    """Per present task, this process's sample count (``step(..., samples=)``), or None.

    Raises:
        ValueError: a negative or non-finite count, unknown task names, a wrong length,
            or a count for an absent task that is not 0.
    """
    if samples is None:
        return None
    names = parsed.names
    if isinstance(samples, Mapping):
        unknown = [str(k) for k in samples if str(k) not in names]
        if unknown:
            raise ValueError(f"samples names unknown tasks {unknown}; the tasks are {list(names)}")
        by_name = {str(k): v for k, v in samples.items()}
        full = [by_name.get(n, 0.0 if i not in parsed.present else None) for i, n in enumerate(names)]
    else:
        full = list(samples)
        if len(full) != len(names):
            raise ValueError(f"samples has {len(full)} entries but there are {len(names)} tasks")
    out = []
    for i, (name, value) in enumerate(zip(names, full)):
        if value is None:
            raise ValueError(f"samples gives no count for task {name!r}, which is present")
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not value >= 0
            or value == float("inf")
        ):
            raise ValueError(f"samples[{name!r}] must be a finite number >= 0, got {value!r}")
        if i not in parsed.present and value != 0:
            raise ValueError(f"samples[{name!r}] is {value!r} but task {name!r} is absent from this step")
        if i in parsed.present:
            out.append(float(value))
    return out


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
    return names, [scalar(loss) for loss in items]


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


def scalar(loss: Tensor) -> Tensor:
    """``loss`` as a 0-d tensor (no view node added to the graph when it already is one)."""
    return loss if loss.dim() == 0 else loss.reshape(())


def loss_values(losses: Sequence[Tensor]) -> Tensor:
    """The losses' values as a detached float64 vector on their device (no host read: the
    host reads them with the rest of the step, see :mod:`._host`); losses on several
    devices are gathered on the first one's."""
    device = losses[0].device
    with torch.no_grad():
        if all(loss.device == device and loss.dim() == 0 for loss in losses):
            return torch.stack(list(losses)).to(torch.float64)  # stack promotes: every value exact
        return torch.stack([loss.reshape(()).to(device=device, dtype=torch.float64) for loss in losses])


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


#: What torch says when a backward reaches a graph whose saved tensors were freed.
_FREED = ("backward through the graph a second time", "saved tensors after they have already been freed")


def freed_graph_error(error: BaseException) -> Optional[RuntimeError]:
    """A clear error when ``error`` (or an error it was raised from) is autograd's "the graph
    was already freed", which here nearly always means the caller ran ``backward()`` on the
    losses before handing them to ``step``; None for any other error."""
    seen: List[BaseException] = []
    current: Optional[BaseException] = error
    while current is not None and current not in seen:
        if isinstance(current, RuntimeError) and any(text in str(current) for text in _FREED):
            return RuntimeError(
                "the losses' autograd graph was already freed, most likely by a backward() of your own "
                "before opt.step(losses) / opt.accumulate(losses): the optimizer runs the backward itself, "
                "so remove your loss.backward() call (or give it retain_graph=True if you need both); "
                "nothing was changed"
            )
        seen.append(current)
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def explained_errors() -> Iterator[None]:
    """Re-raise autograd's "graph already freed" error as :func:`freed_graph_error` explains it."""
    try:
        yield
    except RuntimeError as error:
        clear = freed_graph_error(error)
        if clear is None:
            raise
        raise clear from error
