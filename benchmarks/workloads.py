"""Models and data for the speed benchmarks.

The workload is built so that task gradients really conflict on the shared trunk:
task ``k`` regresses ``y_k = s_k (f(x) + offset) + own * f_k(x) + noise`` with ``s_k``
alternating ``+1, -1, ...`` for one fixed random nonlinear ``f`` (``f_k``: the task's own
part). All heads start from the same initial weights
(one head's init copied into the others), so at init a ``+1`` task and a ``-1`` task
push the trunk in opposite directions: ``ceil(K/2) floor(K/2) / (K (K - 1) / 2)`` of the
task pairs conflict (all opposite-sign pairs), with cosines around -0.9. :func:`conflict_stats` measures it.

Every builder seeds its own RNG, so two calls with the same arguments give bitwise
identical models and data (each implementation under test gets its own copy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .common import default_device
from .trunks import cnn_trunk, mlp_trunk

Batch = Tuple[Tensor, Tensor]


@dataclass
class WorkloadConfig:
    """Sizes of one benchmark workload.

    Attributes:
        kind: ``"mlp"`` (default: 512 -> 1024 -> 1024 -> 1024 trunk) or ``"cnn"``
            (default: MultiDigits-style; :data:`CNN32` is the 3x32x32 one). Both trunks
            come from :mod:`benchmarks.trunks`.
        in_dim: MLP input width.
        width: MLP hidden width (every trunk layer).
        depth: number of Linear+ReLU layers in the MLP trunk.
        hidden: explicit MLP hidden widths, overriding ``width`` x ``depth`` (e.g. ``(5, 3)``).
        batch: batch size.
        in_channels: CNN input channels.
        image: CNN input side (in_channels x image x image).
        channels: CNN conv channels (one 3x3 conv + ReLU + 2x2 max-pool each).
        cnn_hidden: width of the CNN trunk's last Linear.
        n_batches: distinct batches cycled through during timing.
        noise: std of the per-task target noise.
        offset: constant added to the shared target before the sign flip.
        own: scale of each task's own (non-conflicting) target component.
        seed: seed of the model init and of the data.
        head_outputs: outputs of every head (``Linear(feature_dim, head_outputs)``): each
            output regresses its own target of the same form.
        device: where the model and the data live (default: CUDA when available; built on
            the CPU from the seed, then moved, so every device starts from the same
            weights and batches).
    """

    kind: str = "mlp"
    in_dim: int = 512
    width: int = 1024
    depth: int = 3
    hidden: Tuple[int, ...] = ()
    batch: int = 256
    in_channels: int = 1
    image: int = 16
    channels: Tuple[int, ...] = (16, 32)
    cnn_hidden: int = 128
    n_batches: int = 4
    noise: float = 0.1
    offset: float = 0.3
    own: float = 1.0
    seed: int = 0
    head_outputs: int = 1
    device: str = field(default_factory=default_device)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> WorkloadConfig:
        d = dict(d)
        d["hidden"] = tuple(d.get("hidden", ()))
        d["channels"] = tuple(d.get("channels", (16, 32)))
        return cls(**d)

    @property
    def mlp_widths(self) -> Tuple[int, ...]:
        return self.hidden or (self.width,) * self.depth


#: TorchJD's ``mtl_backward`` example network: shared ``10 -> 5 -> 3`` MLP, two ``Linear(3, 1)``
#: heads, batch 16, MSE losses (torchjd 0.18 README).
TINY = WorkloadConfig(kind="mlp", in_dim=10, hidden=(5, 3), batch=16)
#: The 3x32x32 CNN: 3x3 convs with 32/64/64 channels and 2x2 pooling, then Linear(1024, 256), batch 128.
CNN32 = WorkloadConfig(kind="cnn", in_channels=3, image=32, channels=(32, 64, 64), cnn_hidden=256, batch=128)


class MultiHeadModel(nn.Module):
    """A shared trunk followed by K linear heads (``feature_dim -> outputs``) and MSE losses."""

    def __init__(self, trunk: nn.Module, feature_dim: int, k: int, outputs: int = 1) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(feature_dim, outputs) for _ in range(k))
        # Same start for every head: the sign of the target then decides the direction
        # of each task's trunk gradient (the conflict is built in, not left to chance).
        with torch.no_grad():
            for head in self.heads[1:]:
                head.weight.copy_(self.heads[0].weight)
                head.bias.copy_(self.heads[0].bias)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def task_losses(self, z: Tensor, y: Tensor) -> List[Tensor]:
        """``y``: ``(N, K)`` for one output per head, ``(N, K, outputs)`` otherwise."""
        if y.dim() == 2:
            return [nn.functional.mse_loss(head(z).squeeze(-1), y[:, i]) for i, head in enumerate(self.heads)]
        return [nn.functional.mse_loss(head(z), y[:, i]) for i, head in enumerate(self.heads)]

    def losses(self, batch: Batch) -> List[Tensor]:
        x, y = batch
        return self.task_losses(self.features(x), y)

    def shared_parameters(self) -> List[Tensor]:
        return list(self.trunk.parameters())

    def head_parameters(self) -> List[List[Tensor]]:
        return [list(h.parameters()) for h in self.heads]


def feature_dim(cfg: WorkloadConfig) -> int:
    return cfg.mlp_widths[-1] if cfg.kind == "mlp" else cfg.cnn_hidden


def build_trunk(cfg: WorkloadConfig) -> nn.Sequential:
    if cfg.kind == "mlp":
        return mlp_trunk(cfg.in_dim, cfg.mlp_widths)
    return cnn_trunk(cfg.in_channels, cfg.image, cfg.channels, cfg.cnn_hidden)


def build_model(cfg: WorkloadConfig, k: int) -> MultiHeadModel:
    """A fresh model on ``cfg.device``; identical (bitwise) for identical ``cfg`` and ``k``."""
    if cfg.kind not in ("mlp", "cnn"):
        raise ValueError(f"unknown workload kind {cfg.kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        trunk = build_trunk(cfg)
        return MultiHeadModel(trunk, feature_dim(cfg), k, cfg.head_outputs).to(cfg.device)


def input_shape(cfg: WorkloadConfig) -> Tuple[int, ...]:
    return (cfg.in_dim,) if cfg.kind == "mlp" else (cfg.in_channels, cfg.image, cfg.image)


def signs(k: int) -> Tensor:
    """``+1, -1, +1, ...``: half the tasks want ``f``, the other half ``-f``."""
    return torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(k)])


def make_data(cfg: WorkloadConfig, k: int) -> List[Batch]:
    """``cfg.n_batches`` batches ``(x, y)`` with ``y_i = s_i (f(x) + offset) + own * f_i(x) + noise``,
    on ``cfg.device``; ``y`` is ``(N, K)``, or ``(N, K, head_outputs)`` with one ``f_i`` per output.

    ``f`` and the task-specific ``f_i`` are fixed random two-layer tanh networks of the
    flattened input, standardised, so the targets are nonlinear in ``x``. The shared part
    ``s_i (f + offset)`` flips sign between tasks (that is the conflict); the offset makes
    the constant part of the residual conflict too (otherwise the heads' initial output
    mean, common to all tasks, would align their trunk gradients); ``f_i`` keeps the
    tasks from being exact negatives of each other.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    shape = input_shape(cfg)
    n_in = 1
    for s in shape:
        n_in *= s
    outputs = cfg.head_outputs
    w1 = torch.randn(n_in, 64, generator=gen) / n_in**0.5
    w2 = torch.randn(64, 1 + k * outputs, generator=gen) / 8.0
    s = signs(k).repeat_interleave(outputs).unsqueeze(0)
    out: List[Batch] = []
    for _ in range(cfg.n_batches):
        x = torch.randn(cfg.batch, *shape, generator=gen)
        f = torch.tanh(2.0 * x.reshape(cfg.batch, -1) @ w1) @ w2
        f = (f - f.mean(0)) / (f.std(0) + 1e-12)
        noise = cfg.noise * torch.randn(cfg.batch, k * outputs, generator=gen)
        y = (f[:, :1] + cfg.offset) * s + cfg.own * f[:, 1:] + noise
        if outputs > 1:
            y = y.reshape(cfg.batch, k, outputs)
        out.append((x.to(cfg.device), y.to(cfg.device)))
    return out


