"""Helpers shared by the weightings: per-task arguments, scalar state, checks.

Several weightings take a per-task argument either as a sequence (in task order) or
as a mapping keyed by task name. Names can only be resolved once the task names are
known (:meth:`Weighting.setup`), so ``__init__`` validates the values and ``setup``
resolves and checks the names.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor

T = TypeVar("T")
State = Dict[str, Tensor]

PerTask = Union[Sequence[T], Mapping[str, T]]


def is_mapping(value: Any) -> bool:
    return isinstance(value, Mapping)


def check_per_task(
    value: Any, argname: str, check: Callable[[Any, str], T], *, allow_scalar: bool = False
) -> Union[T, List[T], dict]:
    """Validate a per-task argument's values at construction.

    Args:
        value: a sequence, a mapping ``{task name: value}`` or (``allow_scalar``) one value.
        argname: the argument's name, used in error messages.
        check: ``check(item, where)`` validates and normalises one value, raising a
            ``ValueError`` that mentions ``where``.
        allow_scalar: accept a single value meaning "the same for every task".

    Returns:
        The normalised scalar, list or dict.
    """
    if is_mapping(value):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{argname} keys must be task names (str), got {key!r}")
            out[key] = check(item, f"{argname}[{key!r}]")
        return out
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        if allow_scalar:
            return check(value, argname)
        raise ValueError(
            f"{argname} must be a sequence or a mapping of task name to value, got {type(value).__name__}"
        )
    return [check(item, f"{argname}[{i}]") for i, item in enumerate(value)]


def resolve_per_task(
    value: Any,
    task_names: Sequence[str],
    argname: str,
    *,
    default: Optional[Any] = None,
    allow_missing: bool = False,
) -> list:
    """Turn a validated per-task argument into a list in task order.

    Args:
        value: the output of :func:`check_per_task` (scalar, list or dict).
        task_names: the task names, in order.
        argname: the argument's name, used in error messages.
        default: value for tasks a mapping leaves out (only with ``allow_missing``).
        allow_missing: whether a mapping may leave tasks out.

    Raises:
        ValueError: a sequence of the wrong length, a mapping naming unknown tasks, or
            (without ``allow_missing``) a mapping that leaves tasks out.
    """
    k = len(task_names)
    if isinstance(value, dict):
        unknown = [name for name in value if name not in task_names]
        if unknown:
            raise ValueError(f"{argname} names unknown tasks {unknown}; the tasks are {list(task_names)}")
        missing = [name for name in task_names if name not in value]
        if missing and not allow_missing:
            raise ValueError(f"{argname} gives no value for tasks {missing}")
        return [value.get(name, default) for name in task_names]
    if isinstance(value, list):
        if len(value) != k:
            raise ValueError(f"{argname} has {len(value)} entries but there are {k} tasks")
        return list(value)
    return [value] * k


def check_nonnegative_float(value: Any, where: str) -> float:
    """A finite float >= 0."""
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(out) or out < 0.0:
        raise ValueError(f"{where} must be finite and >= 0, got {value!r}")
    return out


def check_nonnegative_int(value: Any, where: str) -> int:
    """An integer >= 0 (bools and non-integral floats are rejected)."""
    if isinstance(value, bool):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        out = int(value.__index__())
    except (AttributeError, TypeError):
        raise ValueError(f"{where} must be an integer, got {value!r}") from None
    if out < 0:
        raise ValueError(f"{where} must be >= 0, got {value!r}")
    return out


def check_positive_int(value: Any, where: str) -> int:
    out = check_nonnegative_int(value, where)
    if out == 0:
        raise ValueError(f"{where} must be >= 1, got {value!r}")
    return out


def check_lr(lr: Any) -> Optional[float]:
    """``None`` or a finite float > 0."""
    if lr is None:
        return None
    if isinstance(lr, bool):
        raise ValueError(f"lr must be None or a positive number, got {lr!r}")
    try:
        out = float(lr)
    except (TypeError, ValueError):
        raise ValueError(f"lr must be None or a positive number, got {lr!r}") from None
    if not math.isfinite(out) or out <= 0.0:
        raise ValueError(f"lr must be None or a finite number > 0, got {lr!r}")
    return out


def check_num_losses(losses: Tensor, num_tasks: Optional[int], who: str) -> None:
    if losses.dim() != 1:
        raise ValueError(f"{who}: losses must have shape (K,), got {tuple(losses.shape)}")
    if num_tasks is not None and losses.shape[0] != num_tasks:
        raise ValueError(f"{who}: expected {num_tasks} losses, got {losses.shape[0]}")


def task_label(index: int, task_names: Optional[Sequence[str]]) -> str:
    if task_names is not None and index < len(task_names):
        return repr(task_names[index])
    return str(index)


def check_loss_ratio_inputs(losses: Tensor, task_names: Optional[Sequence[str]], who: str) -> None:
    """Loss-ratio methods need ``L_i(t) >= 0`` (a 0 is fine: see :class:`LossRatio`); name offending tasks."""
    bad = [task_label(i, task_names) for i in range(losses.shape[0]) if not losses[i] >= 0]
    if bad:
        raise ValueError(f"{who} needs non-negative losses; task(s) {', '.join(bad)} have negative losses")


def scalar(value: Union[int, float, bool], dtype: torch.dtype = torch.float64) -> Tensor:
    """A 0-d CPU tensor (state dicts hold tensors only, for ``weights_only`` loading)."""
    return torch.tensor(value, dtype=dtype)


def check_steps_per_epoch(value: Any) -> Optional[int]:
    """``steps_per_epoch`` of an epoch-based weighting: None (only ``epoch_end`` closes) or >= 1."""
    return None if value is None else check_positive_int(value, "steps_per_epoch")


def state_for(weighting: Any, state: State, num_tasks: int, key: str, label: str) -> State:
    """``state`` when it holds ``key`` sized for ``num_tasks`` tasks, a fresh one when it is empty.

    Raises:
        ValueError: a state for another number of tasks, naming the weighting (``label``).
    """
    if not state or key not in state:
        return weighting.init_state(num_tasks)
    if state[key].shape[0] != num_tasks:
        raise ValueError(f"{label} state is for {state[key].shape[0]} tasks, got {num_tasks} losses")
    return state


def epoch_totals(num_tasks: int) -> Dict[str, Tensor]:
    """The running sums of an epoch-based weighting: ``epoch_sum (K,)`` and ``epoch_count`` (0-d)."""
    return {"epoch_sum": torch.zeros(num_tasks, dtype=torch.float64), "epoch_count": scalar(0, torch.int64)}


def detached_f64(p: Tensor) -> Tensor:
    """A float64 CPU copy of ``p`` that shares no memory with it."""
    return p.detach().to(device="cpu", dtype=torch.float64).clone()


def accumulate_grad(p: torch.nn.Parameter, grad: Tensor) -> None:
    """``p.grad += grad`` (created if absent), converting to ``p``'s dtype and device."""
    grad = grad.detach().to(device=p.device, dtype=p.dtype)
    if p.grad is None:
        p.grad = grad.clone()
    else:
        p.grad.add_(grad)


