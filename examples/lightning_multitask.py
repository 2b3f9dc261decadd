"""Multi-task training with PyTorch Lightning and ``MultiTaskOptimizer``.

The module derives from ``multitask_optim.integrations.lightning.MultiTaskModule``; its
``training_step`` returns one loss per task and ``configure_optimizers`` a
``MultiTaskOptimizer``. Two ways to train:

- **automatic optimization** (the default): Lightning runs the backward and the step;
  the losses go through ``opt.weighted_loss`` (weights-only mode), so the backward of
  ``sum_i c_i w_i L_i`` puts the method's update on the shared trunk;
- **manual optimization** (``--manual``): ``self.multitask_step(losses)`` runs the full
  ``opt.step(losses)``, the optimizer computing the per-task gradients itself -- needed
  for what a single backward cannot carry, such as per-task preconditioning
  (``precondition="adam"`` here).

Per-task losses and the method's statistics are logged (``self.log_dict``) and kept in a
``StatsHistory``. Checkpoints carry the optimizer's whole state (inner moments, the
``"multitask"`` entry: generator, GradVac targets, accumulators, weighting);
``trainer.fit(model, ckpt_path=...)`` continues exactly as an uninterrupted run.

Run: ``python examples/lightning_multitask.py [--manual] [--plot run.png]`` (about 10 s,
most of it importing Lightning; needs ``pip install -e ".[lightning]"`` from the checkout).
"""

from __future__ import annotations

import tempfile
from typing import Any, Dict, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from multitask_optim import MultiTaskOptimizer
from multitask_optim.diagnostics import StatsHistory, plot_history
from multitask_optim.integrations.lightning import MultiTaskModule

TASKS = ("depth", "normals", "label")


def make_data(n: int = 64, in_dim: int = 8, seed: int = 0) -> TensorDataset:
    """Inputs and three targets: two regressions with opposite trends and a 3-class label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    w = torch.randn(in_dim, 2, generator=g)
    depth = x @ w + 0.1 * torch.randn(n, 2, generator=g)
    normals = -depth + 0.3 * torch.randn(n, 2, generator=g)
    label = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, depth, normals, label)


class Model(MultiTaskModule):
    """A shared trunk, one head per task."""

    def __init__(
        self,
        in_dim: int = 8,
        hidden: int = 32,
        lr: float = 1e-2,
        manual: bool = False,
        surgery: Optional[str] = "gradvac",
        weighting: Optional[str] = "uncertainty",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = not manual
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleDict(
            {"depth": nn.Linear(hidden, 2), "normals": nn.Linear(hidden, 2), "label": nn.Linear(hidden, 3)}
        )
        self.history = StatsHistory(task_names=TASKS)  # opt.last_stats of every step

    def losses(self, batch: Sequence[Tensor]) -> Dict[str, Tensor]:
        x, depth, normals, label = batch
        h = self.trunk(x)
        return {
            "depth": F.mse_loss(self.heads["depth"](h), depth),
            "normals": F.mse_loss(self.heads["normals"](h), normals),
            "label": F.cross_entropy(self.heads["label"](h), label),
        }

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Optional[Dict[str, Tensor]]:
        losses = self.losses(batch)
        if self.automatic_optimization:
            return losses  # MultiTaskModule hands Lightning the weighted loss
        self.multitask_step(losses)  # the full opt.step(losses)
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.history.record(self.multitask_optimizer(), self.global_step)

    def configure_optimizers(self) -> MultiTaskOptimizer:
        hp = self.hparams
        return MultiTaskOptimizer(
            torch.optim.Adam(self.parameters(), lr=hp.lr),
            shared=self.trunk.parameters(),
            tasks={name: self.heads[name].parameters() for name in TASKS},
            surgery=hp.surgery,
            precondition="adam" if hp.manual else None,  # per-task preconditioning needs the full step
            weighting=hp.weighting,
            seed=hp.seed,
        )


def make_trainer(root: str, **kw: Any) -> L.Trainer:
    """A CPU trainer; ``kw`` sets the length (``max_epochs=`` or ``max_steps=``)."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kw,
    )


def loader(batch_size: int = 16) -> DataLoader:
    return DataLoader(make_data(), batch_size=batch_size, shuffle=False)


def main(plot: Optional[str] = None, manual: bool = False) -> None:
    with tempfile.TemporaryDirectory() as root:
        L.seed_everything(0, verbose=False)
        model = Model(manual=manual)
        trainer = make_trainer(root, max_epochs=1)
        trainer.fit(model, loader())
        ckpt = trainer.checkpoint_callback.best_model_path  # written at the end of the epoch
        mode = "manual" if manual else "automatic"
        print(
            f"{mode} optimization: trained {trainer.global_step} steps, checkpoint {ckpt.rsplit('/', 1)[-1]}"
        )
        print("losses after the first epoch:", [round(v, 4) for v in model.history.losses[-1]])

        # Resume from an end-of-epoch checkpoint. (A checkpoint written because
        # max_steps was reached is resumed by Lightning as unfinished: its epoch is
        # re-entered with a fresh data iterator, so the batches no longer line up.)
        resumed = Model(manual=manual)
        trainer = make_trainer(root, max_epochs=3)
        trainer.fit(resumed, loader(), ckpt_path=ckpt)
        mt = resumed.multitask_optimizer()
        print(
            f"resumed to step {trainer.global_step}; losses:", [round(v, 4) for v in mt.last_stats["losses"]]
        )
        print("task cosines on the trunk:", [[round(c, 3) for c in row] for row in mt.last_stats["cosine"]])
        print("uncertainty log-variances:", [round(v, 4) for v in mt.weighting.log_var.tolist()])
        if plot:
            plot_history(resumed.history, plot, title=f"resumed run (epochs 2-3, {mode} optimization)")
            print(f"saved {plot}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual", action="store_true", help="manual optimization (the full step)")
    parser.add_argument(
        "--plot", metavar="PNG", help="save the cosine heat map and weights of the resumed run"
    )
    args = parser.parse_args()
    main(args.plot, args.manual)
