"""Small, seeded multi-task models shared by the optimizer tests.

Every model exposes ``losses(batch) -> list[Tensor]`` (one scalar loss per task) and
every model class has a ``batch(step, ...)`` static/class method giving a deterministic
batch for a step index, so that two runs (or a run and its resumed copy) see exactly
the same data. Build models with :func:`build` so that two copies built with the same
seed are bitwise identical and the global RNG is left untouched.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = Tuple[Tensor, List[Tensor]]

#: Where :func:`build`, :func:`multihead` put models and the batch helpers put data. The
#: ``devices`` marker (tests/conftest.py) sets it for each device the test runs on; the
#: data are drawn on the CPU first, so every device sees the same numbers.
DEVICE = torch.device("cpu")


def build(factory: Callable[..., nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32, **kw: Any):
    """Build ``factory(**kw)`` under ``torch.manual_seed(seed)`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(**kw)
    return model.to(device=DEVICE, dtype=dtype)


def twin(model: nn.Module) -> nn.Module:
    """A bitwise identical, independent copy of ``model``."""
    return copy.deepcopy(model)


def generator(step: int, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(10_007 * seed + step)


def regression_batch(
    step: int,
    in_dim: int,
    out_dims: Sequence[int],
    batch: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Batch:
    """Inputs ``(batch, in_dim)`` and one target per task, deterministic in ``step``."""
    g = generator(step, seed)
    x = torch.randn(batch, in_dim, generator=g, dtype=torch.float64)
    targets = [torch.randn(batch, d, generator=g, dtype=torch.float64) for d in out_dims]
    return x.to(device=DEVICE, dtype=dtype), [t.to(device=DEVICE, dtype=dtype) for t in targets]


def parameter_names(model: nn.Module) -> Dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def snapshot(model: nn.Module) -> List[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------- models
class TrunkHeads(nn.Module):
    """Shared MLP trunk (two tanh layers) with ``K`` linear heads, MSE losses."""

    def __init__(self, in_dim: int = 5, hidden: int = 8, out_dims: Sequence[int] = (2, 3)) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dims = tuple(out_dims)
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden, d) for d in out_dims)

    @property
    def num_tasks(self) -> int:
        return len(self.out_dims)

    def batch(self, step: int, seed: int = 0) -> Batch:
        dtype = self.heads[0].weight.dtype
        return regression_batch(step, self.in_dim, self.out_dims, seed=seed, dtype=dtype)

    def losses(self, batch: Batch) -> List[Tensor]:
        x, targets = batch
        h = self.trunk(x)
        return [F.mse_loss(head(h), t) for head, t in zip(self.heads, targets)]


class TwoDepthHeads(nn.Module):
    """Head 0 reads the concatenation of two trunk depths; head 1 only the last one."""

    def __init__(self, in_dim: int = 5, hidden: int = 8) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dims = (2, 3)
        self.layer1 = nn.Linear(in_dim, hidden)
        self.layer2 = nn.Linear(hidden, hidden)
        self.head0 = nn.Linear(2 * hidden, 2)
        self.head1 = nn.Linear(hidden, 3)

    def batch(self, step: int, seed: int = 0) -> Batch:
        return regression_batch(step, self.in_dim, self.out_dims, seed=seed, dtype=self.head0.weight.dtype)

    def losses(self, batch: Batch) -> List[Tensor]:
        x, (t0, t1) = batch
        h1 = torch.tanh(self.layer1(x))
        h2 = torch.tanh(self.layer2(h1))
        y0 = self.head0(torch.cat([h1, h2], dim=1))
        y1 = self.head1(h2)
        return [F.mse_loss(y0, t0), F.mse_loss(y1, t1)]


class TiedHead(nn.Module):
    """A shared parameter read directly by a head: ``embed`` is the trunk's input
    projection and, transposed, head 1's output layer (weight tying). ``scale`` is read
    by the trunk and directly by head 0."""

    def __init__(self, in_dim: int = 5, hidden: int = 8) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dims = (2, in_dim)
        self.embed = nn.Parameter(torch.randn(in_dim, hidden) / in_dim**0.5)
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.mid = nn.Linear(hidden, hidden)
        self.head0 = nn.Linear(hidden, 2)

    def batch(self, step: int, seed: int = 0) -> Batch:
        return regression_batch(step, self.in_dim, self.out_dims, seed=seed, dtype=self.embed.dtype)

    def losses(self, batch: Batch) -> List[Tensor]:
        x, (t0, t1) = batch
        h = torch.tanh(self.mid(torch.tanh(x @ self.embed)) * self.scale)
        y0 = self.head0(h) * self.scale
        y1 = h @ self.embed.T
        return [F.mse_loss(y0, t0), F.mse_loss(y1, t1)]


class ChainedLosses(nn.Module):
    """Loss B is a function of loss A (plus its own head): ``L_b = mse_b + 0.3 log(1 + L_a)``."""

    def __init__(self, in_dim: int = 5, hidden: int = 8) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dims = (2, 3)
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.head_a = nn.Linear(hidden, 2)
        self.head_b = nn.Linear(hidden, 3)

    def batch(self, step: int, seed: int = 0) -> Batch:
        return regression_batch(step, self.in_dim, self.out_dims, seed=seed, dtype=self.head_a.weight.dtype)

    def losses(self, batch: Batch) -> List[Tensor]:
        x, (ta, tb) = batch
        h = self.trunk(x)
        loss_a = F.mse_loss(self.head_a(h), ta)
        loss_b = F.mse_loss(self.head_b(h), tb) + 0.3 * torch.log1p(loss_a)
        return [loss_a, loss_b]


class PartitionModel(nn.Module):
    """Trunk + 3 heads, a bias only head 2 reads, and a parameter no loss reads."""

    def __init__(self, in_dim: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dims = (1, 2, 3)
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden, d) for d in self.out_dims)
        self.head2_bias = nn.Parameter(torch.randn(3))
        self.unused = nn.Parameter(torch.randn(7))

    def batch(self, step: int, seed: int = 0) -> Batch:
        return regression_batch(step, self.in_dim, self.out_dims, seed=seed, dtype=self.unused.dtype)

    def losses(self, batch: Batch) -> List[Tensor]:
        x, targets = batch
        h = self.trunk(x)
        outs = [head(h) for head in self.heads]
        outs[2] = outs[2] + self.head2_bias
        return [F.mse_loss(y, t) for y, t in zip(outs, targets)]


class DetachFeed(nn.Module):
    """Task A's prediction is an input of task B's head through ``detach()``."""

    def __init__(self, in_dim: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dims = (2, 3)
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.head_a = nn.Linear(hidden, 2)
        self.head_b = nn.Linear(hidden + 2, 3)

    def batch(self, step: int, seed: int = 0) -> Batch:
        return regression_batch(step, self.in_dim, self.out_dims, seed=seed, dtype=self.head_a.weight.dtype)

    def losses(self, batch: Batch) -> List[Tensor]:
        x, (ta, tb) = batch
        h = self.trunk(x)
        ya = self.head_a(h)
        yb = self.head_b(torch.cat([h, ya.detach()], dim=1))
        return [F.mse_loss(ya, ta), F.mse_loss(yb, tb)]


class NonConflicting(nn.Module):
    """``K`` losses that are all increasing functions of one shared scalar ``s``.

    ``s = mean(trunk(x))``; task ``i`` has its own scalar head parameter ``a_i`` and
    ``L_0 = exp(a_0) softplus(s)``, ``L_1 = softplus(s + a_1)^2``,
    ``L_2 = exp(a_2) (s + 3)^2 / 2`` only while ``s > -3`` (kept so by construction).
    Every ``dL_i/ds > 0``, so the shared gradients are positive multiples of ``∇s``
    and never conflict.
    """

    def __init__(self, in_dim: int = 5, hidden: int = 8, num_tasks: int = 3) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_tasks = num_tasks
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.heads = nn.ParameterList(nn.Parameter(torch.tensor(0.1 * (i + 1))) for i in range(num_tasks))

    def batch(self, step: int, seed: int = 0) -> Batch:
        return regression_batch(step, self.in_dim, (), seed=seed, dtype=self.heads[0].dtype)

    def losses(self, batch: Batch) -> List[Tensor]:
        x, _ = batch
        s = torch.tanh(self.trunk(x).mean())  # in (-1, 1)
        out = []
        for i, a in enumerate(self.heads):
            if i % 3 == 0:
                out.append(torch.exp(a) * F.softplus(s))
            elif i % 3 == 1:
                out.append(F.softplus(s + a) ** 2)
            else:
                out.append(torch.exp(a) * (s + 3.0) ** 2 / 2)
        return out


class Conflicting(nn.Module):
    """Two tasks whose shared gradients conflict at initialisation.

    Both heads start nearly identical (small, slightly perturbed weights); task 1's
    target is the negation of task 0's, and the head outputs start small, so
    ``∇_trunk L_0`` and ``∇_trunk L_1`` point in roughly opposite directions.
    """

    def __init__(self, in_dim: int = 5, hidden: int = 8, out: int = 3) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(hidden, out), nn.Linear(hidden, out)])
        with torch.no_grad():
            self.heads[0].weight.mul_(0.1)
            self.heads[0].bias.zero_()
            self.heads[1].weight.copy_(self.heads[0].weight + 0.05 * torch.randn_like(self.heads[0].weight))
            self.heads[1].bias.zero_()
        self.out = out

    def batch(self, step: int, seed: int = 0) -> Batch:
        x, (t,) = regression_batch(
            step, self.in_dim, (self.out,), seed=seed, dtype=self.heads[0].weight.dtype
        )
        t = t + 2.0
        return x, [t, -t]

    def losses(self, batch: Batch) -> List[Tensor]:
        x, (t0, t1) = batch
        h = self.trunk(x)
        return [F.mse_loss(self.heads[0](h), t0), F.mse_loss(self.heads[1](h), t1)]


class FaultNet(nn.Module):
    """A tiny MLP or Conv1d trunk with ``K`` linear heads, for the stateful fault suite.

    ``trunk="mlp"``: ``Linear(in_dim, hidden) -> tanh``; ``trunk="conv"``: the input as
    one channel, ``Conv1d(1, 2, 3) -> tanh -> flatten``. :meth:`layers` lists the modules
    that hold parameters (trunk layers, then heads), for a per-layer granularity.
    """

    def __init__(self, trunk: str = "mlp", num_tasks: int = 2, in_dim: int = 6, hidden: int = 6) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dims = tuple(1 + i % 2 for i in range(num_tasks))
        if trunk == "mlp":
            self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
            width = hidden
        elif trunk == "conv":
            self.trunk = nn.Sequential(
                nn.Unflatten(1, (1, in_dim)), nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten()
            )
            width = 2 * (in_dim - 2)
        else:
            raise ValueError(f"trunk must be 'mlp' or 'conv', got {trunk!r}")
        self.heads = nn.ModuleList(nn.Linear(width, d) for d in self.out_dims)

    def layers(self) -> List[nn.Module]:
        """Modules holding parameters, trunk first."""
        return [m for m in self.trunk if any(True for _ in m.parameters(recurse=False))] + list(self.heads)

    def batch(self, step: int, seed: int = 0) -> Batch:
        return regression_batch(step, self.in_dim, self.out_dims, batch=4, seed=seed)

    def outputs(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """The representation ``z`` and every head's output."""
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


class MultiHead(nn.Module):
    """Shared tanh trunk (``depth`` Linear + Tanh layers) and ``k`` linear heads;
    ``forward`` returns one output per task.

    The heads start as small perturbations of head 0, so with opposite-sign targets for
    consecutive tasks the tasks' trunk gradients conflict.
    """

    def __init__(self, k: int = 3, in_dim: int = 6, hidden: int = 12, depth: int = 2, out: int = 2) -> None:
        super().__init__()
        self.k = k
        layers: List[nn.Module] = [nn.Linear(in_dim, hidden), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.Tanh()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(hidden, out) for _ in range(k))
        with torch.no_grad():
            for head in self.heads[1:]:
                head.weight.copy_(self.heads[0].weight + 0.1 * torch.randn_like(head.weight))

    def forward(self, x: Tensor) -> List[Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def multihead(k: int = 3, seed: int = 0) -> MultiHead:
    """A fresh :class:`MultiHead` (default sizes), the same for the same ``k`` and ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultiHead(k).to(DEVICE)


def conflicting_losses(model: MultiHead, seed: int, scale: float = 1.0) -> List[Tensor]:
    """MSE losses of a batch of 10 drawn from ``seed``, with targets of alternating sign per task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 6, generator=g).to(DEVICE)
    base = (torch.randn(10, 2, generator=g) + 1.0).to(DEVICE)
    return [F.mse_loss(y, (-1.0) ** i * base) * scale for i, y in enumerate(model(x))]
