"""Hugging Face Trainer integration (``MultiTaskTrainer``, issue 21).

A one-layer BERT (hidden size 32) built from a config -- no download -- with two heads
(a 2-class label, a regression) trains on CPU for a few steps. Checked: the plain
configuration trains the same parameters as a plain ``Trainer`` on the summed loss
(gradient accumulation, clipping and the linear schedule included); accumulation
equals the big batch under PCGrad; ``resume_from_checkpoint`` continues exactly;
per-task losses and the method's statistics reach ``state.log_history``; evaluation;
the DeepSpeed flag selects weights-only mode, and an optimizer that is not a
``MultiTaskOptimizer`` is refused instead of training without the method.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Dict

import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

transformers = pytest.importorskip("transformers")
from multitask_optim import MultiTaskOptimizer  # noqa: E402
from multitask_optim.integrations.transformers import MultiTaskTrainer  # noqa: E402

TASKS = ("label", "score")
N = 24


class TwoHeads(nn.Module):
    """A one-layer BERT encoder (from a config) and one head per task."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = transformers.BertModel(config, add_pooling_layer=False)
            self.heads = nn.ModuleDict({"label": nn.Linear(32, 2), "score": nn.Linear(32, 1)})

    def forward(self, input_ids: Tensor, target_label: Tensor, target_score: Tensor) -> Dict[str, Any]:
        h = self.encoder(input_ids=input_ids).last_hidden_state[:, 0]
        logits = self.heads["label"](h)
        losses = {
            "label": F.cross_entropy(logits, target_label),
            "score": F.mse_loss(self.heads["score"](h).squeeze(-1), target_score),
        }
        return {"losses": losses, "logits": logits}


class Summed(nn.Module):
    """The same model for a plain Trainer: one loss, the sum."""

    def __init__(self, inner: TwoHeads) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: Tensor, target_label: Tensor, target_score: Tensor) -> Dict[str, Any]:
        out = self.inner(input_ids, target_label, target_score)
        return {"loss": sum(out["losses"].values()), "logits": out["logits"]}


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = N, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 40, (n, 8), generator=g)
        self.label = (self.ids[:, 0] > 20).long()
        self.score = self.ids[:, 1].float() / 20 - 1 - 0.5 * self.label.float()  # conflicts with label

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return {"input_ids": self.ids[i], "target_label": self.label[i], "target_score": self.score[i]}


