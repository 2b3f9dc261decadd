"""Data, models and objectives of the training-quality benchmark (``benchmarks.quality``).

Three suites, each built deterministically from a seed:

- **MultiDigits**: the MultiMNIST construction (Sabour et al. 2017; Sener & Koltun 2018)
  from scikit-learn's bundled 8x8 handwritten digits (no download). Two digits are drawn
  on one ``canvas x canvas`` image: the left one near the top-left corner, the right one
  near the bottom-right corner (each jittered by up to ``jitter`` pixels), combined by a
  pixel-wise maximum. Tasks: classify the left digit, classify the right digit. The
  source digits are split once per seed into a training and a test pool, so test images
  are made of handwriting never seen in training.
- **Scale imbalance**: the synthetic regression of the GradNorm paper (Chen et al. 2018,
  sec. 4): task ``i`` regresses ``sigma_i * tanh((B + eps_i) x)`` with one shared random
  matrix ``B``, small task-specific perturbations ``eps_i`` and output scales
  ``sigma_i`` spread over orders of magnitude, so the task losses differ by
  ``sigma_i^2``. The paper draws ``B ~ N(0, 10)`` and ``eps_i ~ N(0, 3.5)`` entry-wise
  on 250-dimensional inputs, which saturates the tanh; we keep the 10 : 3.5 variance
  ratio but scale both by ``1 / (10 d)`` so that the pre-activations have unit-order
  variance and the targets are a smooth function of ``x``. The metric is the test MSE
  divided by ``sigma_i^2``.
- **Conflict toy**: the two-objective problem of the CAGrad paper (Liu et al. 2021,
  "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS; the objectives
  as defined in the authors' public ``toy.py``), on a 2-D parameter, with the standard
  starting points. :func:`toy_losses` is our own implementation of those formulas;
  :func:`toy_pareto_set` computes the Pareto set numerically.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .trunks import cnn_trunk, last_linear, mlp_trunk

# ---------------------------------------------------------------------- MultiDigits

DIGIT_SIDE = 8


@dataclass(frozen=True)
class DigitsConfig:
    """Sizes of the MultiDigits suite.

    Attributes:
        canvas: side of the square canvas (>= 8).
        jitter: maximal random shift (pixels) of each digit away from its corner.
        train_pool: fraction of the 1797 source digits used to build training images.
        n_train: number of training images.
        n_test: number of test images.
        width: width of the trunk's last (linear) layer.
        channels: channels of the two conv layers.
    """

    canvas: int = 12
    jitter: int = 1
    train_pool: float = 0.7
    n_train: int = 4000
    n_test: int = 2000
    width: int = 64
    channels: Tuple[int, int] = (16, 32)


@functools.lru_cache(maxsize=1)
def _source_digits() -> Tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = torch.tensor(bunch.target, dtype=torch.long)
    return images, labels


def _compose(
    images: Tensor, labels: Tensor, n: int, cfg: DigitsConfig, gen: torch.Generator
) -> Tuple[Tensor, Tensor]:
    """``n`` overlapped two-digit images from a pool; returns ``(x (n,1,C,C), y (n,2))``."""
    c = cfg.canvas
    far = c - DIGIT_SIDE
    if far < 0:
        raise ValueError(f"canvas must be at least {DIGIT_SIDE}, got {c}")
    jit = min(cfg.jitter, far)
    idx = torch.randint(0, images.shape[0], (n, 2), generator=gen)
    shifts = (
        torch.randint(0, jit + 1, (n, 4), generator=gen) if jit > 0 else torch.zeros(n, 4, dtype=torch.long)
    )
    left = torch.zeros(n, c, c)
    right = torch.zeros(n, c, c)
    for dr in range(jit + 1):
        for dc in range(jit + 1):
            sel = (shifts[:, 0] == dr) & (shifts[:, 1] == dc)
            left[sel, dr : dr + DIGIT_SIDE, dc : dc + DIGIT_SIDE] = images[idx[sel, 0]]
            sel = (shifts[:, 2] == dr) & (shifts[:, 3] == dc)
            r1, c1 = far - dr, far - dc
            right[sel, r1 : r1 + DIGIT_SIDE, c1 : c1 + DIGIT_SIDE] = images[idx[sel, 1]]
    out = torch.maximum(left, right)
    return out.unsqueeze(1), labels[idx]


@functools.lru_cache(maxsize=4)
def make_multidigits(seed: int, cfg: DigitsConfig = DigitsConfig()) -> Dict[str, Tensor]:
    """Train/test MultiDigits images and labels for ``seed`` (split and pairs depend on it).

    Returns ``{"x_train", "y_train", "x_test", "y_test"}``; ``y[:, 0]`` is the left digit,
    ``y[:, 1]`` the right one.
    """
    images, labels = _source_digits()
    gen = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    perm = torch.randperm(images.shape[0], generator=gen)
    cut = int(round(cfg.train_pool * images.shape[0]))
    tr, te = perm[:cut], perm[cut:]
    x_train, y_train = _compose(images[tr], labels[tr], cfg.n_train, cfg, gen)
    x_test, y_test = _compose(images[te], labels[te], cfg.n_test, cfg, gen)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


class MultiDigitsNet(nn.Module):
    """Small CNN trunk (conv-relu-pool x2 + linear-relu) with one linear head per task."""

    def __init__(self, cfg: DigitsConfig = DigitsConfig(), num_tasks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.trunk = cnn_trunk(1, cfg.canvas, cfg.channels, cfg.width)
        self.heads = nn.ModuleList(nn.Linear(cfg.width, classes) for _ in range(num_tasks))

    def last_shared(self) -> List[nn.Parameter]:
        """The last shared layer (GradNorm's ``W``)."""
        return list(last_linear(self.trunk).parameters())

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


# ---------------------------------------------------------------------- scale imbalance


@dataclass(frozen=True)
class ScaleConfig:
    """Sizes of the scale-imbalance suite.

    Attributes:
        sigmas: output scale of every task (the task count is ``len(sigmas)``).
        in_dim: input dimension.
        out_dim: output dimension of every task.
        n_train: training samples.
        n_test: test samples.
        width: width of the trunk's hidden layers.
        depth: number of Linear+ReLU trunk layers.
        noise: std of the additive target noise, relative to ``sigma_i``.
    """

    sigmas: Tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    in_dim: int = 32
    out_dim: int = 10
    n_train: int = 2000
    n_test: int = 1000
    width: int = 100
    depth: int = 3
    noise: float = 0.0


@functools.lru_cache(maxsize=4)
def make_scale_data(seed: int, cfg: ScaleConfig = ScaleConfig()) -> Dict[str, Tensor]:
    """Inputs and per-task targets ``y (n, T, out_dim)`` for ``seed``."""
    gen = torch.Generator().manual_seed(2_000_003 * (seed + 1))
    d, o, t = cfg.in_dim, cfg.out_dim, len(cfg.sigmas)
    scale = 1.0 / math.sqrt(10.0 * d)
    b = torch.randn(o, d, generator=gen) * math.sqrt(10.0) * scale
    eps = torch.randn(t, o, d, generator=gen) * math.sqrt(3.5) * scale
    sig = torch.tensor(cfg.sigmas, dtype=torch.float32)

    def targets(x: Tensor) -> Tensor:
        pre = torch.einsum("tod,nd->nto", b.unsqueeze(0) + eps, x)
        y = sig.view(1, t, 1) * torch.tanh(pre)
        if cfg.noise > 0:
            y = y + cfg.noise * sig.view(1, t, 1) * torch.randn(y.shape, generator=gen)
        return y

    x_train = torch.randn(cfg.n_train, d, generator=gen)
    x_test = torch.randn(cfg.n_test, d, generator=gen)
    return {"x_train": x_train, "y_train": targets(x_train), "x_test": x_test, "y_test": targets(x_test)}


class ScaleNet(nn.Module):
    """Shared MLP trunk (``depth`` x Linear+ReLU) with one linear head per task.

    Head ``i`` is a linear layer followed by the fixed factor ``sigma_i`` (a known output
    scale, as when de-normalising a regression target). Without it an Adam-trained head
    needs ``sigma_i``-times larger weights, which at a fixed learning rate takes
    ``sigma_i``-times longer, so single-task baselines would differ in how far their
    weights must travel rather than in what they can learn. With it every task is
    equally learnable alone, and the tasks differ only in the magnitude of their losses
    and of their gradients on the shared trunk (``~ sigma_i^2``): the imbalance this
    suite is about.
    """

    def __init__(self, cfg: ScaleConfig = ScaleConfig()) -> None:
        super().__init__()
        self.trunk = mlp_trunk(cfg.in_dim, [cfg.width] * cfg.depth)
        self.heads = nn.ModuleList(nn.Linear(cfg.width, cfg.out_dim) for _ in cfg.sigmas)
        self.register_buffer("sigmas", torch.tensor(cfg.sigmas, dtype=torch.float32))

    def last_shared(self) -> List[nn.Parameter]:
        return list(last_linear(self.trunk).parameters())

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        z = self.trunk(x)
        return z, [s * head(z) for s, head in zip(self.sigmas, self.heads)]


# ---------------------------------------------------------------------- conflict toy

#: The starting points: the CAGrad paper's three, plus (0, 0) and (10, -8) used by the
#: later toy comparisons (Nash-MTL, FAMO).
TOY_STARTS: Tuple[Tuple[float, float], ...] = (
    (-8.5, 7.5),
    (-8.5, -5.0),
    (0.0, 0.0),
    (9.0, 9.0),
    (10.0, -8.0),
)
#: Lower clamp inside the logarithms (as in the paper's code).
TOY_FLOOR = 5e-6


def toy_losses(x: Tensor) -> Tuple[Tensor, Tensor]:
    """The CAGrad toy objectives ``(L1, L2)`` at ``x`` (shape ``(..., 2)``).

    With ``x = (x1, x2)``::

        f_1 = log(max(|0.5 (-x1 - 7) - tanh(-x2)|, 5e-6)) + 6
        f_2 = log(max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, 5e-6)) + 6
        g_1 = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
        g_2 = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
        c_1 = max(tanh(x2 / 2), 0),   c_2 = max(tanh(-x2 / 2), 0)
        L_i = c_1 f_i + c_2 g_i

    Above the x1-axis each loss is a log-valley (sharp, narrow); below it a wide
    quadratic bowl; the Pareto set is a curve near ``x2 = -8.4`` for ``x1`` in [-7, 7].
    """
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), TOY_FLOOR).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), TOY_FLOOR).log() + 6
    g1 = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    g2 = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return f1 * c1 + g1 * c2, f2 * c1 + g2 * c2


