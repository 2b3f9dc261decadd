"""The one device-to-host transfer of a step, and the host stage that reads it.

On an accelerator every read of a device value by Python (``.item()``, ``.tolist()``,
``float(t)``, ``bool(t)``, ``if t:``, ``.cpu()``) waits for the device to finish what
it was given: the host stalls and nothing can overlap. A step needs only a few numbers
on the host -- the ``K x K`` Gram of every block, the ``K`` loss values, whether every
gradient is finite, a few magnitudes -- so they are collected on the device as the
step computes them and copied in **one** transfer (:class:`Transfer`):

1. the gather stage computes the per-task gradients; the Grams, flags and magnitudes
   are formed on the device and added to a :class:`Transfer`;
2. :meth:`Transfer.fetch` concatenates them (one float64 vector per device) and copies
   it to the host once;
3. the host stage (:func:`host_stage`) decides on those host copies alone: skip or not,
   the weights, the coefficients (the ``K x K`` problems are tiny, and float64 costs
   nothing there), how to combine without overflow;
4. the coefficients go back to the device without blocking, and the updates are
   combined there.

Everything the host stage reads lives on the host: the fetched copies, the components'
states (float64 CPU tensors by contract) and the learnable weightings' parameters
(created on the CPU). Rare cases need a second transfer and say so where they take it
(a Gram whose float32 entries overflowed or underflowed is recomputed in float64).
``last_stats`` is built only when it is read (:class:`LazyStats`).

A test counts the host reads of a step (``tests/test_host_syncs.py``): every read
outside the host stage counts, the transfer included; on CUDA the same step runs under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_local = threading.local()


@contextmanager
def host_stage() -> Iterator[None]:
    """Mark code that reads host data only (the fetched copies, component states)."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def in_host_stage() -> bool:
    """Whether the caller runs inside :func:`host_stage` (used by the sync-counting test)."""
    return getattr(_local, "depth", 0) > 0


#: Host reads made through :func:`to_host` (the step's transfer and the few declared
#: others): the sync-counting test reads this on CUDA.
reads = 0


def to_host(tensor: Tensor) -> Tensor:
    """``tensor`` copied to the host: a **declared** host read (it waits for the device).

    Under ``torch.cuda.set_sync_debug_mode`` this read is allowed (the mode is suspended
    around it), so a test running a step in ``"error"`` mode fails on every other
    synchronisation; :data:`reads` counts these.
    """
    global reads
    reads += 1
    depth = getattr(_local, "depth", 0)
    _local.depth = 0  # a device read, even when a host stage asks for it
    mode = torch.cuda.get_sync_debug_mode() if tensor.device.type == "cuda" else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        return tensor.cpu()
    finally:
        _local.depth = depth
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


#: Up to this many values Python checks a host tensor faster than a tensor op is dispatched.
SCALAR_VALUES = 64


def finite_values(values: Tensor) -> bool:
    """Whether a host float64 tensor (losses, Grams, weights, coefficients) is all finite."""
    if values.numel() <= SCALAR_VALUES and values.device.type == "cpu":
        return all(math.isfinite(v) for v in values.reshape(-1).tolist())  # no tensor ops
    return bool(torch.isfinite(values).all())


