"""PyTorch Lightning: ``multitask_optim.integrations.lightning`` (examples/lightning_multitask.py).

The example's ``MultiTaskModule`` is trained with a real ``Trainer`` on CPU, with
automatic optimization (``training_step`` returns the per-task losses; weights-only mode
under Lightning's backward) and with manual optimization (``self.multitask_step``: the
full step, per-task preconditioning included). A checkpoint written by Lightning's own
``ModelCheckpoint`` is resumed with ``trainer.fit(model, ckpt_path=...)``: the
optimizer's full state (inner Adam moments, the ``"multitask"`` entry with the
generator state, GradVac targets, per-task accumulators, uncertainty weighting) comes
back bitwise, and the resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

L = pytest.importorskip("lightning")

BATCHES_PER_EPOCH = 4
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_multitask.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("lightning_multitask_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Probe(example.Model):
    """The example's module (manual optimization), recording the optimizer state when
    training starts (after Lightning restored a checkpoint, if any)."""

    def __init__(self, manual: bool = True) -> None:
        super().__init__(manual=manual)

    def on_train_start(self) -> None:
        self.state_at_start = copy.deepcopy(self.trainer.optimizers[0].state_dict())


class AutoProbe(Probe):
    """The same with automatic optimization (``training_step`` returns the losses)."""

    def __init__(self) -> None:
        super().__init__(manual=False)


def fit(root: Path, steps: int, ckpt_path=None, init_seed: int = 0, module=Probe, by_epochs: bool = False):
    """Fit ``steps`` optimizer steps (4 batches per epoch); ``by_epochs`` stops with
    ``max_epochs`` instead of ``max_steps`` (Lightning resumes a checkpoint written at
    a ``max_steps`` stop as an unfinished epoch, with a fresh data iterator)."""
    L.seed_everything(init_seed, verbose=False)
    model = module()
    length = {"max_epochs": steps // BATCHES_PER_EPOCH} if by_epochs else {"max_steps": steps}
    trainer = example.make_trainer(str(root), **length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, example.loader(), ckpt_path=ckpt_path)
    assert trainer.global_step == steps
    return model, trainer


def leaves(obj: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(obj, dict):
        out: Dict[str, Any] = {}
        for key, value in obj.items():
            out.update(leaves(value, f"{prefix}/{key}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for n, value in enumerate(obj):
            out.update(leaves(value, f"{prefix}/{n}"))
        return out
    return {prefix: obj}


def assert_same(a: Any, b: Any) -> None:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        x, y = la[key], lb[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), f"{key} differs"
        else:
            assert x == y, f"{key} differs: {x!r} vs {y!r}"


def assert_params_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), f"{name} differs"


@pytest.mark.parametrize("module", [Probe, AutoProbe], ids=["manual", "automatic"])
def test_fit_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Path, module) -> None:
    straight, straight_trainer = fit(tmp_path / "straight", 8, by_epochs=True, module=module)

    first, first_trainer = fit(tmp_path / "first", 4, by_epochs=True, module=module)
    ckpt = first_trainer.checkpoint_callback.best_model_path
    assert ckpt.endswith("epoch=0-step=4.ckpt")
    saved = torch.load(ckpt, weights_only=True)["optimizer_states"][0]
    mt = saved["multitask"]
    assert mt["steps"] == 4
    assert mt["states"]["surgery"], "GradVac targets are saved"
    if module is Probe:
        assert mt["states"]["precondition"], "per-task accumulators are saved"
    assert mt["weighting_params"], "the uncertainty log-variances are saved"
    assert_same(saved, first_trainer.optimizers[0].state_dict())

    # a module initialised differently: everything must come from the checkpoint
    resumed, resumed_trainer = fit(
        tmp_path / "resumed", 8, ckpt_path=ckpt, init_seed=123, by_epochs=True, module=module
    )
    assert_same(resumed.state_at_start, saved)
    assert resumed_trainer.optimizers[0].state_dict()["multitask"]["steps"] == 8

    assert_params_equal(resumed, straight)
    assert_same(resumed_trainer.optimizers[0].state_dict(), straight_trainer.optimizers[0].state_dict())
    # the run moved the parameters, and the surgery saw conflicts
    L.seed_everything(0, verbose=False)
    fresh = module()
    assert any(not torch.equal(p, q) for p, q in zip(straight.parameters(), fresh.parameters()))
    assert sum(c for c in straight.history.conflicts if c is not None) > 0
    assert len(straight.history) == 8 and straight.history.steps == list(
        range(1, 9)
    )  # global_step after each step


def test_the_lightning_step_equals_a_plain_loop(tmp_path: Path) -> None:
    """Manual optimization takes exactly the steps of a plain loop over the same batches
    (the extra ``opt.step()`` that counts the step for Lightning updates nothing)."""
    model, trainer = fit(tmp_path, 5)
    L.seed_everything(0, verbose=False)
    plain = Probe()
    opt = plain.configure_optimizers()
    batches = list(example.loader())
    for step in range(5):
        opt.zero_grad()
        opt.step(plain.losses(batches[step % len(batches)]))
    assert_params_equal(model, plain)
    assert_same(trainer.optimizers[0].state_dict(), opt.state_dict())


def test_automatic_optimization_equals_a_weights_only_loop(tmp_path: Path) -> None:
    """Automatic optimization: Lightning's backward of the loss ``training_step`` hands it
    and its ``optimizer.step(closure)`` are ``weighted_loss`` + backward + ``step()``."""
    model, trainer = fit(tmp_path, 5, module=AutoProbe)
    L.seed_everything(0, verbose=False)
    plain = AutoProbe()
    opt = plain.configure_optimizers()
    batches = list(example.loader())
    for step in range(5):
        opt.zero_grad()
        opt.weighted_loss(plain.losses(batches[step % len(batches)])).backward()
        opt.step()
    assert_params_equal(model, plain)
    assert_same(trainer.optimizers[0].state_dict(), opt.state_dict())
    assert trainer.callback_metrics["multitask/weight/depth"] > 0  # logged with self.log_dict


def test_a_configured_optimizer_must_be_a_multitask_optimizer(tmp_path: Path) -> None:
    class Plain(AutoProbe):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="MultiTaskOptimizer"):
        fit(tmp_path, 1, module=Plain)


class KeywordStep(Probe):
    """Lightning's documented way to pass extra arguments to an optimizer's ``step``:
    ``LightningOptimizer.step(closure=None, **kwargs)`` forwards the keywords, with a
    closure of its own (hooks), to ``optimizer.step``."""

    def training_step(self, batch, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        opt.step(losses=self.losses(batch))
        self.history.record(opt.optimizer, self.global_step)


def test_lightning_optimizer_step_with_losses_keyword(tmp_path: Path) -> None:
    """``self.optimizers().step(losses=losses)`` -- one call, counted by Lightning --
    equals ``self.multitask_step(losses)``."""
    keyword, _ = fit(tmp_path / "keyword", 3, module=KeywordStep)
    example_way, _ = fit(tmp_path / "example", 3)
    assert_params_equal(keyword, example_way)


def test_the_example_runs_to_its_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python examples/lightning_multitask.py --plot run.png`` as a user runs it: train,
    checkpoint, resume, print the statistics, save the plot (``--manual`` takes the
    manual path the tests above run)."""
    png = tmp_path / "run.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and checkpoint folders
        example.main(str(png))
    printed = capsys.readouterr().out
    assert "resumed to step 12" in printed
    log_vars = [line for line in printed.splitlines() if line.startswith("uncertainty log-variances:")]
    assert len(log_vars) == 1 and log_vars[0].count(",") == len(example.TASKS) - 1
    assert png.stat().st_size > 0
