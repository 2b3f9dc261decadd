"""Helpers shared by the fault tests and the stateful suite.

- :func:`representation_step`: one step in representation mode.
- :func:`clone_state` / :func:`state_diff`: deep copies and bitwise comparison of
  ``state_dict()`` trees (tensors compared byte for byte, so NaN == NaN and -0.0 != 0.0).
- :func:`round_trip`: a state dict through ``torch.save`` / ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor


def representation_step(opt: Any, losses: Sequence[Tensor], z: Tensor) -> Any:
    """``opt.step(losses, representation=z)``."""
    return opt.step(losses, representation=z)


def clone_state(obj: Any) -> Any:
    """A deep copy of a state-dict tree; tensors are detached clones."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist()


def state_diff(a: Any, b: Any, path: str = "", ignore: Sequence[str] = ()) -> Optional[str]:
    """The first difference between two state-dict trees (``None`` if bitwise equal).

    ``ignore`` lists paths (e.g. ``"/multitask/skipped"``) left out of the comparison.
    """
    if path in ignore:
        return None
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or not _same_tensor(a, b):
            return f"{path or '/'}: {a!r} != {b!r}"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path or '/'}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            found = state_diff(a[key], b[key], f"{path}/{key}", ignore)
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path or '/'}: lengths {len(a)} != {len(b)}"
        for n, (x, y) in enumerate(zip(a, b)):
            found = state_diff(x, y, f"{path}/{n}", ignore)
            if found is not None:
                return found
        return None
    if type(a) is not type(b) or a != b:
        if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
            return None
        return f"{path or '/'}: {a!r} != {b!r}"
    return None


def round_trip(state: Any) -> Any:
    """``state`` through ``torch.save`` and ``torch.load(..., weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def params_equal(a: List[Tensor], b: List[Tensor]) -> bool:
    """Whether two parameter lists are bitwise equal."""
    return len(a) == len(b) and all(_same_tensor(x, y) for x, y in zip(a, b))
