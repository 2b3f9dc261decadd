"""What ``diagnose`` and ``compare`` share: a private copy of the model, untouched RNG
states, batches cycled, the inner optimizer's kind and a progress line."""

from __future__ import annotations

import copy
import random
import sys
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

OptimizerFactory = Callable[[Iterable[Tensor]], Optimizer]
#: ``loss_fn(model, batch)`` -> per-task losses (a mapping by name or a sequence; ``None`` = absent)
LossFn = Callable[[nn.Module, Any], Any]

#: inner optimizers that normalise each coordinate by its own second moment
ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
)


def default_optimizer(params: Iterable[Tensor]) -> Optimizer:
    """``torch.optim.Adam(params, lr=1e-3)``: the default inner optimizer of both tools."""
    return torch.optim.Adam(params, lr=1e-3)


def is_adaptive(inner: Optimizer) -> bool:
    """Whether ``inner`` rescales each coordinate by its own gradient history (Adam-like).

    Known torch classes by type; any other optimizer whose param groups carry ``betas``
    (Adam's hyper-parameter) counts as Adam-like.

    Args:
        inner: the inner optimizer.

    Returns:
        Whether it is Adam-like.
    """
    if isinstance(inner, ADAPTIVE):
        return True
    return any("betas" in group for group in inner.param_groups)


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU and initialised CUDA devices), ``random`` and NumPy inside the block
    and give every generator its state back afterwards."""
    py_state = random.getstate()
    np_random = _numpy_random()
    np_state = np_random.get_state() if np_random is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(seed)
            random.seed(seed)
            if np_random is not None:
                np_random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(py_state)
        if np_random is not None:
            np_random.set_state(np_state)


def _numpy_random() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is optional
        return None
    return numpy.random


def private_copy(model: nn.Module) -> Tuple[nn.Module, Dict[int, Any]]:
    """A deep copy of ``model`` and the memo mapping the caller's tensors to the copy's.

    The memo lets a config that names the caller's parameters (``shared=``, ``tasks=``,
    GradNorm's ``layer=``) be translated to the copy with ``copy.deepcopy(config, memo)``.
    """
    memo: Dict[int, Any] = {}
    twin = copy.deepcopy(model, memo)
    return twin, {id(t): memo[id(t)] for t in (*model.parameters(), *model.buffers()) if id(t) in memo}


def translate(config: Mapping[str, Any], memo: Mapping[int, Any]) -> Dict[str, Any]:
    """``config`` for the copy: the caller's tensors replaced by the copy's, the rest deep-copied
    (so a component instance in a config starts fresh in every run)."""
    return copy.deepcopy(dict(config), dict(memo))


class Cycle:
    """Batches in order, again and again: a list, a re-iterable loader or a one-shot iterator
    (whose items are kept on the first pass).

    Raises:
        ValueError: when ``batches`` yields nothing.
    """

    def __init__(self, batches: Iterable[Any], shuffle_seed: Optional[int] = None) -> None:
        self._source = batches
        self._one_shot = iter(batches) is batches
        self._kept: List[Any] = []
        self._seed = shuffle_seed
        self._passes = 0

    def __iter__(self) -> Iterator[Any]:
        while True:
            got = 0
            for batch in self._pass():
                got += 1
                yield batch
            if got == 0:
                raise ValueError("batches is empty: give at least one batch (a list or a re-iterable loader)")
            self._passes += 1

    def _pass(self) -> Iterable[Any]:
        if self._one_shot:
            if self._passes == 0:
                return _keeping(self._source, self._kept)
            return list(self._kept)
        if isinstance(self._source, Sequence) and self._seed is not None and self._passes > 0:
            gen = torch.Generator().manual_seed(self._seed * 1_000_003 + self._passes)
            return [self._source[i] for i in torch.randperm(len(self._source), generator=gen).tolist()]
        return self._source


def _keeping(source: Iterable[Any], kept: List[Any]) -> Iterator[Any]:
    for item in source:
        kept.append(item)
        yield item


def task_losses(raw: Any) -> Dict[str, Optional[Tensor]]:
    """``loss_fn``'s result as ``{name: loss or None}`` (a sequence's tasks are ``"0"``, ``"1"``, ...).

    Raises:
        TypeError: for anything but a mapping, a sequence or a 1-D tensor of losses.
    """
    if isinstance(raw, Mapping):
        return {str(k): v for k, v in raw.items()}
    if isinstance(raw, Tensor):
        if raw.dim() != 1:
            raise TypeError(
                f"loss_fn returned a tensor of shape {tuple(raw.shape)}; expected a 1-D tensor of losses"
            )
        return {str(i): v for i, v in enumerate(raw.unbind())}
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        return {str(i): v for i, v in enumerate(raw)}
    raise TypeError(
        f"loss_fn must return a mapping or a sequence of per-task losses, got {type(raw).__name__}"
    )


class Progress:
    """A progress bar: tqdm when installed, else one updating line on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled, self.done = total, desc, enabled, 0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def update(self, note: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update()
        else:
            sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} {note[:40]:<40}")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def matplotlib_pyplot() -> Any:
    """``matplotlib.pyplot``, or an ImportError naming the extra that installs it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib: pip install -e '.[plot]' in the checkout (or pip install matplotlib)"
        ) from exc
    return plt


def describe(config: Mapping[str, Any]) -> str:
    """A short readable name of a config dict: ``"db_mtl(beta=0) + precondition adam"``.

    Args:
        config: keyword arguments of ``MultiTaskOptimizer``.

    Returns:
        The name.
    """
    parts: List[str] = []
    for key in ("surgery", "weighting", "precondition"):
        value = config.get(key)
        if value is None:
            continue
        kwargs = config.get(f"{key}_kwargs") or {}
        shown = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}
        args = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        name = value if isinstance(value, str) else type(value).__name__
        parts.append(f"{name}({args})" if args else str(name))
    return " + ".join(parts) or "sum"
