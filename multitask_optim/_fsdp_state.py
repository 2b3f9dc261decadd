"""Checkpoints of a sharded (FSDP2) multi-task optimizer with ``torch.distributed.checkpoint``.

Re-exported by :mod:`multitask_optim.fsdp` (``fsdp.MultiTaskState``,
``fsdp.get_optimizer_state_dict``, ``fsdp.set_optimizer_state_dict``).
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

try:  # torch.distributed is optional at build time
    import torch.distributed as dist
except ImportError:  # pragma: no cover - builds without distributed support
    dist = None  # type: ignore[assignment]


class MultiTaskState:
    """The optimizer's multi-task state as a ``torch.distributed.checkpoint`` ``Stateful``.

    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` carries the inner
    optimizer's sharded state but drops the ``"multitask"`` entry of
    ``MultiTaskOptimizer.state_dict()``, and fails on a parameter that is not the
    model's (a learnable weighting's): use :func:`get_optimizer_state_dict` /
    :func:`set_optimizer_state_dict` below for the model's groups and this object for
    the rest. Each rank's entry (component states, its shards of the per-task
    accumulators, the generator, counters, the weighting group's parameters and inner
    state) is saved as one opaque object under its rank's key, so it loads into a fresh
    optimizer whose partition is not known yet; it loads on the same world size only (a
    different one raises). Use::

        from multitask_optim import fsdp
        state = {"model": get_model_state_dict(model),
                 "optim": fsdp.get_optimizer_state_dict(model, opt),
                 "multitask": fsdp.MultiTaskState(opt)}
        dcp.save(state, checkpoint_id=path)
        # fresh ranks: build model and optimizer as before, the same dict, then
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        fsdp.set_optimizer_state_dict(model, opt, state["optim"])

    Args:
        optimizer: the :class:`~multitask_optim.MultiTaskOptimizer` to save and restore.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> Dict[str, Any]:
        """This rank's multi-task state, for ``torch.distributed.checkpoint.save``.

        Returns:
            ``{"world_size": W, "rank{r}": bytes}``: the rank's entry saved as one object.
        """
        rank, world = _rank_and_world()
        entry = {
            "multitask": self.optimizer.state_dict()["multitask"],
            "weighting_state": [
                _plain(self.optimizer.optimizer.state.get(p, {})) for p in _weighting_params(self.optimizer)
            ],
        }
        buffer = io.BytesIO()
        torch.save(entry, buffer)
        return {"world_size": world, f"rank{rank}": buffer.getvalue()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load this rank's entry into the optimizer (after ``torch.distributed.checkpoint.load``).

        Args:
            state_dict: what :meth:`state_dict` produced, as loaded.

        Raises:
            ValueError: a checkpoint of another world size, or whose weighting group does not
                match this optimizer's.
        """
        rank, world = _rank_and_world()
        saved_world = int(state_dict.get("world_size", world))
        payload = state_dict.get(f"rank{rank}")
        if saved_world != world or not isinstance(payload, (bytes, bytearray)) or not payload:
            raise ValueError(
                f"MultiTaskState: the checkpoint was saved by {saved_world} ranks, this run has {world}; "
                "the multi-task state (per-task accumulator shards) loads on the same world size only"
            )
        entry = torch.load(io.BytesIO(payload), weights_only=True)
        inner = self.optimizer.optimizer
        self.optimizer.load_state_dict({**inner.state_dict(), "multitask": entry["multitask"]})
        params = _weighting_params(self.optimizer)
        if len(params) != len(entry["weighting_state"]):
            raise ValueError(
                "MultiTaskState: the checkpoint's weighting group does not match this optimizer's"
            )
        for p, saved in zip(params, entry["weighting_state"]):
            inner.state[p] = {key: value.clone() for key, value in saved.items()}


def get_optimizer_state_dict(model: torch.nn.Module, optimizer: Any, **kwargs: Any) -> Dict[str, Any]:
    """``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` over the model's
    param groups (the weighting's group, not the model's, rides in :class:`MultiTaskState`).

    Args:
        model: the FSDP2 model.
        optimizer: the :class:`~multitask_optim.MultiTaskOptimizer` over its parameters.
        **kwargs: passed on (e.g. ``options=``).

    Returns:
        The optimizer state dict of the model's param groups.
    """
    from torch.distributed.checkpoint import state_dict as dcp_state

    with _without_weighting_group(optimizer):
        return dcp_state.get_optimizer_state_dict(model, optimizer, **kwargs)


def set_optimizer_state_dict(
    model: torch.nn.Module, optimizer: Any, optim_state_dict: Dict[str, Any], **kwargs: Any
) -> None:
    """``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` over the model's
    param groups; the weighting group's state (loaded by :class:`MultiTaskState`) is kept.

    Args:
        model: the FSDP2 model.
        optimizer: the :class:`~multitask_optim.MultiTaskOptimizer` over its parameters.
        optim_state_dict: what :func:`get_optimizer_state_dict` saved, as loaded.
        **kwargs: passed on (e.g. ``options=``).
    """
    from torch.distributed.checkpoint import state_dict as dcp_state

    kept = {
        p: optimizer.optimizer.state[p]
        for p in _weighting_params(optimizer)
        if p in optimizer.optimizer.state
    }
    with _without_weighting_group(optimizer):
        dcp_state.set_optimizer_state_dict(model, optimizer, optim_state_dict, **kwargs)
    optimizer.optimizer.state.update(kept)


class _without_weighting_group:
    """Hide the weighting's param group and its state (parameters that are not the model's) from DCP."""

    def __init__(self, optimizer: Any) -> None:
        self.inner = optimizer.optimizer
        self.hidden: List[Tuple[int, Dict[str, Any]]] = []
        self.states: Dict[Tensor, Any] = {}

    def __enter__(self) -> None:
        groups = self.inner.param_groups
        self.hidden = [(n, g) for n, g in enumerate(groups) if g.get("task") == "weighting"]
        for n, _ in reversed(self.hidden):
            del groups[n]
        for _, group in self.hidden:
            for p in group["params"]:
                if p in self.inner.state:
                    self.states[p] = self.inner.state.pop(p)

    def __exit__(self, *exc: Any) -> None:
        for n, group in self.hidden:
            self.inner.param_groups.insert(n, group)
        self.inner.state.update(self.states)


def _weighting_params(optimizer: Any) -> List[Tensor]:
    return [p for g in optimizer.optimizer.param_groups if g.get("task") == "weighting" for p in g["params"]]


def _plain(state: Dict[str, Any]) -> Dict[str, Tensor]:
    return {
        key: value.detach().clone() if isinstance(value, Tensor) else torch.tensor(value)
        for key, value in state.items()
    }


def _rank_and_world() -> Tuple[int, int]:
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return int(dist.get_rank()), int(dist.get_world_size())
