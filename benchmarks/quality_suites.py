"""The suites of the training-quality benchmark, one config each.

A supervised suite (:class:`Suite`) is data, a model, per-task losses and test metrics,
built from its own frozen config (:class:`DigitsSuiteConfig`, :class:`ScaleSuiteConfig`);
the conflict toy's config is :class:`ToyConfig` (its runs are in
:func:`benchmarks.quality_train.toy_run`). The data and models are in
:mod:`benchmarks.quality_data`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quality_data import (
    DigitsConfig,
    MultiDigitsNet,
    ScaleConfig,
    ScaleNet,
    make_multidigits,
    make_scale_data,
)
from .quality_methods import ALL_METHODS

SUITES = ("multidigits", "scale", "toy", "partial")
SUPERVISED = ("multidigits", "scale", "partial")
#: the suites a run without --suites covers (the partially-labelled one is asked for by name)
DEFAULT_SUITES = ("multidigits", "scale", "toy")
#: suffix of a method run with the workaround users reach for without absent-task support:
#: a zero loss (``0 * output.sum()``) for every task the batch has no labels for
ZERO = "@zero"


@dataclass(frozen=True)
class DigitsSuiteConfig:
    """MultiDigits: data sizes and training budget (Adam lr 5e-3: best of 2e-3 / 5e-3 / 1e-2
    for the single-task baselines on seed 0)."""

    data: DigitsConfig = field(default_factory=DigitsConfig)
    epochs: int = 5
    batch: int = 64
    lr: float = 5e-3
    #: learning rate of the inner SGD (momentum 0.9) of ``inner="sgd"`` methods
    sgd_lr: float = 1e-3

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScaleSuiteConfig:
    """Scale imbalance: data sizes and training budget (Adam lr 3e-3, better than 1e-3)."""

    data: ScaleConfig = field(default_factory=ScaleConfig)
    epochs: int = 10
    batch: int = 100
    lr: float = 3e-3
    sgd_lr: float = 1e-3

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ToyConfig:
    """The CAGrad conflict toy: Adam steps from every start, and what counts as reaching the front."""

    steps: int = 2500
    lr: float = 2.4e-2
    #: trajectory points recorded per start
    points: int = 300
    #: a final (L1, L2) within this distance of the Pareto front has reached it
    tolerance: float = 0.1

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool


class Suite:
    """A supervised suite: data, model, per-task losses and test metrics, from its own config."""

    name = ""
    title = ""
    #: the metric Delta_m% is computed on
    primary: Metric
    #: every reported metric (primary first)
    metrics: Tuple[Metric, ...]
    kind = "regression"
    #: methods not run on this suite, with the reason (recorded in the JSON)
    unsupported: Dict[str, str] = {}
    #: pass shared=/tasks= (trunk / heads) instead of the automatic partition (needed when the
    #: first batch may lack a task: the graph walk can only see the tasks present)
    explicit_partition = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @property
    def epochs(self) -> int:
        return int(self.cfg.epochs)

    @property
    def batch(self) -> int:
        return int(self.cfg.batch)

    @property
    def lr(self) -> float:
        return float(self.cfg.lr)

    @property
    def sgd_lr(self) -> float:
        return float(self.cfg.sgd_lr)

    @property
    def tasks(self) -> List[str]:
        raise NotImplementedError

    def data(self, seed: int) -> Dict[str, Tensor]:
        raise NotImplementedError

    def model(self) -> nn.Module:
        raise NotImplementedError

    def losses(self, outs: Sequence[Tensor], y: Tensor) -> List[Tensor]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Mapping[str, Tensor]) -> Dict[str, Dict[str, float]]:
        raise NotImplementedError

    def variants(self, methods: Sequence[str]) -> List[str]:
        """The method runs of this suite (the partially-labelled suite adds ``@zero`` runs)."""
        return list(methods)

    def batches(self, data: Mapping[str, Tensor], gen: torch.Generator):  # type: ignore[no-untyped-def]
        """``(epoch_end, indices)`` of every training step: a fresh permutation per epoch."""
        n, steps = data["x_train"].shape[0], math.ceil(data["x_train"].shape[0] / self.batch)
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen)
            for b in range(steps):
                yield b == steps - 1, perm[b * self.batch : (b + 1) * self.batch]

    def step_losses(
        self, outs: Sequence[Tensor], y: Tensor, idx: Tensor, data: Mapping[str, Tensor], zero: bool
    ) -> Dict[str, Optional[Tensor]]:
        """The losses handed to ``step`` for the batch ``idx`` (every task labelled here)."""
        return dict(zip(self.tasks, self.losses(outs, y)))


class DigitsSuite(Suite):
    name = "multidigits"
    title = "MultiDigits (two overlapped sklearn digits, small CNN)"
    primary = Metric("accuracy", True)
    metrics = (Metric("accuracy", True), Metric("loss", False))
    kind = "classification"
    cfg: DigitsSuiteConfig

    @property
    def tasks(self) -> List[str]:
        return ["left", "right"]

    def data(self, seed: int) -> Dict[str, Tensor]:
        return make_multidigits(seed, self.cfg.data)

    def model(self) -> nn.Module:
        return MultiDigitsNet(self.cfg.data, num_tasks=2)

    def losses(self, outs: Sequence[Tensor], y: Tensor) -> List[Tensor]:
        return [F.cross_entropy(o, y[:, t]) for t, o in enumerate(outs)]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Mapping[str, Tensor]) -> Dict[str, Dict[str, float]]:
        x, y = data["x_test"], data["y_test"]
        correct = torch.zeros(2)
        loss = torch.zeros(2, dtype=torch.float64)
        for i in range(0, x.shape[0], 1000):
            _, outs = model(x[i : i + 1000])
            for t, o in enumerate(outs):
                yt = y[i : i + 1000, t]
                correct[t] += (o.argmax(1) == yt).sum()
                loss[t] += F.cross_entropy(o, yt, reduction="sum").double()
        n = x.shape[0]
        return {
            task: {"accuracy": float(correct[t]) / n, "loss": float(loss[t]) / n}
            for t, task in enumerate(self.tasks)
        }


class ScaleSuite(Suite):
    name = "scale"
    title = "Scale imbalance (GradNorm synthetic regression, sigma_i spread widely)"
    primary = Metric("nmse", False)
    metrics = (Metric("nmse", False),)
    kind = "regression"
    unsupported = {
        m.name: (
            "inner SGD: precondition= rescales only the shared rows, so the task heads get raw "
            "gradients ~sigma_i^2 (up to 1e6 apart) and SGD diverges at any learning rate that still "
            "trains the sigma=1 task"
        )
        for m in ALL_METHODS
        if m.inner == "sgd"
    }
    cfg: ScaleSuiteConfig

    @property
    def tasks(self) -> List[str]:
        return [f"sigma={s:g}" for s in self.cfg.data.sigmas]

    def data(self, seed: int) -> Dict[str, Tensor]:
        return make_scale_data(seed, self.cfg.data)

    def model(self) -> nn.Module:
        return ScaleNet(self.cfg.data)

    def losses(self, outs: Sequence[Tensor], y: Tensor) -> List[Tensor]:
        return [F.mse_loss(o, y[:, t]) for t, o in enumerate(outs)]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Mapping[str, Tensor]) -> Dict[str, Dict[str, float]]:
        _, outs = model(data["x_test"])
        y = data["y_test"]
        out = {}
        for t, (task, sigma) in enumerate(zip(self.tasks, self.cfg.data.sigmas)):
            mse = float(F.mse_loss(outs[t], y[:, t]).double())
            out[task] = {"nmse": mse / (sigma * sigma)}
        return out


@dataclass(frozen=True)
class PartialSuiteConfig:
    """Partially-labelled regression: every training sample is labelled for a random subset of
    the tasks (each with probability ``label_p``, at least one), and a batch holds samples of
    one label pattern (as when batches come from several partially-labelled datasets), so a
    batch lacks the tasks its pattern leaves out. Test metrics use every label."""

    data: ScaleConfig = field(default_factory=lambda: ScaleConfig(sigmas=(1.0, 1.0, 1.0, 1.0), n_train=2000))
    label_p: float = 0.5
    epochs: int = 10
    batch: int = 50
    lr: float = 3e-3
    sgd_lr: float = 1e-3

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class PartialSuite(ScaleSuite):
    """Each method twice: with absent tasks left out of ``step`` (``"pcgrad"``) and with a zero
    loss in their place (``"pcgrad@zero"``, the workaround without absent-task support)."""

    name = "partial"
    title = "Partially labelled (each sample labelled for a random subset of 4 regression tasks)"
    unsupported: Dict[str, str] = {}
    explicit_partition = True
    cfg: PartialSuiteConfig  # type: ignore[assignment]

    @property
    def tasks(self) -> List[str]:
        return [f"task{t}" for t in range(len(self.cfg.data.sigmas))]

    def data(self, seed: int) -> Dict[str, Tensor]:
        out = make_scale_data(seed, self.cfg.data)
        gen = torch.Generator().manual_seed(7_919 * (seed + 1))
        n, k = out["x_train"].shape[0], len(self.tasks)
        labels = torch.rand(n, k, generator=gen) < self.cfg.label_p
        none = ~labels.any(dim=1)
        labels[none, torch.randint(0, k, (int(none.sum()),), generator=gen)] = True
        out["labels"] = labels
        return out

    def variants(self, methods: Sequence[str]) -> List[str]:
        return [v for m in methods for v in (m, m + ZERO)]

    def batches(self, data: Mapping[str, Tensor], gen: torch.Generator):  # type: ignore[no-untyped-def]
        """Batches of one label pattern each, in a random order per epoch."""
        labels = data["labels"]
        codes = (labels.long() * (2 ** torch.arange(labels.shape[1]))).sum(dim=1)
        for _ in range(self.epochs):
            perm = torch.randperm(labels.shape[0], generator=gen)
            chunks = []
            for code in sorted(set(codes.tolist())):
                members = perm[codes[perm] == code]
                chunks += list(members.split(self.batch))
            order = torch.randperm(len(chunks), generator=gen).tolist()
            for n, c in enumerate(order):
                yield n == len(order) - 1, chunks[c]

    def step_losses(
        self, outs: Sequence[Tensor], y: Tensor, idx: Tensor, data: Mapping[str, Tensor], zero: bool
    ) -> Dict[str, Optional[Tensor]]:
        labelled = data["labels"][idx[0]]  # one pattern per batch
        out: Dict[str, Optional[Tensor]] = {}
        for t, (task, o) in enumerate(zip(self.tasks, outs)):
            if bool(labelled[t]):
                out[task] = F.mse_loss(o, y[:, t])
            elif zero:
                out[task] = o.sum() * 0.0
        return out


SUITE_CLASSES: Dict[str, type] = {"multidigits": DigitsSuite, "scale": ScaleSuite, "partial": PartialSuite}