def by_device(tensors: Sequence[Tensor]) -> Dict[torch.device, List[Tensor]]:
    """The tensors grouped by device, each group in the given order (detached)."""
    groups: Dict[torch.device, List[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t.detach())
    return groups


def peak_magnitudes(tensors: Sequence[Tensor]) -> Tensor:
    """``max |t|`` of every tensor (NaN where it holds one), as one float64 vector on their device.

    The tensors share a device and are non-empty. On an accelerator this is the fused
    infinity norm (:func:`fused_peaks`); on the CPU ``aminmax`` per tensor
    (:func:`extreme_peaks`): the CPU kernel of the infinity norm is about eight times
    slower (measured on one thread: 2.2 ms against 0.29 ms for the 80 head gradients of
    the K = 40 speed benchmark).
    """
    return extreme_peaks(tensors) if tensors[0].device.type == "cpu" else fused_peaks(tensors)


def fused_peaks(tensors: Sequence[Tensor]) -> Tensor:
    """:func:`peak_magnitudes` by one fused infinity-norm call."""
    return _stacked(list(torch._foreach_norm(list(tensors), math.inf)))


def extreme_peaks(tensors: Sequence[Tensor]) -> Tensor:
    """:func:`peak_magnitudes` from each tensor's smallest and largest entries."""
    if any(t.is_complex() for t in tensors):  # no order: the largest modulus
        return _stacked([t.abs().amax() for t in tensors])
    pairs = [torch.aminmax(t) for t in tensors]
    return torch.maximum(_stacked([high for _, high in pairs]), -_stacked([low for low, _ in pairs]))


def _stacked(scalars: List[Tensor]) -> Tensor:
    """0-d tensors stacked into one float64 vector."""
    if all(s.dtype == scalars[0].dtype for s in scalars):
        return torch.stack(scalars).to(torch.float64)
    return torch.stack([s.to(torch.float64) for s in scalars])


class Transfer:
    """Device tensors the host must read this step, copied together by :meth:`fetch`.

    Each entry is flattened to float64 on its own device; :meth:`fetch` concatenates the
    entries of each device and copies that vector once. Entries already on the CPU are
    copied along without a transfer of their own (a CPU "device" is the host).
    """

    def __init__(self) -> None:
        self._items: List[Tuple[str, Tensor]] = []

    def add(self, name: str, tensor: Tensor) -> None:
        """Add ``tensor`` (any shape, float, integer or bool) under ``name``."""
        if any(n == name for n, _ in self._items):
            raise KeyError(f"transfer entry {name!r} added twice")
        self._items.append((name, tensor.detach()))

    def __contains__(self, name: str) -> bool:
        return any(n == name for n, _ in self._items)

    def fetch(self) -> Dict[str, Tensor]:
        """The entries as float64 CPU tensors of their original shapes: one copy per device."""
        by_device: Dict[torch.device, List[Tuple[str, Tensor]]] = {}
        for name, t in self._items:
            by_device.setdefault(t.device, []).append((name, t))
        out: Dict[str, Tensor] = {}
        for items in by_device.values():
            flat = torch.cat([t.reshape(-1).to(torch.float64) for _, t in items])
            host = to_host(flat)  # the one device -> host copy (no copy on a CPU device)
            offset = 0
            for name, t in items:
                n = t.numel()
                out[name] = host[offset : offset + n].view(t.shape)
                offset += n
        self._items = []
        return out


class LazyStats(dict):  # type: ignore[type-arg]
    """``last_stats``: a plain ``dict`` whose entries are built from tensors when first read.

    The optimizer stores a recipe (:meth:`defer`) instead of reading device values, so a
    step makes no host read for statistics nobody looks at. Any read of the mapping
    (``stats["cosine"]``, ``dict(stats)``, ``json.dumps(stats)``, iteration) builds the
    deferred entries once; writes work as on a ``dict``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: Optional[List[Callable[[], Dict[str, Any]]]] = []

    def defer(self, build: Callable[[], Dict[str, Any]]) -> None:
        """Add the entries ``build()`` returns, computed on the first read."""
        assert self._pending is not None
        self._pending.append(build)

    def _resolve(self) -> None:
        pending = self.__dict__.get("_pending")
        if pending:
            self._pending = None
            for build in pending:
                dict.update(self, build())
            self._pending = []

    def __getitem__(self, key: Any) -> Any:
        self._resolve()
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        self._resolve()
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[Any]:
        self._resolve()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._resolve()
        return dict.__len__(self)

    def __repr__(self) -> str:
        self._resolve()
        return dict.__repr__(self)

    def __eq__(self, other: object) -> bool:
        self._resolve()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def get(self, key: Any, default: Any = None) -> Any:
        self._resolve()
        return dict.get(self, key, default)

    def keys(self) -> Any:
        self._resolve()
        return dict.keys(self)

    def values(self) -> Any:
        self._resolve()
        return dict.values(self)

    def items(self) -> Any:
        self._resolve()
        return dict.items(self)

    def copy(self) -> Dict[str, Any]:
        self._resolve()
        return dict(dict.items(self))

    def __reduce__(self) -> Any:  # pickles (and deep-copies) as the plain dict it stands for
        self._resolve()
        return (dict, (dict(dict.items(self)),))