@dataclass
class ConflictStats:
    """Task-gradient geometry on the shared trunk at init (one batch)."""

    k: int
    pairs: int
    conflicting: int
    fraction: float
    mean_cos: float
    min_cos: float
    gram: Tensor = field(repr=False)

    def to_dict(self) -> Dict[str, object]:
        return {
            "pairs": self.pairs,
            "conflicting": self.conflicting,
            "fraction": self.fraction,
            "mean_cos": self.mean_cos,
            "min_cos": self.min_cos,
        }


def shared_jacobian(model: MultiHeadModel, batch: Batch) -> Tensor:
    """The ``(K, P)`` matrix of per-task gradients on the trunk (K plain backward passes)."""
    losses = model.losses(batch)
    shared = model.shared_parameters()
    rows = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, shared, retain_graph=i < len(losses) - 1)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def conflict_stats(model: MultiHeadModel, batch: Batch) -> ConflictStats:
    """Fraction of task pairs whose trunk gradients have a negative cosine."""
    jac = shared_jacobian(model, batch).double()
    gram = jac @ jac.T
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    cos = gram / norms[:, None] / norms[None, :]
    k = gram.shape[0]
    iu = torch.triu_indices(k, k, offset=1, device=cos.device)
    pair_cos = cos[iu[0], iu[1]]
    pairs = int(pair_cos.numel())
    conflicting = int((pair_cos < 0).sum())
    return ConflictStats(
        k=k,
        pairs=pairs,
        conflicting=conflicting,
        fraction=conflicting / pairs if pairs else 0.0,
        mean_cos=float(pair_cos.mean()) if pairs else 1.0,
        min_cos=float(pair_cos.min()) if pairs else 1.0,
        gram=gram,
    )


def expected_conflict_fraction(k: int) -> float:
    """Pairs with opposite signs ``s_i s_j = -1`` over all pairs."""
    if k < 2:
        return 0.0
    plus = (k + 1) // 2
    return plus * (k - plus) / (k * (k - 1) / 2)


def trunk_linear_modules(model: MultiHeadModel) -> Sequence[nn.Module]:
    return [m for m in model.trunk.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
