"""The implementations the speed benchmark times: ours, textbook, TorchJD, LibMTL, pytorch_optimizer.

Each implementation is a setup function ``setup(model, inner) -> step(batch)``; ``step``
runs one FULL training step (forward, per-task gradients, aggregation, inner optimizer
step) on its own copy of the model. Anchors that are not importable are skipped with
the reason (:class:`Skip`).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import random
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor

from .baselines import textbook_pcgrad_step
from .workloads import Batch, MultiHeadModel

StepFn = Callable[[Batch], None]
InnerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


def adam(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class Skip(Exception):
    """An implementation cannot run here (anchor missing, option not supported yet)."""


@dataclass
class Impl:
    """One implementation under test.

    Attributes:
        name: row label.
        setup: builds ``step(batch)`` over a model and an inner-optimizer factory.
        check: raises :class:`Skip` (with the reason) when the implementation cannot run;
            it also imports whatever the implementation needs, so that a memory child can
            take its baseline after the imports.
        kinds: workloads the implementation is benchmarked on by default.
    """

    name: str
    setup: Callable[[MultiHeadModel, InnerFactory], StepFn]
    check: Callable[[], None] = lambda: None
    kinds: Sequence[str] = ("mlp",)


# ---------------------------------------------------------------------- floor, textbook
def setup_floor(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
    opt = inner(model.parameters())

    def step(batch: Batch) -> None:
        opt.zero_grad(set_to_none=True)
        sum(model.losses(batch)).backward()
        opt.step()

    return step


def setup_exact_floor(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
    """The exact per-task cost without any aggregation: one forward, then K plain backward
    passes (native kernels, each task's trunk gradient and its head's), summed into
    ``.grad``, and the inner step. What an exact parameter-level method cannot go below
    without batching kernels across tasks."""
    opt = inner(model.parameters())
    shared = model.shared_parameters()
    heads = model.head_parameters()

    def step(batch: Batch) -> None:
        opt.zero_grad(set_to_none=True)
        losses = model.losses(batch)
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, shared + heads[i], retain_graph=i < len(losses) - 1)
            for p, g in zip(shared + heads[i], grads):
                p.grad = g if p.grad is None else p.grad.add_(g)
        opt.step()

    return step


def setup_textbook_pcgrad(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
    return textbook_pcgrad_step(model, inner(model.parameters()), torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- ours
def check_ours() -> None:
    try:
        importlib.import_module("multitask_optim")
    except ImportError as error:  # pragma: no cover - the package is this repo
        raise Skip(f"multitask_optim is not importable: {error}") from error


def _ours(
    surgery: Optional[str], mode: str = "auto", representation: bool = False, every: int = 1
) -> Callable[..., StepFn]:
    def setup(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
        from multitask_optim import MultiTaskOptimizer

        opt = MultiTaskOptimizer(
            inner(model.parameters()), surgery=surgery, gradient_mode=mode, seed=0, surgery_every=every
        )

        def step(batch: Batch) -> None:
            opt.zero_grad(set_to_none=True)
            if representation:
                x, y = batch
                z = model.features(x)
                opt.step(model.task_losses(z, y), representation=z)
            else:
                opt.step(model.losses(batch))

        step.optimizer = opt  # type: ignore[attr-defined]
        return step

    return setup


def check_lean() -> None:
    check_ours()
    from multitask_optim import MultiTaskOptimizer

    probe = torch.zeros(1, requires_grad=True)
    try:
        MultiTaskOptimizer(torch.optim.SGD([probe], lr=0.0), gradient_mode="lean")
    except (ValueError, TypeError) as error:
        raise Skip(f"MultiTaskOptimizer does not accept gradient_mode='lean' yet ({error})") from error


# ---------------------------------------------------------------------- pytorch_optimizer
def check_pytorch_optimizer() -> None:
    try:
        module = importlib.import_module("pytorch_optimizer")
    except Exception as error:
        raise Skip(f"pytorch_optimizer is not importable: {error}") from error
    if not hasattr(module, "PCGrad"):
        raise Skip("pytorch_optimizer has no PCGrad")


def setup_pytorch_optimizer_pcgrad(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
    from pytorch_optimizer import PCGrad

    # reduction="sum" as in the paper (and ours); its default is "mean"
    opt = PCGrad(inner(model.parameters()), reduction="sum")

    def step(batch: Batch) -> None:
        opt.zero_grad()
        opt.pc_backward(model.losses(batch))
        opt.step()

    return step


# ---------------------------------------------------------------------- TorchJD
def check_torchjd() -> None:
    try:
        autojac = importlib.import_module("torchjd.autojac")
        aggregation = importlib.import_module("torchjd.aggregation")
        autogram = importlib.import_module("torchjd.autogram")
    except Exception as error:
        raise Skip(f"torchjd is not importable: {error}") from error
    for module, names in (
        (autojac, ("mtl_backward", "jac_to_grad")),
        (aggregation, ("PCGrad", "GradVac", "UPGrad", "PCGradWeighting")),
        (autogram, ("Engine",)),
    ):
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            raise Skip(f"{module.__name__} has no {missing} (this harness targets torchjd 0.18)")


def _torchjd_autojac(aggregator_name: str) -> Callable[..., StepFn]:
    def setup(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
        import torchjd.aggregation as aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = getattr(aggregation, aggregator_name)()
        opt = inner(model.parameters())
        shared = model.shared_parameters()
        heads = model.head_parameters()

        def step(batch: Batch) -> None:
            opt.zero_grad(set_to_none=True)
            x, y = batch
            z = model.features(x)
            losses = model.task_losses(z, y)
            # .jac on the shared params, .grad on each head; then aggregate .jac -> .grad
            mtl_backward(losses, features=z, tasks_params=heads, shared_params=shared)
            jac_to_grad(shared, aggregator)
            opt.step()

        return step

    return setup


def setup_torchjd_autogram_pcgrad(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
    from torchjd.aggregation import PCGradWeighting
    from torchjd.autogram import Engine

    # The Gramian is over the trunk's parameters only (the heads are per-task). The
    # losses are K scalars, not a batch of per-sample values: batch_dim=None.
    engine = Engine(model.trunk, batch_dim=None)
    weighting = PCGradWeighting()
    opt = inner(model.parameters())

    def step(batch: Batch) -> None:
        opt.zero_grad(set_to_none=True)
        losses = torch.stack(model.losses(batch))
        gramian = engine.compute_gramian(losses)
        weights = weighting(gramian)
        losses.backward(weights)  # = (losses @ weights).backward()
        opt.step()

    return step


# ---------------------------------------------------------------------- LibMTL
def load_libmtl_weighting(name: str) -> Any:
    """The LibMTL weighting class ``name`` (e.g. ``"PCGrad"``) without LibMTL/__init__.py.

    ``import LibMTL`` pulls in torchvision (its model zoo); the weighting classes only
    need torch and numpy. We register bare package modules for ``LibMTL`` and
    ``LibMTL.weighting`` (path only, their ``__init__`` not executed) and import the
    one submodule.
    """
    full = f"LibMTL.weighting.{name}"
    if full in sys.modules:
        return getattr(sys.modules[full], name)
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        raise Skip("LibMTL is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    for package, path in (("LibMTL", root), ("LibMTL.weighting", root / "weighting")):
        if package in sys.modules:
            continue
        module = types.ModuleType(package)
        module.__path__ = [str(path)]
        module.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        module.__spec__.submodule_search_locations = [str(path)]
        sys.modules[package] = module
    try:
        return getattr(importlib.import_module(full), name)
    except Exception as error:
        raise Skip(f"cannot load {full}: {error}") from error


def check_libmtl() -> None:
    load_libmtl_weighting("PCGrad")
    load_libmtl_weighting("GradVac")


def _libmtl(name: str, **kwargs: Any) -> Callable[..., StepFn]:
    def setup(model: MultiHeadModel, inner: InnerFactory) -> StepFn:
        cls = load_libmtl_weighting(name)
        weighting = cls()
        # What LibMTL's trainer model (AbsWeighting mixed into the architecture) provides.
        weighting.task_num = model.num_tasks
        weighting.device = next(model.parameters()).device
        weighting.rep_grad = False
        weighting.get_share_params = model.trunk.parameters
        # LibMTL calls encoder.zero_grad() and later writes param.grad.data; with
        # torch >= 2.0's set_to_none=True default the .grad would be None by then, so
        # zero in place (what torch < 2.0 did, which LibMTL 1.1.5 was written for).
        weighting.zero_grad_share_params = lambda: model.trunk.zero_grad(set_to_none=False)
        opt = inner(model.parameters())
        random.seed(0)  # LibMTL draws task orders from Python's global RNG

        def step(batch: Batch) -> None:
            opt.zero_grad(set_to_none=False)
            weighting.backward(model.losses(batch), **kwargs)
            opt.step()

        return step

    return setup


# ---------------------------------------------------------------------- the registry
MLP, CNN = ("mlp",), ("mlp", "cnn")
IMPLS: Dict[str, Impl] = {
    impl.name: impl
    for impl in [
        Impl("floor", setup_floor, kinds=CNN),
        Impl("textbook-pcgrad", setup_textbook_pcgrad),
        Impl("pytorch_optimizer-pcgrad", setup_pytorch_optimizer_pcgrad, check_pytorch_optimizer),
        Impl("torchjd-pcgrad", _torchjd_autojac("PCGrad"), check_torchjd, CNN),
        Impl("torchjd-gradvac", _torchjd_autojac("GradVac"), check_torchjd),
        Impl("torchjd-upgrad", _torchjd_autojac("UPGrad"), check_torchjd),
        Impl("torchjd-autogram-pcgrad", setup_torchjd_autogram_pcgrad, check_torchjd),
        Impl("libmtl-pcgrad", _libmtl("PCGrad"), check_libmtl),
        Impl("libmtl-gradvac", _libmtl("GradVac", beta=0.5), check_libmtl),
        Impl("ours-pcgrad", _ours("pcgrad"), check_ours, CNN),
        Impl("ours-pcgrad-frontier", _ours("pcgrad", "frontier"), check_ours),
        Impl("ours-pcgrad-batched", _ours("pcgrad", "batched"), check_ours, CNN),
        Impl("ours-pcgrad-looped", _ours("pcgrad", "looped"), check_ours, CNN),
        Impl("ours-pcgrad-native", _ours("pcgrad", "native"), check_ours, CNN),
        Impl("exact-floor", setup_exact_floor, kinds=()),
        Impl("ours-gradvac", _ours("gradvac"), check_ours),
        Impl("ours-upgrad", _ours("upgrad"), check_ours),
        Impl("ours-pcgrad-representation", _ours("pcgrad", representation=True), check_ours, CNN),
        Impl("ours-pcgrad-lean", _ours("pcgrad", "lean"), check_lean),
        Impl("ours-sum", _ours(None), check_ours, kinds=()),
        *[Impl(f"ours-pcgrad-every{k}", _ours("pcgrad", every=k), check_ours, kinds=()) for k in (2, 4, 8)],
    ]
}
#: the tiny workload: ours vs TorchJD with the same aggregator, ours without surgery vs the floor
TINY_IMPLS = ("floor", "ours-sum", "ours-pcgrad", "torchjd-pcgrad", "torchjd-upgrad")
#: surgery on a schedule (--schedule): PCGrad every k-th step, the other steps plain
SCHEDULE_IMPLS = ("floor", "ours-pcgrad", "ours-pcgrad-every2", "ours-pcgrad-every4", "ours-pcgrad-every8")
#: the K-scaling sweep: TorchJD both ways, the floor, ours by default, per explicit mode, and representation
SCALING_IMPLS = (
    "floor",
    "exact-floor",
    "torchjd-pcgrad",
    "torchjd-autogram-pcgrad",
    "ours-pcgrad",
    "ours-pcgrad-frontier",
    "ours-pcgrad-batched",
    "ours-pcgrad-looped",
    "ours-pcgrad-native",
    "ours-pcgrad-lean",
    "ours-pcgrad-representation",
)


def gradient_mode(step: StepFn) -> Optional[str]:
    opt = getattr(step, "optimizer", None)
    if opt is None:
        return None
    return opt.last_stats.get("gradient_mode")


def path_detail(step: StepFn) -> Optional[str]:
    """Which shared tensors took the factored linear rule and which Jacobian rows (in
    representation mode: which head path), and what ``gradient_mode="auto"`` measured
    (best-of-trials ms per path) when it chose."""
    opt = getattr(step, "optimizer", None)
    if opt is None:
        return None
    st = opt.last_stats
    if "representation_path" in st:
        text = f"{st['representation_path']} heads"
        measured = opt.engine.heads.measurements
        if measured:
            text += "; auto measured " + ", ".join(f"{m} {ms:.1f} ms" for m, ms in measured.items())
        return text
    if "factored_params" not in st:
        return None
    text = f"{st['factored_params']} tensors factored, {st['jacobian_params']} via Jacobian rows"
    measured = getattr(opt.engine, "measurements", None)
    if measured:
        text += "; auto measured " + ", ".join(f"{m} {ms:.0f} ms" for m, ms in measured.items())
    return text


def availability(names: Sequence[str]) -> Dict[str, Optional[str]]:
    """``{name: None}`` for runnable implementations, ``{name: reason}`` for skipped ones."""
    out: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            IMPLS[name].check()
            out[name] = None
        except Skip as why:
            out[name] = str(why)
    return out
