"""Stateful fault suite: a hypothesis ``RuleBasedStateMachine`` that trains like a user.

The configuration is drawn from every registered surgery and weighting (so a method
joins by registering) x preconditioning x granularity x gradient mode x representation
mode x inner optimizer x explicit / automatic partition x ``task_lr``, on a tiny MLP or
Conv1d trunk with 1-4 heads. Rules are what a training loop does: step, accumulate
micro-batches, step with a fault (NaN / inf loss or input, a zeroed head, a loss of
exactly 0, identical tasks, a loss-scale spike), step with some tasks absent from the
batch, checkpoint and restore into a fresh optimizer (continued side by side with the
original), ``epoch_end``, change the learning rate. Invariants are the README's promises:

- parameters stay finite;
- a skipped step leaves the parameters and the whole ``state_dict`` bitwise unchanged
  (but the skip counter), the first step included; a refused call (documented
  ``ValueError`` / ``TypeError``) changes nothing;
- an ordinary step (finite losses and gradients of moderate size) is never skipped, so
  one fault never makes every later step fail;
- a restored run continues bitwise;
- ``last_stats`` holds finite numbers;
- ``.grad`` (read before the inner step) equals ``sum_i c_i w_i grad L_i`` per block
  from the reported coefficients and weights (parameter mode without preconditioning),
  the sum over the present tasks when some are absent; an absent task's own parameters
  get no ``.grad`` and do not move;
- a warning is given at most once per optimizer.

Profiles (``tests/conftest.py``, ``tests/profiles.py``): ``ci`` (derandomised) runs 100
programs of 12 steps, about 10 s of CPU time; ``HYPOTHESIS_PROFILE=thorough`` runs 5000
programs of 30 steps (``STATEFUL_EXAMPLES`` overrides the count).
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from faultkit import clone_state, params_equal, representation_step, round_trip, state_diff
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from models import FaultNet, build
from profiles import THOROUGH
from torch import Tensor

from multitask_optim import AGGREGATORS, WEIGHTINGS, MultiTaskOptimizer

# ---------------------------------------------------------------------- configuration
INNER: Dict[str, Callable[[List[Tensor]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2),
}

#: Hyper-parameters for the registered weightings that cannot be built with defaults
#: (drawn: the values are part of the configuration). Every other method is built
#: with its defaults.
WEIGHTING_KWARGS: Dict[str, Callable[[int], st.SearchStrategy[Dict[str, Any]]]] = {
    "static": lambda k: st.fixed_dictionaries(
        {"weights": st.lists(st.sampled_from([1.0, 0.5, 3.0, 0.0, 1e-42]), min_size=k, max_size=k)}
    ),
    "staged": lambda k: st.fixed_dictionaries(
        {"start_steps": st.lists(st.integers(0, 3), min_size=k, max_size=k), "ramp_steps": st.integers(0, 2)}
    ),
    "htw": lambda k: st.fixed_dictionaries({"total_steps": st.integers(2, 12)}),
}

#: Code-path variants of registered surgeries whose defaults leave a path untried (MGDA's
#: gradient normalisations rescale rows, which is where tiny weights lose precision).
#: A method not listed here is built with its defaults.
SURGERY_VARIANTS: Dict[str, List[Dict[str, Any]]] = {
    "mgda": [{}, {"normalization": "l2"}, {"normalization": "loss"}, {"normalization": "loss+"}],
}

FAULTS = ("nan_loss", "inf_loss", "nan_input", "inf_input", "zero_head", "zero_loss", "identical", "spike")
SPIKES = (1e-30, 1e-20, 1e-12, 1e-3, 1e3, 1e12, 1e20, 1e25, 1e30)
#: An ordinary step: finite losses and every per-task gradient at most this large in
#: magnitude (and, with per-task preconditioning, small enough that g^2 cannot overflow
#: float32). Such a step must be taken.
ORDINARY = 1e30
ORDINARY_PRECONDITIONED = 1e17
#: Relative tolerance of the ``.grad`` identity (float32).
GRAD_RTOL = 1e-4


@dataclass
class Config:
    """One drawn configuration of model and optimizer."""

    trunk: str
    num_tasks: int
    inner: str
    surgery: str
    surgery_kwargs: Dict[str, Any]
    weighting: str
    weighting_kwargs: Dict[str, Any]
    precondition: Optional[str]
    granularity: str  # "global" | "tensor" | "layer"
    gradient_mode: str
    representation: bool
    explicit: bool
    task_lr: bool
    declare_tasks: bool
    seed: int


@st.composite
def configs(draw: st.DrawFn) -> Config:
    """A configuration over every registered surgery and weighting."""
    k = draw(st.integers(1, 4))
    weighting = draw(st.sampled_from(sorted(WEIGHTINGS)))
    try:
        WEIGHTINGS[weighting]()
        kwargs: Dict[str, Any] = {}
    except TypeError:
        assert weighting in WEIGHTING_KWARGS, f"weighting {weighting!r} needs arguments: add it to the table"
        kwargs = draw(WEIGHTING_KWARGS[weighting](k))
    representation = draw(st.booleans())
    surgery = draw(st.sampled_from(sorted(AGGREGATORS)))
    return Config(
        trunk=draw(st.sampled_from(["mlp", "conv"])),
        num_tasks=k,
        inner=draw(st.sampled_from(sorted(INNER))),
        surgery=surgery,
        surgery_kwargs=draw(st.sampled_from(SURGERY_VARIANTS.get(surgery, [{}]))),
        weighting=weighting,
        weighting_kwargs=kwargs,
        # representation mode refuses preconditioning (documented): not drawn together
        precondition=None if representation else draw(st.sampled_from([None, "adagrad", "rmsprop", "adam"])),
        granularity=draw(st.sampled_from(["global", "tensor", "layer"])),
        gradient_mode=draw(st.sampled_from(["auto", "frontier", "lean", "native", "batched", "looped"])),
        representation=representation,
        explicit=draw(st.booleans()),
        task_lr=draw(st.booleans()),
        declare_tasks=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def make_optimizer(cfg: Config, model: FaultNet, seed: int) -> MultiTaskOptimizer:
    """The optimizer of ``cfg`` over ``model`` (raises what the constructor raises)."""
    params = list(model.parameters())
    kwargs: Dict[str, Any] = {
        "surgery": cfg.surgery,
        "surgery_kwargs": cfg.surgery_kwargs or None,
        "weighting": cfg.weighting,
        "weighting_kwargs": cfg.weighting_kwargs,
        "precondition": cfg.precondition,
        "gradient_mode": cfg.gradient_mode,
        "seed": seed,
    }
    if cfg.granularity == "layer":
        kwargs["granularity"] = [list(m.parameters()) for m in model.layers()]
    else:
        kwargs["granularity"] = cfg.granularity
    if cfg.explicit:
        kwargs["shared"] = list(model.trunk.parameters())
        kwargs["tasks"] = [list(h.parameters()) for h in model.heads]
    elif cfg.declare_tasks:
        kwargs["num_tasks"] = cfg.num_tasks
    if cfg.task_lr:
        kwargs["task_lr"] = [0.5 * (1 + i % 2) * 1e-2 for i in range(cfg.num_tasks)]
    return MultiTaskOptimizer(INNER[cfg.inner](params), **kwargs)


# ---------------------------------------------------------------------- one run
@dataclass
class Run:
    """A model, its optimizer and what the checks need to remember about them."""

    model: FaultNet
    opt: MultiTaskOptimizer
    warned: Counter = field(default_factory=Counter)
    captured: Dict[int, Optional[Tensor]] = field(default_factory=dict)

    def hook(self) -> None:
        """Record every model parameter's ``.grad`` just before the inner step."""

        def pre(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.captured = {
                id(p): None if p.grad is None else p.grad.detach().clone() for p in self.model.parameters()
            }

        self.opt.optimizer.register_step_pre_hook(pre)


@dataclass
class Outcome:
    """What one call did: ``"taken"``, ``"skipped"`` or ``"refused"``, and the evidence."""

    kind: str
    error: Optional[BaseException] = None
    ordinary: bool = False
    reference: Optional[List[List[Optional[Tensor]]]] = None  # per task, per model parameter
    representation: bool = False


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    return True


def build_losses(
    model: FaultNet, step: int, fault: Optional[str], task: int, scale: float
) -> Tuple[List[Tensor], Tensor]:
    """The losses (with ``fault`` injected on ``task``) and the representation."""
    x, targets = model.batch(step)
    if fault in ("nan_input", "inf_input"):
        x = x.clone()
        x[0, 0] = float("nan") if fault == "nan_input" else float("inf")
    z, outs = model.outputs(x)
    if fault == "zero_head":
        outs[task] = outs[task] * 0.0
    losses = [F.mse_loss(y, t) for y, t in zip(outs, targets)]
    if fault == "nan_loss":
        losses[task] = losses[task] * float("nan")
    elif fault == "inf_loss":
        losses[task] = losses[task] * float("inf")
    elif fault == "zero_loss":
        losses[task] = losses[task] * 0.0
    elif fault == "spike":
        losses[task] = losses[task] * scale
    elif fault == "identical" and len(losses) > 1:
        # task j gets task i's gradient exactly, without reaching task i's head
        j = (task + 1) % len(losses)
        (gz,) = torch.autograd.grad(losses[task], z, retain_graph=True)
        linear = (gz * z).sum()
        losses[j] = linear - linear.detach() + losses[task].detach() + 0.0 * outs[j].sum()
    return losses, z


def reference_gradients(model: FaultNet, losses: List[Tensor], z: Tensor) -> List[List[Optional[Tensor]]]:
    """Per task, the gradient of its loss w.r.t. every model parameter and then ``z``."""
    params = [*model.parameters(), z]
    out = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out.append([None if g is None else g.detach().clone() for g in grads])
    return out


def _largest(reference: List[List[Optional[Tensor]]]) -> float:
    peak = 0.0
    for row in reference:
        for g in row:
            if g is not None and g.numel():
                peak = max(peak, float(g.abs().max()))
    return peak


# ---------------------------------------------------------------------- observe mode
#: ``STATEFUL_OBSERVE=path``: instead of failing, record every broken invariant (tag,
#: example number, message, configuration) as a JSON line in ``path`` and end that
#: example's checks; used to count how many examples each cause needs.
OBSERVE = os.environ.get("STATEFUL_OBSERVE")
_EXAMPLES = [0]
#: ``STATEFUL_SUMMARY=path``: write the counts of a run (examples, calls by outcome, faults
#: injected) as JSON when the process exits, for reporting a long ``thorough`` run.
SUMMARY = os.environ.get("STATEFUL_SUMMARY")
_COUNTS: Dict[str, int] = {"examples": 0, "taken": 0, "skipped": 0, "refused": 0, "faults": 0}


def _write_summary() -> None:
    if SUMMARY:
        with open(SUMMARY, "w") as out:
            json.dump(dict(_COUNTS, examples=_EXAMPLES[0]), out)


atexit.register(_write_summary)


class _Stop(Exception):
    """Ends the current example in observe mode."""


def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """Skip the rule once the example has recorded a failure (observe mode)."""

    @functools.wraps(fn)
    def wrapper(self: FaultMachine, **kwargs: Any) -> None:
        if self.dead:
            return
        try:
            fn(self, **kwargs)
        except _Stop:
            self.dead = True

    return wrapper


# ---------------------------------------------------------------------- the machine
class FaultMachine(RuleBasedStateMachine):
    """Training-loop rules over one drawn configuration; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg: Optional[Config] = None
        self.runs: List[Run] = []
        self.step_index = 0
        self.dead = False
        self.trace: List[str] = []

    # ------------------------------------------------------------ set-up
    @initialize(
        cfg=configs(),
        first=st.sampled_from(
            [None, None, "step", "nan_loss", "nan_input", "inf_input", "zero_loss", "spike"]
        ),
        scale=st.sampled_from(SPIKES),
    )
    def setup(self, cfg: Config, first: Optional[str], scale: float) -> None:
        """Build the configuration; optionally take a first step, possibly faulty (the
        first step is where the partition, weighting and gradient path are set up)."""
        _EXAMPLES[0] += 1
        model = build(FaultNet, seed=cfg.seed, trunk=cfg.trunk, num_tasks=cfg.num_tasks)
        try:
            opt = make_optimizer(cfg, model, cfg.seed)
        except (ValueError, TypeError):
            # a documented refusal of the configuration (e.g. lean + preconditioning)
            assume(False)
            raise
        self.cfg = cfg
        run = Run(model, opt)
        run.hook()
        self.runs = [run]
        if first is not None:
            try:
                self._step(None if first == "step" else first, 0, scale)
            except _Stop:
                self.dead = True

    # ------------------------------------------------------------ rules
    @rule()
    @guarded
    def step(self) -> None:
        self._step(None, 0, 1.0)

    @rule(fault=st.sampled_from(FAULTS), task=st.integers(0, 3), scale=st.sampled_from(SPIKES))
    @guarded
    def step_with_fault(self, fault: str, task: int, scale: float) -> None:
        assert self.cfg is not None
        _COUNTS["faults"] += 1
        self._step(fault, task % self.cfg.num_tasks, scale)

    @rule(absent=st.sets(st.integers(0, 3), min_size=1, max_size=3))
    @guarded
    def step_with_absent_tasks(self, absent: set) -> None:
        """Some tasks missing from the batch (at least one stays; the rule is a plain step
        for K = 1). Refused (ValueError) while the partition is unknown or by a method that
        cannot run on a subset; then nothing may change."""
        assert self.cfg is not None
        k = self.cfg.num_tasks
        gone = tuple(sorted(i for i in absent if i < k))
        if len(gone) == k:
            gone = gone[1:]
        self._step(None, 0, 1.0, gone)

    @rule(
        micro=st.integers(2, 3),
        faulty=st.integers(-1, 2),
        fault=st.sampled_from(["nan_loss", "inf_input", "spike", "zero_head"]),
        scale=st.sampled_from(SPIKES),
    )
    @guarded
    def accumulate(self, micro: int, faulty: int, fault: str, scale: float) -> None:
        _COUNTS["faults"] += faulty >= 0
        self._accumulate(micro, faulty, fault, scale)

    @rule()
    @guarded
    def checkpoint_and_restore(self) -> None:
        """Save, load (weights_only) into a fresh optimizer; both runs continue side by side."""
        assert self.cfg is not None
        self.trace.append("checkpoint_and_restore()")
        main = self.runs[0]
        state = round_trip(main.opt.state_dict())
        model = copy.deepcopy(main.model)
        opt = make_optimizer(self.cfg, model, seed=self.cfg.seed + 1)
        try:
            opt.load_state_dict(state)
        except Exception as error:  # noqa: BLE001
            self._expect(
                False, "restore_raises", f"loading the checkpoint raised {type(error).__name__}: {error}"
            )
            raise
        diff = state_diff(opt.state_dict(), main.opt.state_dict())
        self._expect(
            diff is None, "restore_differs", f"restored state_dict differs from the saved one: {diff}"
        )
        twin = Run(model, opt)
        twin.hook()
        self.runs = [main, twin]

    @rule()
    @guarded
    def epoch_end(self) -> None:
        self.trace.append("epoch_end()")
        for run in self.runs:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run.opt.epoch_end()
            self._count_warnings(run, caught)
        self._check_twins()

    @rule(factor=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    @guarded
    def change_lr(self, factor: float) -> None:
        self.trace.append(f"change_lr({factor})")
        for run in self.runs:
            for group in run.opt.param_groups:
                group.setdefault("base_lr_for_test", group["lr"])
                group["lr"] = group["base_lr_for_test"] * factor
        self._check_twins()

    # ------------------------------------------------------------ invariants
    @invariant()
    @guarded
    def parameters_finite(self) -> None:
        for n, run in enumerate(self.runs):
            bad = [name for name, p in run.model.named_parameters() if not bool(torch.isfinite(p).all())]
            self._expect(not bad, "params_nonfinite", f"run {n}: parameters {bad} are not finite")

    @invariant()
    @guarded
    def warnings_do_not_repeat(self) -> None:
        for n, run in enumerate(self.runs):
            repeated = [m for m, c in run.warned.items() if c > 1]
            self._expect(not repeated, "warning_repeated", f"run {n}: repeated warnings {repeated}")

    # ------------------------------------------------------------ the work
    def _expect(self, ok: bool, tag: str, message: str) -> None:
        """Assert ``ok``; in observe mode record ``tag`` and end the example instead."""
        if ok:
            return
        if OBSERVE is None:
            raise AssertionError(message)
        record = {"example": _EXAMPLES[0], "tag": tag, "message": message[:600], "config": repr(self.cfg)}
        record["trace"] = self.trace[-12:]
        with open(OBSERVE, "a") as out:
            out.write(json.dumps(record) + "\n")
        raise _Stop()

    def _step(self, fault: Optional[str], task: int, scale: float, absent: Tuple[int, ...] = ()) -> None:
        assert self.cfg is not None
        self.trace.append(f"step(fault={fault}, task={task}, scale={scale:g}, absent={absent})")
        index = self.step_index
        self.step_index += 1
        outcomes = []
        for run in self.runs:
            losses, z = build_losses(run.model, index, fault, task, scale)
            rep = self.cfg.representation
            reference = reference_gradients(run.model, losses, z)
            given: List[Optional[Tensor]] = [None if i in absent else loss for i, loss in enumerate(losses)]

            def call(
                run: Run = run, losses: List[Optional[Tensor]] = given, z: Tensor = z, rep: bool = rep
            ) -> None:
                run.opt.zero_grad()
                if rep:
                    representation_step(run.opt, losses, z)
                else:
                    run.opt.step(losses)

            ordinary = all(bool(torch.isfinite(loss)) for loss in losses) and self._small(reference)
            outcomes.append(self._checked(run, call, reference, ordinary, rep, absent))
        self._check_twins(outcomes)

    def _accumulate(self, micro: int, faulty: int, fault: str, scale: float) -> None:
        self.trace.append(f"accumulate(micro={micro}, faulty={faulty}, fault={fault}, scale={scale:g})")
        index = self.step_index
        self.step_index += 1
        outcomes = []
        for run in self.runs:

            def call(run: Run = run) -> List[List[Optional[Tensor]]]:
                run.opt.zero_grad()
                total: List[List[Optional[Tensor]]] = []
                for m in range(micro):
                    losses, z = build_losses(
                        run.model, 1000 * index + m, fault if m == faulty else None, 0, scale
                    )
                    losses = [loss / micro for loss in losses]
                    ref = reference_gradients(run.model, losses, z)
                    total = ref if not total else [_add_rows(a, b) for a, b in zip(total, ref)]
                    run.opt.accumulate(losses)
                run.opt.step()
                return total

            outcomes.append(self._checked(run, call, None, None, False))
        self._check_twins(outcomes)

    def _small(self, reference: List[List[Optional[Tensor]]]) -> bool:
        assert self.cfg is not None
        limit = ORDINARY_PRECONDITIONED if self.cfg.precondition is not None else ORDINARY
        finite = all(g is None or bool(torch.isfinite(g).all()) for row in reference for g in row)
        return finite and _largest(reference) <= limit

    def _checked(
        self,
        run: Run,
        call: Callable[[], Any],
        reference: Optional[List[List[Optional[Tensor]]]],
        ordinary: Optional[bool],
        rep: bool,
        absent: Tuple[int, ...] = (),
    ) -> Outcome:
        """Run ``call`` on ``run`` and check the invariants of its outcome."""
        params_before = [p.detach().clone() for p in run.model.parameters()]
        state_before = clone_state(run.opt.state_dict())
        skipped_before = run.opt.skipped
        run.captured = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = call()
            except (ValueError, TypeError) as error:
                self._count_warnings(run, caught)
                diff = state_diff(run.opt.state_dict(), state_before)
                self._expect(
                    diff is None, "refused_trace", f"a refused call ({error}) changed the state_dict: {diff}"
                )
                self._expect(
                    params_equal(params_before, list(run.model.parameters())),
                    "refused_trace",
                    f"a refused call ({error}) changed the parameters",
                )
                _COUNTS["refused"] += 1
                return Outcome("refused", error)
            except Exception as error:  # noqa: BLE001 - anything else is a bug, recorded by tag
                self._expect(False, "crash", f"{type(error).__name__}: {error}")
                raise
        self._count_warnings(run, caught)
        if reference is None:  # accumulate: the summed micro-batch gradients
            reference = result
            ordinary = all(math.isfinite(v) for v in run.opt.last_stats.get("losses", [])) and self._small(
                reference
            )
        stats = run.opt.last_stats
        if stats.get("skipped_step", False):
            diff = state_diff(run.opt.state_dict(), state_before, ignore=("/multitask/skipped",))
            self._expect(diff is None, "skip_trace", f"a skipped step changed the state_dict: {diff}")
            self._expect(
                params_equal(params_before, list(run.model.parameters())),
                "skip_trace",
                "a skipped step moved parameters",
            )
            self._expect(
                run.opt.skipped == skipped_before + 1,
                "skip_count",
                "the skip counter did not move by one",
            )
            # a weighting may scale a moderate gradient past the dtype (HTW's loss ratio after a
            # spike): the weighted gradient is what must stay moderate
            weights = [abs(w) for w in stats.get("weights", [1.0]) if math.isfinite(w)] or [1.0]
            limit = ORDINARY_PRECONDITIONED if self.cfg is not None and self.cfg.precondition else ORDINARY
            ordinary = bool(ordinary) and max(weights) * max(1.0, _largest(reference)) <= limit
            self._expect(
                not ordinary,
                "ordinary_skipped",
                f"an ordinary step (finite losses {stats.get('losses')}, gradients at most "
                f"{_largest(reference):.3g}) was skipped: {stats}",
            )
            _COUNTS["skipped"] += 1
            return Outcome("skipped", ordinary=bool(ordinary))
        self._expect(_finite(stats), "stats_nonfinite", f"last_stats is not finite: {stats}")
        if absent:
            self._check_absent_untouched(run, params_before, absent)
        if not rep and self.cfg is not None and self.cfg.precondition is None:
            self._check_grad_identity(run, reference, absent)
        _COUNTS["taken"] += 1
        return Outcome("taken", ordinary=bool(ordinary), reference=reference, representation=rep)

    def _check_absent_untouched(self, run: Run, before: List[Tensor], absent: Tuple[int, ...]) -> None:
        """An absent task's own parameters get no ``.grad`` and keep their values."""
        partition = run.opt.partition
        if partition is None:
            return
        position = {id(p): n for n, p in enumerate(run.model.parameters())}
        for i in absent:
            for p in partition.tasks[i]:
                self._expect(
                    run.captured.get(id(p)) is None and torch.equal(p.detach(), before[position[id(p)]]),
                    "absent_touched",
                    f"task {i} was absent but its parameter {tuple(p.shape)} got a gradient or moved",
                )

    def _check_grad_identity(
        self, run: Run, reference: List[List[Optional[Tensor]]], absent: Tuple[int, ...] = ()
    ) -> None:
        """``.grad`` before the inner step = ``sum_i c_i w_i grad L_i`` per block (shared, when
        coefficients are reported), ``w_i grad L_i`` (task parameters of task i), over the
        present tasks."""
        assert self.cfg is not None
        stats = run.opt.last_stats
        partition = run.opt.partition
        if partition is None:
            return
        present = [i for i in range(len(partition.names)) if i not in absent]
        weights = stats["weights"]
        coefs = stats["block_coefficients"]
        params = list(run.model.parameters())
        position = {id(p): n for n, p in enumerate(params)}
        shared = list(partition.shared)
        blocks = self._blocks(run, shared)
        block_of = {id(p): b for b, block in enumerate(blocks) for p in block}
        expected: Dict[int, List[Tuple[float, int]]] = {}  # param -> [(factor, task)]
        # A row method whose update is not a combination of the rows (GradDrop, DB-MTL, ...)
        # reports no coefficients: only the task parameters' part of the identity applies.
        for p in shared if coefs is not None else []:
            b = block_of[id(p)]
            expected[id(p)] = [(float(coefs[b][n]) * float(weights[n]), i) for n, i in enumerate(present)]
        for n, i in enumerate(present):
            for p in partition.tasks[i]:
                expected[id(p)] = [(float(weights[n]), i)]
        for p in params:
            if id(p) not in expected:
                continue
            got = run.captured.get(id(p))
            terms = [
                (f, reference[i][position[id(p)]])
                for f, i in expected[id(p)]
                if reference[i][position[id(p)]] is not None
            ]
            want = torch.zeros(p.shape, dtype=torch.float64)
            scale = 0.0
            for f, g in terms:
                want = want + f * g.double()
                scale += abs(f) * float(g.double().norm())
            have = torch.zeros_like(want) if got is None else got.double()
            error = float((have - want).norm())
            floor = 1.5e-45 * math.sqrt(max(p.numel(), 1))  # float32 rounding of subnormals
            self._expect(
                error <= GRAD_RTOL * scale + floor,
                "grad_identity",
                f"parameter {tuple(p.shape)}: .grad differs from sum c_i w_i grad L_i by {error:.3g} "
                f"(scale {scale:.3g}); weights {weights}, coefficients {coefs}",
            )

    def _blocks(self, run: Run, shared: List[Tensor]) -> List[List[Tensor]]:
        assert self.cfg is not None
        if self.cfg.granularity == "global":
            return [shared]
        if self.cfg.granularity == "tensor":
            return [[p] for p in shared]
        ids = {id(p) for p in shared}
        blocks = [[p for p in m.parameters() if id(p) in ids] for m in run.model.layers()]
        return [b for b in blocks if b] or [[]]

    def _count_warnings(self, run: Run, caught: List[warnings.WarningMessage]) -> None:
        for w in caught:
            text = str(w.message)
            if text.startswith("MultiTaskOptimizer"):
                run.warned[text] += 1

    def _check_twins(self, outcomes: Optional[List[Outcome]] = None) -> None:
        """A restored run continues bitwise: same outcome, parameters and state."""
        if len(self.runs) < 2:
            return
        main, twin = self.runs
        if outcomes is not None:
            kinds = [o.kind for o in outcomes]
            self._expect(kinds[0] == kinds[1], "twin_differs", f"original and restored runs differ: {kinds}")
        self._expect(
            params_equal(list(main.model.parameters()), list(twin.model.parameters())),
            "twin_differs",
            "the restored run's parameters differ from the original's",
        )
        diff = state_diff(main.opt.state_dict(), twin.opt.state_dict())
        self._expect(diff is None, "twin_differs", f"the restored run's state_dict differs: {diff}")


def _add_rows(a: List[Optional[Tensor]], b: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    return [x if y is None else (y if x is None else x + y) for x, y in zip(a, b)]


FaultMachine.TestCase.settings = settings(
    settings.default,
    max_examples=int(os.environ.get("STATEFUL_EXAMPLES", 5000 if THOROUGH else 100)),
    stateful_step_count=30 if THOROUGH else 12,
    deadline=None,
)
TestFaults = FaultMachine.TestCase
