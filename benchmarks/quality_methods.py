"""The methods table of the training-quality benchmark.

Each :class:`Method` is one configuration of :class:`MultiTaskOptimizer` and carries its
own argument builder (``extra``): given a :class:`MethodContext` (the suite's tasks, the
first losses, the step budget, the method settings) it returns the constructor's
``surgery_kwargs`` / ``weighting_kwargs``. Adding a method is one row here; nothing
else dispatches on method names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class MethodSettings:
    """The methods' own hyper-parameters (recorded in the JSON)."""

    uncertainty_lr: float = 2e-2
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 2e-2
    dwa_temperature: float = 2.0
    htw_warmup: float = 0.1
    pe_ltr_bound: float = 0.2

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MethodContext:
    """What an argument builder may depend on.

    Attributes:
        num_tasks: K.
        kind: the suite's task kind (``"classification"`` / ``"regression"``), for uncertainty.
        first_losses: the task losses of the first batch at init (for static 1/L_i(0)).
        total_steps: the run's step budget (for HTW).
        last_shared: returns the last shared layer's parameters (GradNorm's ``W``).
        settings: the methods' hyper-parameters.
    """

    num_tasks: int
    settings: MethodSettings
    kind: str = "regression"
    first_losses: Sequence[float] = ()
    total_steps: int = 0
    last_shared: Optional[Callable[[], List[Tensor]]] = None


Builder = Callable[[MethodContext], Dict[str, Any]]


def _no_extra(ctx: MethodContext) -> Dict[str, Any]:
    return {}


def _pareto(ctx: MethodContext) -> Dict[str, Any]:
    return {"surgery_kwargs": {"lower_bounds": ctx.settings.pe_ltr_bound / ctx.num_tasks}}


def _static(ctx: MethodContext) -> Dict[str, Any]:
    inv = [1.0 / max(v, 1e-12) for v in ctx.first_losses]
    return {"weighting_kwargs": {"weights": [ctx.num_tasks * v / sum(inv) for v in inv]}}


def _uncertainty(ctx: MethodContext) -> Dict[str, Any]:
    return {"weighting_kwargs": {"kind": ctx.kind, "lr": ctx.settings.uncertainty_lr}}


def _stch(ctx: MethodContext) -> Dict[str, Any]:
    return {"weighting_kwargs": {"warmup_epochs": 1}}


def _dwa(ctx: MethodContext) -> Dict[str, Any]:
    return {"weighting_kwargs": {"temperature": ctx.settings.dwa_temperature}}


def _gradnorm(ctx: MethodContext) -> Dict[str, Any]:
    if ctx.last_shared is None:
        raise ValueError("GradNorm needs the model's last shared layer")
    s = ctx.settings
    return {"weighting_kwargs": {"alpha": s.gradnorm_alpha, "lr": s.gradnorm_lr, "layer": ctx.last_shared()}}


def _htw(ctx: MethodContext) -> Dict[str, Any]:
    return {
        "weighting_kwargs": {
            "main_task": 0,
            "total_steps": ctx.total_steps,
            "warmup": ctx.settings.htw_warmup,
        }
    }


def _rlw(ctx: MethodContext) -> Dict[str, Any]:
    return {"weighting_kwargs": {"scale": "sumK"}}


def _db_mtl_for_adam(ctx: MethodContext) -> Dict[str, Any]:
    """DB-MTL without its gradient EMA: the inner Adam keeps its own moving average."""
    return {"surgery_kwargs": {"beta": 0.0}}


def _moco_for_adam(ctx: MethodContext) -> Dict[str, Any]:
    """MoCo without gradient tracking (y = the current normalised gradient): the inner Adam averages."""
    return {"surgery_kwargs": {"beta": 1.0, "beta_sigma": 0.0}}


