"""Multi-task training with PyTorch Lightning and ``MultiTaskOptimizer``.

Manual optimisation (``automatic_optimization = False``): the LightningModule computes
one loss per task and hands them to the optimizer, which computes the per-task
gradients itself (no ``self.manual_backward``, no ``loss.backward()``).

How the step is called. ``self.optimizers()`` returns Lightning's ``LightningOptimizer``
wrapper, whose ``step(closure=None, **kwargs)`` takes the closure positionally and
passes keyword arguments on, adding a closure of its own; ``MultiTaskOptimizer`` runs
that closure first (as torch optimizers do) and then the multi-task step, which
Lightning counts (``global_step``, ``max_steps``, checkpoints)::

    opt = self.optimizers()          # LightningOptimizer
    opt.zero_grad()
    opt.step(losses=losses)          # by keyword: a positional argument is the closure

Use ``opt.optimizer`` (not the wrapper) for everything else too -- ``last_stats``,
``accumulate``, ``epoch_end``, ``tasks``: the wrapper holds a copy of the optimizer's
attributes taken when training started, which is not kept up to date.

Checkpoints: Lightning saves ``optimizer.state_dict()`` (the inner optimizer's state
plus the ``"multitask"`` entry: generator, GradVac targets, preconditioning
accumulators, weighting state) and ``trainer.fit(model, ckpt_path=...)`` restores it
with ``load_state_dict``; the resumed run continues exactly as an uninterrupted one.

Run: ``python examples/lightning_multitask.py [--plot run.png]`` (needs ``pip install "multitask_optim[lightning]"``).
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


class MultiTaskModule(L.LightningModule):
    """A shared trunk, one head per task, trained with ``MultiTaskOptimizer``."""

    def __init__(
        self,
        in_dim: int = 8,
        hidden: int = 32,
        lr: float = 1e-2,
        surgery: Optional[str] = "gradvac",
        precondition: Optional[str] = "adam",
        weighting: Optional[str] = "uncertainty",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
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

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        losses = self.losses(batch)
        opt = self.optimizers()  # LightningOptimizer
        opt.zero_grad()
        opt.step(losses=losses)  # by keyword: Lightning takes a positional argument as the closure
        mt: MultiTaskOptimizer = opt.optimizer  # the MultiTaskOptimizer, for its statistics
        self.history.record(mt, self.global_step)
        self.log_dict({f"loss/{k}": v.detach() for k, v in losses.items()}, prog_bar=False)

    def configure_optimizers(self) -> MultiTaskOptimizer:
        hp = self.hparams
        return MultiTaskOptimizer(
            torch.optim.Adam(self.parameters(), lr=hp.lr),
            shared=self.trunk.parameters(),
            tasks={name: self.heads[name].parameters() for name in TASKS},
            surgery=hp.surgery,
            precondition=hp.precondition,
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


def main(plot: Optional[str] = None) -> None:
    with tempfile.TemporaryDirectory() as root:
        L.seed_everything(0, verbose=False)
        model = MultiTaskModule()
        trainer = make_trainer(root, max_epochs=1)
        trainer.fit(model, loader())
        ckpt = trainer.checkpoint_callback.best_model_path  # written at the end of the epoch
        print(f"trained {trainer.global_step} steps, checkpoint {ckpt.rsplit('/', 1)[-1]}")
        print("losses after the first epoch:", [round(v, 4) for v in model.history.losses[-1]])

        # Resume from an end-of-epoch checkpoint. (A checkpoint written because
        # max_steps was reached is resumed by Lightning as unfinished: its epoch is
        # re-entered with a fresh data iterator, so the batches no longer line up.)
        resumed = MultiTaskModule()
        trainer = make_trainer(root, max_epochs=3)
        trainer.fit(resumed, loader(), ckpt_path=ckpt)
        mt = trainer.optimizers[0]
        print(
            f"resumed to step {trainer.global_step}; losses:", [round(v, 4) for v in mt.last_stats["losses"]]
        )
        print("task cosines on the trunk:", [[round(c, 3) for c in row] for row in mt.last_stats["cosine"]])
        print("uncertainty log-variances:", [round(v, 4) for v in mt.weighting.parameters()[0].tolist()])
        if plot:
            plot_history(resumed.history, plot, title="resumed run (epochs 2-3)")
            print(f"saved {plot}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plot", metavar="PNG", help="save the cosine heat map and weights of the resumed run"
    )
    main(parser.parse_args().plot)
