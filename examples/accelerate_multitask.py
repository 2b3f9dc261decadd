"""Multi-task training with Hugging Face Accelerate and ``MultiTaskOptimizer``.

``accelerator.prepare`` takes the model, the data and the ``MultiTaskOptimizer`` as they
are. Two ways to step:

- ``--mode step`` (the full step): ``opt.step(losses)``. The optimizer computes the
  per-task gradients itself and, over several processes, averages each task's gradient
  across them before the Gram (one collective), so every process takes the same step,
  equal to one process on the global batch. Keep a reference to the
  ``MultiTaskOptimizer`` (``mt`` below) and call its ``step``: Accelerate's wrapper
  forwards only ``step()`` without losses.
- ``--mode weights_only``: ``accelerator.backward(mt.weighted_loss(losses))`` then
  ``opt.step()``. The scalar's backward (DDP averages it across the processes, mixed
  precision scales it) puts the method's update on the shared parameters.

Run on one process: ``python examples/accelerate_multitask.py``; on two CPU processes:
``accelerate launch --cpu --num_processes 2 examples/accelerate_multitask.py``
(needs ``pip install -e ".[accelerate]"`` from the checkout).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from multitask_optim import MultiTaskOptimizer

TASKS = ("depth", "label")


class Net(nn.Module):
    """A shared trunk and one head per task; ``forward`` returns the per-task losses."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleDict({"depth": nn.Linear(16, 1), "label": nn.Linear(16, 3)})

    def forward(self, x: Tensor, depth: Tensor, label: Tensor) -> Dict[str, Tensor]:
        z = self.trunk(x)
        return {
            "depth": F.mse_loss(self.heads["depth"](z).squeeze(-1), depth),
            "label": F.cross_entropy(self.heads["label"](z), label),
        }


def data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    label = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    depth = x[:, 2] - label.float()  # pulls the trunk against the label
    return TensorDataset(x, depth, label)


def build(seed: int = 0) -> Tuple[Net, MultiTaskOptimizer]:
    """The model and its optimizer (PCGrad, uncertainty weighting, an inner SGD)."""
    torch.manual_seed(seed)
    model = Net()
    mt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        surgery="pcgrad",
        weighting="uncertainty",
        task_names=TASKS,  # the weighting's parameters exist before training starts
        seed=seed,
    )
    return model, mt


def train(accelerator: Accelerator, mode: str = "step", steps: int = 4, batch_size: int = 8) -> Net:
    """``steps`` steps of ``batch_size`` samples per process, with ``mode`` ``"step"`` or ``"weights_only"``."""
    model, mt = build()
    loader = DataLoader(data(), batch_size=batch_size, shuffle=False)
    model, opt, loader = accelerator.prepare(model, mt, loader)
    for step, (x, depth, label) in enumerate(loader):
        if step == steps:
            break
        losses = model(x, depth, label)
        if mode == "step":
            mt.zero_grad()
            mt.step(losses)  # the full step on the MultiTaskOptimizer itself
        else:
            opt.zero_grad()
            accelerator.backward(mt.weighted_loss(losses))
            opt.step()
        if accelerator.is_main_process:
            stats = mt.last_stats
            print(
                f"step {step}: losses {[round(v, 4) for v in stats['losses']]}, conflicts {stats.get('conflicts')}"
            )
    return accelerator.unwrap_model(model)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("step", "weights_only"), default="step")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    train(Accelerator(cpu=True), args.mode, args.steps)
