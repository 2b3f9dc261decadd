"""The suites of the training-quality benchmark, one config each.

A supervised suite (:class:`Suite`) is data, a model, per-task losses and test metrics,
built from its own frozen config (:class:`DigitsSuiteConfig`, :class:`ScaleSuiteConfig`);
the conflict toy's config is :class:`ToyConfig` (its runs are in
:func:`benchmarks.quality_train.toy_run`). The data and models are in
:mod:`benchmarks.quality_data`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

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

SUITES = ("multidigits", "scale", "toy")
SUPERVISED = ("multidigits", "scale")


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


SUITE_CLASSES: Dict[str, type] = {"multidigits": DigitsSuite, "scale": ScaleSuite}