def arguments(root: Path, **kw: Any) -> Any:
    base = dict(
        output_dir=str(root),
        per_device_train_batch_size=4,
        learning_rate=0.05,
        optim="sgd",
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["target_label", "target_score"],
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def train(trainer: Any, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**kw)
    return trainer


def assert_close_params(a: nn.Module, b: nn.Module, rtol: float = 1e-5) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_plain_configuration_trains_as_a_plain_trainer_on_the_summed_loss(tmp_path: Path) -> None:
    """Accumulation over 2 micro-batches, clipping (max_grad_norm 0.5, which binds) and the
    linear schedule: the same parameters as Trainer on sum(losses)."""
    kw = dict(gradient_accumulation_steps=2, max_grad_norm=0.5, lr_scheduler_type="linear")
    ours = TwoHeads()
    plain = Summed(copy.deepcopy(ours))
    mt = train(
        MultiTaskTrainer(
            model=ours,
            args=arguments(tmp_path / "a", **kw),
            train_dataset=Data(),
            multitask={"surgery": None},
        )
    )
    train(transformers.Trainer(model=plain, args=arguments(tmp_path / "b", **kw), train_dataset=Data()))
    assert_close_params(ours, plain.inner)
    logs = [entry for entry in mt.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(entry["grad_norm"] > 0.5 for entry in logs)  # clipping was active
    assert all(f"multitask/loss/{t}" in entry for entry in logs for t in TASKS)
    metrics = mt.evaluate(Data(8, seed=1))
    assert metrics["eval_loss"] == pytest.approx(
        metrics["eval_loss/label"] + metrics["eval_loss/score"], rel=1e-5
    )


def test_accumulation_equals_the_big_batch_and_logs_the_method(tmp_path: Path) -> None:
    small, big = TwoHeads(), TwoHeads()
    method = {"surgery": "pcgrad", "weighting": "uncertainty", "task_names": list(TASKS), "seed": 1}
    a = train(
        MultiTaskTrainer(
            model=small,
            args=arguments(tmp_path / "a", gradient_accumulation_steps=2, max_steps=3),
            train_dataset=Data(),
            multitask=method,
        )
    )
    train(
        MultiTaskTrainer(
            model=big,
            args=arguments(tmp_path / "b", per_device_train_batch_size=8, max_steps=3),
            train_dataset=Data(),
            multitask=method,
        )
    )
    assert_close_params(small, big, rtol=1e-4)
    opt = a.multitask_optimizer()
    assert opt.tasks == TASKS and opt.state_dict()["multitask"]["steps"] == 3
    log = [entry for entry in a.state.log_history if "loss" in entry][-1]
    for key in (
        "multitask/weight/label",
        "multitask/coefficient/score",
        "multitask/cosine/label-score",
        "multitask/conflicts",
    ):
        assert key in log
    assert log["multitask/weight/label"] != 1.0  # uncertainty moved its log-variance


def test_resume_from_checkpoint_continues_exactly(tmp_path: Path) -> None:
    method = {"surgery": "gradvac", "weighting": "uncertainty", "task_names": list(TASKS), "seed": 2}
    # a constant learning rate: a 3-step run is then the first half of a 6-step one
    kw = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        optim="adamw_torch",
        learning_rate=0.01,
        lr_scheduler_type="constant",
    )
    straight = TwoHeads()
    train(
        MultiTaskTrainer(
            model=straight,
            args=arguments(tmp_path / "straight", **kw),
            train_dataset=Data(),
            multitask=method,
        )
    )
    first = TwoHeads()
    train(
        MultiTaskTrainer(
            model=first,
            args=arguments(tmp_path / "run", **{**kw, "max_steps": 3}),
            train_dataset=Data(),
            multitask=method,
        )
    )
    saved = torch.load(tmp_path / "run" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert saved["multitask"]["steps"] == 3 and saved["multitask"]["states"]["surgery"]
    resumed = TwoHeads(seed=5)  # initialised differently: everything comes from the checkpoint
    trainer = MultiTaskTrainer(
        model=resumed, args=arguments(tmp_path / "run", **kw), train_dataset=Data(), multitask=method
    )
    train(trainer, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert trainer.multitask_optimizer().state_dict()["multitask"]["steps"] == 6


def _batch(n: int = 4) -> Dict[str, Tensor]:
    data = Data()
    items = [data[i] for i in range(n)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def test_deepspeed_selects_weights_only_mode(tmp_path: Path) -> None:
    """Trainer reads ``is_deepspeed_enabled``; faked here (DeepSpeed is not installed): the
    training step is then the backward of ``weighted_loss``, whose shared gradient is the
    full step's update."""
    model, twin = TwoHeads(), TwoHeads()
    trainer = MultiTaskTrainer(
        model=model, args=arguments(tmp_path), train_dataset=Data(), multitask={"surgery": "pcgrad"}
    )
    trainer.is_deepspeed_enabled = True
    assert trainer.uses_weights_only()
    trainer.create_optimizer()
    opt = trainer.multitask_optimizer()
    assert opt.max_grad_norm is None  # the engine clips
    trainer.current_gradient_accumulation_steps = 1
    trainer._prepare_inputs = lambda inputs: inputs  # it would read DeepSpeed's config for float inputs
    trainer.training_step(model, _batch())
    assert opt.last_stats["weights_only"] is True and opt._pending is not None
    full = MultiTaskOptimizer(torch.optim.SGD(twin.parameters(), lr=0.05), surgery="pcgrad", seed=opt.seed)
    full.step(twin(**_batch())["losses"])
    assert opt.last_stats["coefficients"] == pytest.approx(full.last_stats["coefficients"], rel=1e-9)
    for p, q in zip(model.encoder.parameters(), twin.encoder.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_an_optimizer_that_ignores_the_method_is_refused(tmp_path: Path) -> None:
    """Where the optimizer is replaced (a DeepSpeed config's own optimizer), the first step
    raises instead of training without the method."""
    model = TwoHeads()
    trainer = MultiTaskTrainer(model=model, args=arguments(tmp_path), train_dataset=Data())
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # what a replacement leaves
    trainer.current_gradient_accumulation_steps = 1
    with pytest.raises(RuntimeError, match="not a MultiTaskOptimizer"):
        trainer.training_step(model, _batch())
    assert all(p.grad is None for p in model.parameters())


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_grad_norm"):
        MultiTaskTrainer(model=TwoHeads(), args=arguments(tmp_path), multitask={"max_grad_norm": 1.0})
    trainer = MultiTaskTrainer(
        model=TwoHeads(), args=arguments(tmp_path), multitask={"weighting": "uncertainty"}
    )
    with pytest.raises(ValueError, match="task_names"):
        trainer.create_optimizer()
    trainer = MultiTaskTrainer(model=TwoHeads(), args=arguments(tmp_path), train_dataset=Data())
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="FSDP"):
        trainer.create_optimizer()