def _adam(params: Iterable[Tensor], lr: float, sgd_lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def _sgd_momentum(params: Iterable[Tensor], lr: float, sgd_lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=sgd_lr, momentum=0.9)


#: inner optimizers by name: ``(params, lr, sgd_lr) -> Optimizer``
INNERS: Dict[str, Callable[[Iterable[Tensor], float, float], torch.optim.Optimizer]] = {
    "adam": _adam,
    "sgd": _sgd_momentum,
}


@dataclass(frozen=True)
class Method:
    """One configuration of :class:`MultiTaskOptimizer`.

    Attributes:
        name: key used on the command line and in the JSON.
        label: human-readable description (the table's row label).
        surgery: ``surgery=`` argument.
        precondition: ``precondition=`` argument.
        weighting: ``weighting=`` argument.
        representation: step in representation mode (``step(losses, representation=z)``).
        inner: the inner optimizer, a key of :data:`INNERS`: ``"adam"`` (``Adam(lr)``) or
            ``"sgd"`` (``SGD(sgd_lr, momentum=0.9)``), with which per-task Adam
            preconditioning is exactly per-task Adam on the shared trunk (with an inner
            Adam a second, global normalisation follows it).
        extra: the argument builder: ``surgery_kwargs`` / ``weighting_kwargs`` for a context.
    """

    name: str
    label: str
    surgery: Optional[str] = None
    precondition: Optional[str] = None
    weighting: Optional[str] = None
    representation: bool = False
    inner: str = "adam"
    extra: Builder = _no_extra

    def optimizer_kwargs(self, ctx: MethodContext) -> Dict[str, Any]:
        """Keyword arguments of ``MultiTaskOptimizer`` (without the inner optimizer and seed)."""
        kwargs: Dict[str, Any] = {"surgery": self.surgery, "precondition": self.precondition}
        if self.weighting is not None:
            kwargs["weighting"] = self.weighting
        kwargs.update(self.extra(ctx))
        return kwargs

    def make_inner(self, params: Iterable[Tensor], lr: float, sgd_lr: float) -> torch.optim.Optimizer:
        return INNERS[self.inner](params, lr, sgd_lr)

    def options(self) -> Dict[str, Any]:
        """The options recorded in the JSON."""
        return {
            "surgery": self.surgery,
            "precondition": self.precondition,
            "weighting": self.weighting,
            "representation": self.representation,
        }

    @property
    def on_toy(self) -> bool:
        """Run on the CAGrad toy: no weighting (its losses are negative), parameter level, inner Adam."""
        return self.weighting is None and not self.representation and self.inner == "adam"


ALL_METHODS = (
    Method("equal", "equal weights (plain sum)"),
    Method("static", "static weights 1/L_i(0)", weighting="static", extra=_static),
    Method("uncertainty", "uncertainty (Kendall)", weighting="uncertainty", extra=_uncertainty),
    Method("dwa", "DWA", weighting="dwa", extra=_dwa),
    Method("gradnorm", "GradNorm", weighting="gradnorm", extra=_gradnorm),
    Method("mgda", "MGDA", surgery="mgda"),
    Method("mgda-ub", "MGDA-UB (representation)", surgery="mgda", representation=True),
    Method("pe-ltr", "PE-LTR (pareto)", surgery="pareto", extra=_pareto),
    Method("htw", "HTW", weighting="htw", extra=_htw),
    Method("pcgrad", "PCGrad", surgery="pcgrad"),
    Method("gradvac", "GradVac", surgery="gradvac"),
    Method("adam-pre", "per-task Adam precond.", precondition="adam"),
    Method("adam-pre+pcgrad", "per-task Adam + PCGrad", surgery="pcgrad", precondition="adam"),
    Method("adam-pre+gradvac", "per-task Adam + GradVac", surgery="gradvac", precondition="adam"),
    Method("adam-pre/sgd", "per-task Adam precond., inner SGD-m", precondition="adam", inner="sgd"),
    Method("rlw", "RLW (random weights)", weighting="rlw", extra=_rlw),
    Method(
        "uncertainty+pcgrad",
        "uncertainty + PCGrad",
        surgery="pcgrad",
        weighting="uncertainty",
        extra=_uncertainty,
    ),
    Method(
        "adam-pre/sgd+pcgrad",
        "per-task Adam + PCGrad, inner SGD-m",
        surgery="pcgrad",
        precondition="adam",
        inner="sgd",
    ),
    Method(
        "adam-pre/sgd+gradvac",
        "per-task Adam + GradVac, inner SGD-m",
        surgery="gradvac",
        precondition="adam",
        inner="sgd",
    ),
)
#: The second wave: every registered method that is defined for two tasks, with its
#: defaults (Krum and the trimmed mean are robust aggregation rules that need K >= 3).
WAVE2 = (
    Method("upgrad", "UPGrad", surgery="upgrad"),
    Method("dualproj", "DualProj", surgery="dualproj"),
    Method("cagrad", "CAGrad (c=0.4)", surgery="cagrad"),
    Method("imtl_g", "IMTL-G", surgery="imtl_g"),
    Method("imtl", "IMTL (IMTL-L + IMTL-G)", surgery="imtl_g", weighting="imtl_l"),
    Method("aligned_mtl", "Aligned-MTL", surgery="aligned_mtl"),
    Method("config", "ConFIG", surgery="config"),
    Method("nash_mtl", "Nash-MTL", surgery="nash_mtl"),
    Method("fairgrad", "FairGrad", surgery="fairgrad"),
    Method("graddrop", "GradDrop", surgery="graddrop"),
    Method("excess_mtl", "ExcessMTL", surgery="excess_mtl"),
    Method("db_mtl", "DB-MTL", surgery="db_mtl"),
    Method(
        "db_mtl-b0", "DB-MTL (beta=0: no gradient EMA, for Adam)", surgery="db_mtl", extra=_db_mtl_for_adam
    ),
    Method("moco", "MoCo", surgery="moco"),
    Method(
        "moco-b1", "MoCo (beta=1, beta_sigma=0: no tracking, for Adam)", surgery="moco", extra=_moco_for_adam
    ),
    Method("famo", "FAMO", weighting="famo"),
    Method("gls", "GLS", weighting="gls"),
    Method("imtl_l", "IMTL-L", weighting="imtl_l"),
    Method("stch", "STCH (1 warm-up epoch)", weighting="stch", extra=_stch),
)
ALL_METHODS = ALL_METHODS + WAVE2
METHODS: Dict[str, Method] = {m.name: m for m in ALL_METHODS}
DEFAULT_METHODS = tuple(m.name for m in ALL_METHODS[:15])
FULL_METHODS = tuple(METHODS)
#: Weightings are left out of the toy: its losses are negative (down to -20), where
#: loss-ratio weightings (DWA, GradNorm, HTW) are undefined and uncertainty diverges.
TOY_DEFAULT = ("equal", "mgda", "pcgrad", "gradvac", "adam-pre", "adam-pre+pcgrad")
TOY_FULL = ("equal", "mgda", "pe-ltr", "pcgrad", "gradvac", "adam-pre", "adam-pre+pcgrad", "adam-pre+gradvac")
TOY_ALLOWED = tuple(m.name for m in ALL_METHODS if m.on_toy)