@functools.lru_cache(maxsize=2)
def toy_pareto_set(points: int = 201) -> Tuple[Tuple[float, float], ...]:
    """The toy's Pareto set, computed numerically (float64).

    In the lower half-plane ``L_i = c_2(x2) g_i(x)``; a point is Pareto-stationary when
    ``a grad L_1 + (1 - a) grad L_2 = 0`` for some ``a`` in [0, 1]. The x1-component
    fixes ``x1 = 14 a - 7`` (so the set spans ``x1`` in [-7, 7]); the x2-component is then
    a 1-D equation in ``x2``, solved by bisection on the bracket ``[-12, -6]`` where it
    changes sign exactly once. These points are the minimisers of the weighted sums
    ``a L_1 + (1 - a) L_2`` (checked in the tests), i.e. Pareto optimal.
    """
    a = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    x1 = 14.0 * a - 7.0

    def dx2(v: Tensor) -> Tensor:
        with torch.enable_grad():
            x = torch.stack([x1, v], dim=-1).requires_grad_(True)
            l1, l2 = toy_losses(x)
            (g,) = torch.autograd.grad((a * l1 + (1.0 - a) * l2).sum(), x)
        return g[:, 1]

    lo = torch.full_like(a, -12.0)
    hi = torch.full_like(a, -6.0)
    f_lo = dx2(lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        same = (dx2(mid) < 0) == (f_lo < 0)
        lo = torch.where(same, mid, lo)
        hi = torch.where(same, hi, mid)
        f_lo = dx2(lo)
    x2 = 0.5 * (lo + hi)
    return tuple((float(u), float(v)) for u, v in zip(x1.tolist(), x2.tolist()))


@functools.lru_cache(maxsize=2)
def toy_pareto_front(points: int = 201) -> Tuple[Tuple[float, float], ...]:
    """The toy's Pareto front: ``(L1, L2)`` along :func:`toy_pareto_set`."""
    pts = torch.tensor(toy_pareto_set(points), dtype=torch.float64)
    with torch.no_grad():
        l1, l2 = toy_losses(pts)
    return tuple((float(a), float(b)) for a, b in zip(l1.tolist(), l2.tolist()))


def distance_to_set(point: Sequence[float], curve: Sequence[Sequence[float]]) -> float:
    """Euclidean distance from ``point`` to the polyline through ``curve``."""
    p = torch.tensor(point, dtype=torch.float64)
    c = torch.tensor(curve, dtype=torch.float64)
    a, b = c[:-1], c[1:]
    ab = b - a
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-300)).clamp(0.0, 1.0)
    proj = a + t.unsqueeze(-1) * ab
    return float((proj - p).norm(dim=-1).min())


def toy_stationarity(point: Sequence[float]) -> float:
    """Norm of the min-norm convex combination of the two toy gradients at ``point``.

    Zero exactly at Pareto-stationary points (the MGDA criterion).
    """
    with torch.enable_grad():
        x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
        l1, l2 = toy_losses(x)
        (g1,) = torch.autograd.grad(l1, x, retain_graph=True)
        (g2,) = torch.autograd.grad(l2, x)
    diff = g1 - g2
    den = float(diff @ diff)
    a = 0.5 if den == 0.0 else min(1.0, max(0.0, float((g2 - g1) @ g2) / den))
    return float((a * g1 + (1 - a) * g2).norm())
