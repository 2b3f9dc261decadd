"""A short multi-task training run comparing methods on generated data.

Two tasks share an MLP trunk: a regression whose loss is ~1000x larger than the
other task's (magnitude imbalance) and a classification whose target partly
opposes the regression direction (gradient conflict). Each method trains the same
model from the same initialisation; the table shows held-out loss per task relative
to plain Adam on ``sum(losses)``.

Run: ``python examples/quickstart.py`` (about 20 s on one CPU core: 5 methods x 600
steps; ``--steps 50`` for a quick look).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from multitask_optim import MultiTaskOptimizer


def make_data(n: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = 16
    basis = torch.randn(2, d, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, d, generator=generator)
    u, v = x @ basis[0], x @ basis[1]
    y_reg = 30.0 * torch.sin(u) + 0.5 * torch.randn(n, generator=generator)
    logits = -1.5 * u + v  # opposes the regression's feature direction
    y_cls = (torch.rand(n, generator=generator) < torch.sigmoid(logits)).float()
    return x, y_reg, y_cls


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.reg = nn.Linear(64, 1)
        self.cls = nn.Linear(64, 1)

    def losses(self, x: torch.Tensor, y_reg: torch.Tensor, y_cls: torch.Tensor) -> Dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {
            "regression": nn.functional.mse_loss(self.reg(z).squeeze(-1), y_reg),
            "classification": nn.functional.binary_cross_entropy_with_logits(self.cls(z).squeeze(-1), y_cls),
        }


METHODS: Dict[str, Dict[str, Any]] = {
    "adam (sum of losses)": {"surgery": None},
    "pcgrad": {"surgery": "pcgrad"},
    "gradvac": {"surgery": "gradvac"},
    "per-task adam": {"surgery": None, "precondition": "adam"},
    "per-task adam + pcgrad": {"surgery": "pcgrad", "precondition": "adam"},
}


def train(options: Dict[str, Any], steps: int = 600, seed: int = 0) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    x, y_reg, y_cls = make_data(4096, gen)
    xt, yt_reg, yt_cls = make_data(2048, torch.Generator().manual_seed(seed + 1000))
    torch.manual_seed(seed)
    model = Net()
    opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), seed=seed, **options)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        opt.zero_grad()
        opt.step(model.losses(x[idx], y_reg[idx], y_cls[idx]))
    with torch.no_grad():
        return {k: float(v) for k, v in model.losses(xt, yt_reg, yt_cls).items()}


def main(steps: int = 600) -> List[Tuple[str, Dict[str, float], float]]:
    """Train every method for ``steps`` steps and print the table; returns its rows."""
    results: List[Tuple[str, Dict[str, float], float]] = []
    for name, options in METHODS.items():
        start = time.perf_counter()
        results.append((name, train(options, steps=steps), time.perf_counter() - start))
    base = results[0][1]
    print(f"{'method':<26}{'regression MSE':>16}{'classif. BCE':>14}{'mean rel. change':>18}{'time (s)':>10}")
    for name, res, seconds in results:
        rel = 100.0 * sum((res[k] - base[k]) / base[k] for k in base) / len(base)
        print(
            f"{name:<26}{res['regression']:>16.3f}{res['classification']:>14.4f}{rel:>17.1f}%{seconds:>10.1f}"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per method (default 600)")
    torch.set_num_threads(1)  # a small MLP: more threads only add synchronisation
    main(parser.parse_args().steps)