class LossRatio:
    """The loss-ratio bookkeeping of GradNorm and HTW: ``L_i(t) / L_i(0)``.

    ``L_i(0)`` is the first loss observed for task ``i`` (its loss in the first taken
    step that had it), kept in the weighting's state under ``initial_losses (K,)`` /
    ``initialized (K,)``; both index tasks along axis 0 (:attr:`AXES`), so a step lacking
    a task leaves its entries as they are.
    """

    #: Task axes of the state (for steps with absent tasks).
    AXES: Dict[str, Tuple[int, ...]] = {"initial_losses": (0,), "initialized": (0,)}

    @staticmethod
    def init_state(num_tasks: int) -> State:
        return {
            "initial_losses": torch.zeros(num_tasks, dtype=torch.float64),
            "initialized": torch.zeros(num_tasks, dtype=torch.bool),
        }

    @staticmethod
    def initial(losses: Tensor, state: State) -> Tuple[Tensor, State]:
        """``(L(0), state)``: the stored first losses, with ``losses`` recorded for the tasks
        whose first positive loss this is (in a new state).

        A loss of exactly 0 is not a usable ``L(0)`` (the ratio would divide by 0): until a
        task has a positive loss its ``L(0)`` stays unrecorded (0 in the returned vector)
        and :meth:`ratio` treats its ratio as 1, as on the step that records it.
        """
        k = losses.shape[0]
        if not state or "initialized" not in state:
            seen, first = torch.zeros(k, dtype=torch.bool), torch.zeros(k, dtype=torch.float64)
        else:
            seen, first = state["initialized"], state["initial_losses"]
            if seen.dim() == 0:  # a checkpoint from before per-task flags
                seen = seen.expand(k)
        new = ~seen & (losses.to(torch.float64) > 0)
        if not bool(new.any()):
            return first, state
        first = torch.where(new, losses.to(torch.float64), first)
        return first, {"initial_losses": first, "initialized": seen | new}

    @staticmethod
    def ratio(losses: Tensor, initial: Tensor) -> Tensor:
        """``L_i(t) / L_i(0)``; 1 for a task without a recorded (positive) ``L_i(0)``."""
        known = initial > 0
        return torch.where(known, losses.to(torch.float64) / torch.where(known, initial, 1.0), 1.0)


def check_nonnegative_losses(losses: Tensor, task_names: Optional[Sequence[str]], who: str, why: str) -> None:
    """Raise a ValueError naming every task whose loss is negative (or NaN).

    A loss of exactly 0 is accepted: the log-based weightings floor it at their epsilon
    (a separable classification loss reaches 0.0 in float32 in a legitimate run).

    Args:
        losses: the loss values ``(K,)``.
        task_names: the names of the tasks of ``losses``, in order, for the message.
        who: the method's name, for the message.
        why: what needs the non-negative losses (e.g. "takes log L_i").
    """
    bad = [f"{task_label(i, task_names)} ({float(v)!r})" for i, v in enumerate(losses) if not v >= 0]
    if bad:
        raise ValueError(f"{who} {why}, so no loss may be negative; task(s) {', '.join(bad)} are")


def present_names(ctx: Any) -> List[str]:
    """The names of the tasks a :class:`~.base.WeightingContext` step has, in order."""
    return [ctx.task_names[i] for i in ctx.indices]


def check_positive_float(value: Any, where: str) -> float:
    """A finite float > 0."""
    out = check_nonnegative_float(value, where)
    if out == 0.0:
        raise ValueError(f"{where} must be > 0, got {value!r}")
    return out
