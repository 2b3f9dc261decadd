"""Hugging Face ``transformers.Trainer`` with a multi-task optimizer.

``MultiTaskTrainer`` is a ``Trainer`` whose model returns one loss per task
(``outputs["losses"]``: a mapping by task name, or a sequence) instead of one loss::

    trainer = MultiTaskTrainer(
        model=model, args=args, train_dataset=train,
        multitask={"surgery": "pcgrad", "weighting": "uncertainty", "task_names": ["a", "b"]},
    )
    trainer.train()

The optimizer the Trainer builds from ``args`` (``optim``, ``learning_rate``,
``weight_decay``, ...) is wrapped in a ``MultiTaskOptimizer(**multitask)``; a
``MultiTaskOptimizer`` passed as ``optimizers=(opt, scheduler)`` is used as it is (a
plain optimizer passed there is wrapped). Everything else stays the Trainer's:

- **Gradient accumulation** (``gradient_accumulation_steps``): every micro-batch goes to
  ``opt.accumulate()`` (each task's loss divided by the number of micro-batches, as the
  Trainer divides its loss), and the Trainer's ``optimizer.step()`` runs the method once
  on the sum: the same step as on the big batch.
- **Clipping** (``max_grad_norm``): the final update (after the surgery) is clipped, by the
  optimizer's ``max_grad_norm`` (the Trainer's own clipping would act on an empty
  ``.grad`` before the update exists); ``grad_norm`` in the logs is its norm before clipping.
- Learning-rate schedulers, checkpoints (the optimizer's ``state_dict`` carries the
  method's state) and ``resume_from_checkpoint``, evaluation (``eval_loss`` is the sum of
  the task losses) and logging work unchanged.
- **Logs**: every training log (``state.log_history`` and the loggers: TensorBoard,
  W&B, ...) also holds ``multitask/loss/<task>`` (means since the last log), and the
  method's statistics averaged over the steps since the last log:
  ``multitask/weight/<task>``, ``multitask/coefficient/<task>``,
  ``multitask/grad_norm/<task>``, ``multitask/cosine/<a>-<b>``, ``multitask/conflicts``;
  evaluation logs hold ``eval_loss/<task>``.

**Weights-only mode.** Where the Trainer's engine owns the backward and the step --
DeepSpeed, and float16 mixed precision (a ``GradScaler``) -- the trainer uses
``opt.weighted_loss()`` (see :meth:`~multitask_optim.MultiTaskOptimizer.weighted_loss`):
the loss handed to ``accelerator.backward`` is ``sum_i c_i w_i L_i`` with the method's
coefficients, so the engine's backward applies the method; the Trainer clips as usual.
There gradient accumulation applies the method per micro-batch, and a task's own
parameters receive ``c_i w_i grad L_i``. ``weights_only=True`` asks for this mode
anywhere. A DeepSpeed configuration with its own ``"optimizer"`` section replaces the
optimizer: the first training step then raises instead of training without the method;
FSDP (which rebuilds the parameters the optimizer holds) is refused.

**Where the losses come from.** :meth:`MultiTaskTrainer.compute_task_losses` calls the
model and reads ``outputs["losses"]``; override it to compute the losses from the
inputs and outputs some other way (it returns the losses, or ``(losses, outputs)``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._clipping import check_max_grad_norm
from .._losses import Losses
from ..optimizer import MultiTaskOptimizer
from ._common import Means, find_multitask, require, step_scalars, task_values

__all__ = ["MultiTaskTrainer"]

transformers = require("transformers", "transformers")
Trainer = transformers.Trainer
TrainerCallback = transformers.TrainerCallback
DistributedType = require("accelerate", "transformers").DistributedType


class _RecordSteps(TrainerCallback):  # type: ignore[misc, valid-type]
    """After every optimizer step: hand the method's statistics to the trainer, zero the
    optimizer's gradients."""

    def __init__(self, trainer: MultiTaskTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._record_step()
        opt = find_multitask(self.trainer.optimizer)
        if opt is not None:  # the Trainer zeroes the model's gradients only, not a learnable weighting's
            opt.zero_grad(set_to_none=True)


class MultiTaskTrainer(Trainer):  # type: ignore[misc, valid-type]
    """A ``transformers.Trainer`` that trains with a :class:`~multitask_optim.MultiTaskOptimizer`.

    Args:
        *args: the ``Trainer``'s positional arguments.
        multitask: keyword arguments of ``MultiTaskOptimizer`` (``surgery``,
            ``weighting``, ``task_names``, ``seed``, ...) for the optimizer built from
            ``args``. ``max_grad_norm`` comes from ``args.max_grad_norm``. A learnable
            weighting needs ``task_names`` (its param group must exist before the
            learning-rate scheduler is built).
        weights_only: ``None`` (default): weights-only mode under DeepSpeed or float16
            mixed precision, the full step elsewhere; ``True`` or ``False`` to choose.
        **kwargs: the ``Trainer``'s keyword arguments (``model``, ``args``,
            ``train_dataset``, ``optimizers``, ...).

    Raises:
        ValueError: ``multitask`` with ``max_grad_norm`` (use ``args.max_grad_norm``),
            or with an optimizer given in ``optimizers=``.
    """

    def __init__(
        self,
        *args: Any,
        multitask: Optional[Mapping[str, Any]] = None,
        weights_only: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        options = dict(multitask or {})
        if "max_grad_norm" in options:
            raise ValueError("multitask= takes no max_grad_norm: set TrainingArguments(max_grad_norm=...)")
        given = (kwargs.get("optimizers") or (None, None))[0]
        if isinstance(given, MultiTaskOptimizer) and options:
            raise ValueError(
                "multitask= configures the optimizer the trainer builds; optimizers= already has one"
            )
        if weights_only not in (None, True, False):
            raise ValueError(f"weights_only must be None, True or False, got {weights_only!r}")
        self.multitask = options
        self.weights_only = weights_only
        self._task_losses = Means()
        self._step_stats = Means()
        self._eval_losses = Means()
        self._last_norm: Optional[float] = None
        self._skipped = 0
        super().__init__(*args, **kwargs)
        self.add_callback(_RecordSteps(self))

    # ------------------------------------------------------------------ mode and optimizer
    def uses_weights_only(self) -> bool:
        """Whether training steps go through ``weighted_loss`` (see the module docstring).

        Returns:
            ``weights_only`` when given, else True under DeepSpeed or a gradient scaler.

        Raises:
            ValueError: under FSDP, which the multi-task optimizer cannot follow here.
        """
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                "MultiTaskTrainer does not support FSDP (the Trainer rebuilds the parameters the optimizer "
                "holds); use DDP or DeepSpeed, or a MultiTaskOptimizer in your own loop"
            )
        if self.weights_only is not None:
            return self.weights_only
        return bool(getattr(self, "is_deepspeed_enabled", False)) or self.accelerator.scaler is not None

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (built from ``args``, or given), as a ``MultiTaskOptimizer``.

        Args:
            model: passed on to ``transformers.Trainer.create_optimizer``.

        Returns:
            The optimizer the Trainer steps (``self.optimizer``).

        Raises:
            ValueError: under FSDP, or a learnable weighting without ``task_names`` in
                ``multitask`` (its param group must exist before the scheduler).
        """
        weights_only = self.uses_weights_only()
        inner = super().create_optimizer(model) if self.optimizer is None else self.optimizer
        opt = find_multitask(inner)
        if opt is None:
            opt = MultiTaskOptimizer(inner, **self.multitask)
            self.optimizer = opt
        if opt.weighting.learnable and not opt.tasks:
            raise ValueError(
                f"weighting {opt.weighting.name!r} learns parameters whose param group must exist before the "
                "learning-rate scheduler: pass multitask={..., 'task_names': [...]}"
            )
        if weights_only:
            if opt.grad_scaler is None and self.accelerator.scaler is not None:
                opt.grad_scaler = self.accelerator.scaler  # its scale, for the per-task gradients
        elif opt.max_grad_norm is None and self.args.max_grad_norm and self.args.max_grad_norm > 0:
            opt.max_grad_norm = check_max_grad_norm(self.args.max_grad_norm)
        return self.optimizer

    def multitask_optimizer(self) -> MultiTaskOptimizer:
        """The ``MultiTaskOptimizer`` the Trainer steps (inside Accelerate's or DeepSpeed's wrapper).

        Returns:
            The wrapper itself (its ``last_stats``, ``tasks``, ``weighted_loss``).

        Raises:
            RuntimeError: the optimizer in use is not one (e.g. a DeepSpeed configuration
                with its own ``"optimizer"`` section): training would ignore the method.
        """
        opt = find_multitask(self.optimizer)
        if opt is None:
            raise RuntimeError(
                f"MultiTaskTrainer: the optimizer in use ({type(self.optimizer).__name__}) is not a "
                "MultiTaskOptimizer, so training would ignore the multi-task method. Under DeepSpeed remove "
                "the 'optimizer' section of the DeepSpeed config so that the Trainer's optimizer is used."
            )
        return opt

    # ------------------------------------------------------------------ losses
    def compute_task_losses(
        self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False
    ) -> Union[Losses, Tuple[Losses, Any]]:
        """The per-task losses of a batch: ``model(**inputs)["losses"]``.

        Override to compute them some other way (e.g. from the logits and labels).

        Args:
            model: the (wrapped) model.
            inputs: the batch, already on the device.
            return_outputs: also return the model's outputs.

        Returns:
            A mapping by task name or a sequence of scalar losses (absent tasks left out
            or ``None``), or ``(losses, outputs)``.

        Raises:
            ValueError: the outputs have no ``"losses"``.
        """
        outputs = model(**inputs)
        losses = outputs.get("losses") if isinstance(outputs, Mapping) else getattr(outputs, "losses", None)
        if losses is None:
            raise ValueError(
                "MultiTaskTrainer: the model's outputs have no 'losses' (one loss per task, a mapping or a "
                "sequence); return them as outputs['losses'] or override compute_task_losses"
            )
        return (losses, outputs) if return_outputs else losses

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Union[Tensor, Tuple[Tensor, Any]]:
        """The sum of the task losses (evaluation, ``prediction_step``); per-task values are logged."""
        losses, outputs = self.compute_task_losses(model, inputs, return_outputs=True)  # type: ignore[misc]
        values = _present(losses)
        if not model.training:
            self._eval_losses.add(task_values(losses, self._names()))
        total = torch.stack([v.reshape(()) for v in values.values()]).sum()
        return (total, outputs) if return_outputs else total

    def training_step(
        self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """One micro-batch: ``opt.accumulate(losses)`` (the Trainer's ``optimizer.step()``
        then runs the method once), or in weights-only mode the backward of
        ``opt.weighted_loss(losses)``. Returns the summed loss, detached, for the logs."""
        opt = self.multitask_optimizer()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            losses = self.compute_task_losses(model, inputs)
        self._task_losses.add(task_values(losses, self._names()))
        parts = _present(losses)
        if not self.loss_is_scaled_for_ga:  # a per-batch mean: the accumulated sum is the big batch's
            scale = 1.0 / self.current_gradient_accumulation_steps
            parts = {k: v * scale if scale != 1.0 else v for k, v in parts.items()}
        scaled: Losses = parts if isinstance(losses, Mapping) else _as_sequence(losses, parts)
        total = torch.stack([v.detach().reshape(()) for v in parts.values()]).sum()
        if self.uses_weights_only():
            loss = opt.weighted_loss(scaled)
            kwargs = {}
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                kwargs["scale_wrt_gas"] = False  # already divided by the accumulation steps (as Trainer does)
            self.accelerator.backward(loss, **kwargs)
        else:
            opt.accumulate(scaled)
        return total.to(self.args.device)

    # ------------------------------------------------------------------ clipping
    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Full mode: the optimizer clips the final update inside its step; nothing here."""
        if self.uses_weights_only():
            return super()._clip_grad_norm(model)
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """Full mode: ``.grad`` is empty before the step; the logs take the optimizer's norm."""
        if self.uses_weights_only():
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        return None

    # ------------------------------------------------------------------ logging
    def _names(self) -> Tuple[str, ...]:
        opt = find_multitask(self.optimizer)
        names = opt.tasks if opt is not None else ()
        return names or tuple(self.multitask.get("task_names") or ())

    def _record_step(self) -> None:
        opt = find_multitask(self.optimizer)
        if opt is None:
            return
        stats = opt.last_stats
        self._skipped = int(stats.get("skipped", self._skipped))
        if stats.get("skipped_step"):
            return
        scalars = step_scalars(stats, opt.tasks)
        self._step_stats.add({k: v for k, v in scalars.items() if not k.startswith("multitask/loss/")})
        if "grad_norm" in stats:
            self._last_norm = float(stats["grad_norm"])

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's logs, with the per-task losses and the method's statistics."""
        if "loss" in logs:
            logs.update({f"multitask/loss/{k}": v for k, v in self._task_losses.pop().items()})
            logs.update(self._step_stats.pop())
            logs["multitask/skipped"] = float(self._skipped)
            if "grad_norm" not in logs and self._last_norm is not None:
                logs["grad_norm"] = self._last_norm
        if "eval_loss" in logs:
            logs.update({f"eval_loss/{k}": v for k, v in self._eval_losses.pop().items()})
        super().log(logs, *args, **kwargs)


def _present(losses: Losses) -> Dict[str, Tensor]:
    """The present tasks' losses by key (position for a sequence), in order."""
    if isinstance(losses, Mapping):
        return {str(k): v for k, v in losses.items() if v is not None}
    if isinstance(losses, Tensor):
        return {str(i): v for i, v in enumerate(losses.unbind(0))}
    return {str(i): v for i, v in enumerate(losses) if v is not None}


def _as_sequence(losses: Losses, parts: Dict[str, Tensor]) -> Losses:
    """``parts`` back in the layout of a sequence (``None`` where a task is absent)."""
    if isinstance(losses, Tensor):
        return torch.stack([parts[str(i)] for i in range(losses.shape[0])])
    return [parts.get(str(i)) for i in range(len(losses))]  # type: ignore[arg-type]
