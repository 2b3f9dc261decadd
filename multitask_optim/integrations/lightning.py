"""PyTorch Lightning with a multi-task optimizer, automatic or manual optimization.

Derive from :class:`MultiTaskModule` instead of ``LightningModule``, return a
``MultiTaskOptimizer`` from ``configure_optimizers`` and let ``training_step`` return
the per-task losses (a mapping by task name, a sequence, or a 1-D tensor)::

    class Model(MultiTaskModule):
        def training_step(self, batch, batch_idx):
            x, y_depth, y_label = batch
            z = self.trunk(x)
            return {"depth": mse(self.depth(z), y_depth), "label": ce(self.label(z), y_label)}

        def configure_optimizers(self):
            return MultiTaskOptimizer(torch.optim.Adam(self.parameters()), surgery="pcgrad")

**Automatic optimization** (the default): the losses go through
:meth:`~multitask_optim.MultiTaskOptimizer.weighted_loss` (weights-only mode), and
``training_step`` hands Lightning ``{"loss": sum_i c_i w_i L_i}``; Lightning's own
backward, precision plugin, gradient clipping (``gradient_clip_val``) and optimizer step
then apply the method to the shared parameters. As in any weights-only use, a task's
own parameters receive ``c_i w_i grad L_i`` and, with ``accumulate_grad_batches > 1``,
the method runs on each micro-batch (see :mod:`multitask_optim._weights_only`).

**Manual optimization** (``self.automatic_optimization = False``): call
:meth:`MultiTaskModule.multitask_step` with the losses inside ``training_step``; it runs
the full ``opt.step(losses)`` (the optimizer computes the per-task gradients itself: no
``manual_backward``), exact for every method, preconditioning and row methods included.

Both log the per-task losses and the method's statistics (``multitask/loss/<task>``,
``multitask/weight/<task>``, ``multitask/coefficient/<task>``,
``multitask/cosine/<a>-<b>``, ``multitask/conflicts``, ...) with ``self.log_dict`` (set
``log_multitask = False`` to turn that off). Checkpoints carry the optimizer's whole
state (``state_dict()["multitask"]``): ``trainer.fit(model, ckpt_path=...)`` continues
exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from torch import Tensor

from .._losses import Losses
from ..optimizer import MultiTaskOptimizer
from ._common import find_multitask, require, step_scalars

__all__ = ["MultiTaskModule"]

L = require("lightning", "lightning")


def _returns_losses(step: Callable[..., Any]) -> Callable[..., Any]:
    """``training_step`` that may return per-task losses: turned into Lightning's loss."""

    @functools.wraps(step)
    def training_step(self: MultiTaskModule, *args: Any, **kwargs: Any) -> Any:
        return self._to_loss(step(self, *args, **kwargs))

    training_step._multitask_wrapped = True  # type: ignore[attr-defined]
    return training_step


class MultiTaskModule(L.LightningModule):  # type: ignore[misc, name-defined]
    """A ``LightningModule`` whose ``training_step`` returns one loss per task.

    ``configure_optimizers`` must return a ``MultiTaskOptimizer`` (alone, in a list, or
    in Lightning's dict with an ``lr_scheduler``). What ``training_step`` may return in
    automatic optimization: per-task losses (a mapping without a ``"loss"`` key, a
    sequence, a 1-D tensor), or what Lightning itself takes (a scalar tensor, a mapping
    with ``"loss"``, ``None``), which is passed on unchanged.
    """

    #: whether the per-task losses and the method's statistics are logged every step
    log_multitask: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_multitask_wrapped", False):
            cls.training_step = _returns_losses(step)  # type: ignore[method-assign]

    def multitask_optimizer(self) -> MultiTaskOptimizer:
        """The ``MultiTaskOptimizer`` of ``configure_optimizers`` (inside Lightning's wrapper).

        Returns:
            The wrapper itself, whose ``last_stats``, ``tasks`` and ``accumulate`` are
            current (Lightning's wrapper keeps a stale copy of the attributes).

        Raises:
            TypeError: the configured optimizer is not a ``MultiTaskOptimizer``.
        """
        opts = self.optimizers()
        first = opts[0] if isinstance(opts, list) else opts
        opt = find_multitask(first)
        if opt is None:
            raise TypeError(
                f"{type(self).__name__}: configure_optimizers must return a MultiTaskOptimizer, got "
                f"{type(getattr(first, 'optimizer', first)).__name__}"
            )
        return opt

    def multitask_step(self, losses: Losses, **step_kwargs: Any) -> None:
        """Manual optimization: ``zero_grad`` and the full ``opt.step(losses)``, counted by Lightning.

        Args:
            losses: one loss per task (as for ``MultiTaskOptimizer.step``).
            **step_kwargs: passed on to ``step`` (``features=``, ``representation=``, ``samples=``).
        """
        opt = self.optimizers()
        opt = opt[0] if isinstance(opt, list) else opt
        opt.zero_grad()
        opt.step(losses=losses, **step_kwargs)  # by keyword: Lightning takes a positional one as the closure
        self._log_stats()

    def _to_loss(self, output: Any) -> Any:
        if not self.automatic_optimization or output is None:
            return output
        if isinstance(output, Tensor) and output.dim() == 0:
            return output
        if isinstance(output, Mapping) and "loss" in output:
            return output
        loss = self.multitask_optimizer().weighted_loss(output)
        self._log_stats()
        return {"loss": loss}

    def _log_stats(self) -> None:
        if not self.log_multitask or self._trainer is None:
            return
        opt = self.multitask_optimizer()
        scalars = step_scalars(opt.last_stats, opt.tasks)
        if scalars:
            self.log_dict(scalars, on_step=True, on_epoch=False, batch_size=1)
