"""One host synchronisation per step (issue 20): counted on the CPU, enforced on CUDA.

On the CPU there is nothing to wait for, so the test counts what *would* wait on an
accelerator: every call of ``Tensor.item / tolist / __bool__ / __float__ / __int__ /
__index__ / numpy / cpu / nonzero`` and ``torch.equal / allclose / is_nonzero`` made
during ``step`` (an SGD inner optimizer, which adds none), after warm-up. Calls made
inside the optimizer's host stage (:func:`multitask_optim._host.host_stage`: the
``K x K`` work on the values the step's one transfer brought back, and the components'
host state) are not device reads and are not counted; every counted read must also be
a declared one (:func:`multitask_optim._host.to_host`), which is what lets the CUDA
variant run the step under ``torch.cuda.set_sync_debug_mode("error")``.

Budgets: a Gram-based surgery with any weighting, and any preconditioner with weights
that do not depend on this step's losses: 1. Per-task preconditioning with weights that
do (they multiply the rows before the accumulators), a row method (it reads the losses
first and is not linear in the rows), and representation mode (its trunk update comes
after the coefficients): 2.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import torch
from conftest import DEVICES
from torch import nn

import multitask_optim._host as host
from multitask_optim import AGGREGATORS, WEIGHTINGS, MultiTaskOptimizer

TENSOR_METHODS = (
    "item",
    "tolist",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "numpy",
    "cpu",
    "nonzero",
)
TORCH_FUNCTIONS = ("equal", "allclose", "is_nonzero")

#: Weightings whose construction needs an argument.
WEIGHTING_KWARGS: Dict[str, Dict[str, Any]] = {
    "htw": {"total_steps": 20},
    "staged": {"start_steps": [0, 0, 0, 0]},
    "static": {"weights": [1.0, 2.0, 0.5, 1.5]},
    "dwa": {"steps_per_epoch": 3},
}
#: Weights that do not depend on the step's losses (known before it: a constant).
CONSTANT = {"equal"}


class Counter:
    """Counts the wrapped calls made outside the host stage while ``active``."""

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.active = False

    def wrap(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active and not host.in_host_stage():
                self.calls.append(name)
            return original(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        saved = {}
        for name in TENSOR_METHODS:
            saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
        for name in TORCH_FUNCTIONS:
            saved[(torch, name)] = getattr(torch, name)
        for (owner, name), original in saved.items():
            setattr(owner, name, self.wrap(original, name))
        self.active = True
        try:
            yield
        finally:
            self.active = False
            for (owner, name), original in saved.items():
                setattr(owner, name, original)


def _model(k: int, device: str) -> nn.ModuleDict:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(16, 2) for _ in range(k)])
    return nn.ModuleDict({"trunk": trunk, "heads": heads}).to(device)


def _reads(
    device: str, k: int = 4, representation: bool = False, steps: int = 4, **config: Any
) -> Dict[str, int]:
    """Host reads of the last of ``steps`` steps: counted calls and declared reads."""
    model = _model(k, device)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), seed=0, **config)
    generator = torch.Generator().manual_seed(1)
    counter = Counter()
    for step in range(steps):
        x = torch.randn(32, 8, generator=generator).to(device)
        y = torch.randn(k, 32, 2, generator=generator).to(device)
        z = model["trunk"](x)
        losses = [((h(z) - y[i] * (i + 1)) ** 2).mean() for i, h in enumerate(model["heads"])]
        opt.zero_grad()
        if step < steps - 1:
            opt.step(losses, representation=z if representation else None)
            continue
        declared = host.reads
        with counter.counting(), _sync_errors(device):
            opt.step(losses, representation=z if representation else None)
        return {"counted": len(counter.calls), "declared": host.reads - declared}
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _sync_errors(device: str) -> Iterator[None]:
    """On CUDA, every synchronisation but the declared reads raises."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _check(reads: Dict[str, int], budget: int, device: str) -> None:
    if device == "cpu":
        assert reads["counted"] <= budget, reads
        assert reads["counted"] == reads["declared"], reads  # every read is a declared one
    assert reads["declared"] <= budget, reads


GRAM_SURGERIES = sorted(name for name in AGGREGATORS if not AGGREGATORS.build(name, {}).needs_jacobian)
ROW_SURGERIES = sorted(name for name in AGGREGATORS if AGGREGATORS.build(name, {}).needs_jacobian)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("surgery", GRAM_SURGERIES)
def test_a_gram_surgery_step_reads_the_host_once(device: str, surgery: str) -> None:
    _check(_reads(device, surgery=surgery), 1, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", sorted(WEIGHTINGS))
def test_any_weighting_reads_the_host_once(device: str, weighting: str) -> None:
    kwargs = WEIGHTING_KWARGS.get(weighting, {})
    _check(_reads(device, weighting=weighting, weighting_kwargs=kwargs), 1, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precondition", ["adagrad", "rmsprop", "adam"])
@pytest.mark.parametrize("surgery", ["pcgrad", "mgda", "nash_mtl"])
def test_a_preconditioned_step_reads_the_host_once(device: str, precondition: str, surgery: str) -> None:
    _check(_reads(device, surgery=surgery, precondition=precondition), 1, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 16])
def test_the_count_does_not_grow_with_the_tasks(device: str, k: int) -> None:
    _check(_reads(device, k=k, surgery="gradvac", weighting="gls"), 1, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("surgery", ROW_SURGERIES)
@pytest.mark.parametrize("weighting", [None, "gls"])
def test_a_row_method_reads_the_host_at_most_twice(
    device: str, surgery: str, weighting: Optional[str]
) -> None:
    _check(_reads(device, surgery=surgery, weighting=weighting), 2, device)


@pytest.mark.parametrize("device", DEVICES)
def test_preconditioning_with_loss_dependent_weights_reads_twice(device: str) -> None:
    _check(_reads(device, precondition="adam", weighting="gls"), 2, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("surgery", ["mgda", "pcgrad"])
def test_representation_mode_reads_the_host_at_most_twice(device: str, surgery: str) -> None:
    _check(_reads(device, representation=True, surgery=surgery), 2, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", [None, "static", "gls"])
def test_the_plain_step_reads_the_host_once_or_twice(device: str, weighting: Optional[str]) -> None:
    """The plain sum (and a step the schedule leaves out): one read with the gradients;
    weights that depend on the losses multiply them before the backward: a read first."""
    kwargs = WEIGHTING_KWARGS.get(weighting or "", {})
    config = dict(surgery=None, weighting=weighting, weighting_kwargs=kwargs)
    _check(_reads(device, **config), 1, device)
    budget = 1 if weighting is None else 2
    _check(
        _reads(device, surgery="pcgrad", surgery_every=2, weighting=weighting, weighting_kwargs=kwargs),
        budget,
        device,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_clipping_adds_no_read(device: str) -> None:
    _check(_reads(device, surgery="pcgrad", max_grad_norm=0.1), 1, device)


def test_reading_last_stats_gives_the_same_values_as_before() -> None:
    """The statistics are built when read: same keys, plain Python values."""
    model = _model(3, "cpu")
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), seed=0, max_grad_norm=1.0)
    z = model["trunk"](torch.randn(8, 8))
    opt.step([h(z).square().mean() for h in model["heads"]])
    stats = dict(opt.last_stats)
    for key in (
        "cosine",
        "grad_norms",
        "conflicts",
        "weights",
        "losses",
        "coefficients",
        "objective",
        "grad_norm",
    ):
        assert key in stats, key
    assert isinstance(stats["grad_norm"], float) and isinstance(stats["objective"], float)
    assert all(isinstance(v, float) for v in stats["losses"])
