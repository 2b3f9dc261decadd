"""Gradient accumulation: ``accumulate(losses / M)`` over M micro-batches, then ``step()``.

The per-task gradients (task and shared) and the loss values are summed over the
micro-batches and the aggregation (weighting, preconditioning, Gram, surgery) runs once,
so M equal micro-batches with their mean losses divided by M equal one step on the
concatenated batch with its mean losses. Checked in float64 for every surgery,
preconditioning, weighting and gradient path combination; plus bitwise resume after
accumulated steps, the errors, and a non-finite micro-batch skipping the whole step.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from models import MultiHead
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer

BATCH = 16
IN_DIM = 6
HIDDEN = 12


def build(k: int = 3, dtype: torch.dtype = torch.float64) -> MultiHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(321)
        return MultiHead(k, IN_DIM, HIDDEN).to(dtype)


def batch(step: int, k: int = 3, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, List[Tensor]]:
    g = torch.Generator().manual_seed(1009 * step + 17)
    x = torch.randn(BATCH, IN_DIM, generator=g, dtype=torch.float64)
    base = torch.randn(BATCH, 2, generator=g, dtype=torch.float64) + 1.0
    targets = [
        (-1.0) ** i * base * (1 + i) + 0.3 * torch.randn(BATCH, 2, generator=g, dtype=torch.float64)
        for i in range(k)
    ]
    return x.to(dtype), [t.to(dtype) for t in targets]


def losses_of(model: nn.Module, x: Tensor, targets: List[Tensor]) -> List[Tensor]:
    return [F.mse_loss(y, t) for y, t in zip(model(x), targets)]


def make_opt(
    model: nn.Module, surgery=None, precondition=None, weighting=None, mode="auto", **kw
) -> MultiTaskOptimizer:
    weighting_kwargs = {"steps_per_epoch": 1} if weighting == "dwa" else None
    return MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        surgery=surgery,
        precondition=precondition,
        weighting=weighting,
        weighting_kwargs=weighting_kwargs,
        gradient_mode=mode,
        num_tasks=model.k,
        seed=11,
        **kw,
    )


def whole_step(model: nn.Module, opt: MultiTaskOptimizer, step: int) -> None:
    x, targets = batch(step, model.k, next(model.parameters()).dtype)
    opt.zero_grad()
    opt.step(losses_of(model, x, targets))


def accumulated_step(model: nn.Module, opt: MultiTaskOptimizer, step: int, micro: int) -> None:
    x, targets = batch(step, model.k, next(model.parameters()).dtype)
    opt.zero_grad()
    for idx in torch.arange(BATCH).chunk(micro):
        assert len(idx) == BATCH // micro, "equal micro-batches: the mean of means is the mean"
        opt.accumulate([loss / micro for loss in losses_of(model, x[idx], [t[idx] for t in targets])])
    opt.step()


def assert_relative(a: nn.Module, b: nn.Module, rtol: float) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        err = float((p - q).detach().abs().max())
        scale = float(q.detach().abs().max())
        assert err <= rtol * scale, f"{name}: max |diff| {err:.3e}, scale {scale:.3e}"


def assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), f"{name} differs: max |diff| {(p - q).abs().max().item():.3e}"


def state_tensors(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """Every leaf of a nested state dict, keyed by its path."""
    if isinstance(obj, dict):
        out: Dict[str, Any] = {}
        for key, value in obj.items():
            out.update(state_tensors(value, f"{prefix}/{key}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for n, value in enumerate(obj):
            out.update(state_tensors(value, f"{prefix}/{n}"))
        return out
    return {prefix: obj.clone() if isinstance(obj, Tensor) else copy.deepcopy(obj)}


def assert_same_state(a: Dict[str, Any], b: Dict[str, Any], ignore: Tuple[str, ...] = ()) -> None:
    """Every leaf equal, but those at or below a path in ``ignore``."""
    assert a.keys() == b.keys()
    for key in a:
        if any(key == path or key.startswith(path + "/") for path in ignore):
            continue
        x, y = a[key], b[key]
        if isinstance(x, Tensor):
            assert torch.equal(x, y), f"state {key} changed"
        else:
            assert x == y, f"state {key} changed: {x!r} -> {y!r}"


CASES = [
    (surgery, precondition, weighting, mode)
    for surgery, precondition, weighting, mode in itertools.product(
        [None, "pcgrad", "gradvac"], [None, "adam"], [None, "uncertainty", "dwa"], ["frontier", "lean"]
    )
    if not (mode == "lean" and precondition is not None)  # lean keeps layers factored: no per-task access
]


@pytest.mark.parametrize("surgery,precondition,weighting,mode", CASES)
def test_accumulated_micro_batches_equal_one_step_on_the_concatenation(
    surgery, precondition, weighting, mode
):
    micro = 4
    ref = build()
    acc = copy.deepcopy(ref)
    ref_opt = make_opt(ref, surgery, precondition, weighting, mode)
    acc_opt = make_opt(acc, surgery, precondition, weighting, mode)
    conflicts = 0
    for step in range(5):
        whole_step(ref, ref_opt, step)
        accumulated_step(acc, acc_opt, step, micro)
        conflicts += ref_opt.last_stats["conflicts"]
        assert acc_opt.last_stats["losses"] == pytest.approx(ref_opt.last_stats["losses"], rel=1e-12)
        assert acc_opt.last_stats["weights"] == pytest.approx(ref_opt.last_stats["weights"], rel=1e-9)
        assert acc_opt.last_stats["coefficients"] == pytest.approx(
            ref_opt.last_stats["coefficients"], rel=1e-9
        )
    assert_relative(acc, ref, 1e-6)
    assert acc_opt.engine.mode == ref_opt.engine.mode
    if mode == "lean":
        assert acc_opt.engine.mode == "lean"
    assert acc_opt.state_dict()["multitask"]["steps"] == 5
    # the configuration is not vacuous
    assert conflicts > 0, "the tasks must conflict somewhere in the run"
    if weighting == "dwa":
        assert ref_opt.last_stats["weights"] != [1.0] * ref.k, "DWA must have moved off equal weights"
    if weighting == "uncertainty":
        s = ref_opt.weighting.log_var
        assert bool((s != 0).any()), "the log-variances must have been trained"
        torch.testing.assert_close(acc_opt.weighting.log_var, s, rtol=1e-6, atol=1e-12)
    if precondition is not None:
        a, b = (
            acc_opt.state_dict()["multitask"]["states"]["precondition"],
            ref_opt.state_dict()["multitask"]["states"]["precondition"],
        )
        assert a.keys() == b.keys() and a
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=0)
    if surgery == "gradvac":
        a, b = (
            acc_opt.state_dict()["multitask"]["states"]["surgery"],
            ref_opt.state_dict()["multitask"]["states"]["surgery"],
        )
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12)


def test_two_micro_batches_with_sgd_and_explicit_partition():
    """Another inner optimizer, K = 2 and an explicit partition; M = 2."""
    ref = build(k=2)
    acc = copy.deepcopy(ref)

    def opt_for(model):
        return MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            shared=model.trunk.parameters(),
            tasks=[h.parameters() for h in model.heads],
            surgery="pcgrad",
            seed=3,
        )

    ref_opt, acc_opt = opt_for(ref), opt_for(acc)
    for step in range(6):
        whole_step(ref, ref_opt, step)
        accumulated_step(acc, acc_opt, step, 2)
    assert_relative(acc, ref, 1e-6)


@pytest.mark.parametrize("surgery,precondition", [("gradvac", "adam"), ("pcgrad", None)])
def test_resume_bitwise_after_accumulated_steps(tmp_path, surgery, precondition):
    def run(model, opt, steps):
        for step in steps:
            accumulated_step(model, opt, step, 4)

    straight = build()
    opt = make_opt(straight, surgery, precondition, "uncertainty")
    run(straight, opt, range(6))

    model = build()
    opt = make_opt(model, surgery, precondition, "uncertainty")
    run(model, opt, range(3))
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    del opt, model

    resumed = build()
    resumed.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    opt = make_opt(resumed, surgery, precondition, "uncertainty")
    opt.load_state_dict(torch.load(tmp_path / "optim.pt", weights_only=True))
    run(resumed, opt, range(3, 6))
    assert_bitwise(resumed, straight)


def test_step_with_losses_while_micro_batches_are_pending_raises_and_changes_nothing():
    model = build()
    twin = copy.deepcopy(model)
    opt, twin_opt = make_opt(model, "gradvac", "adam"), make_opt(twin, "gradvac", "adam")
    x, targets = batch(0)
    opt.accumulate([loss / 2 for loss in losses_of(model, x[:8], [t[:8] for t in targets])])
    before = state_tensors(opt.state_dict())
    with pytest.raises(ValueError, match="accumulate"):
        opt.step(losses_of(model, x[8:], [t[8:] for t in targets]))
    assert_same_state(before, state_tensors(opt.state_dict()))
    # the pending micro-batch is still there: finishing the step equals the uninterrupted twin
    opt.accumulate([loss / 2 for loss in losses_of(model, x[8:], [t[8:] for t in targets])])
    opt.step()
    accumulated_step(twin, twin_opt, 0, 2)
    assert_bitwise(model, twin)


def test_features_with_accumulation_raises():
    model = build()
    opt = make_opt(model, "pcgrad")
    x, targets = batch(0)
    opt.accumulate([loss / 2 for loss in losses_of(model, x[:8], [t[:8] for t in targets])])
    z = model.trunk(x[8:])
    losses = [F.mse_loss(head(z), t[8:]) for head, t in zip(model.heads, targets)]
    with pytest.raises(ValueError, match="features"):
        opt.step(losses, representation=z)


def test_accumulate_with_other_task_names_raises():
    model = build()
    opt = make_opt(model, "pcgrad")
    x, targets = batch(0)
    opt.accumulate([loss / 2 for loss in losses_of(model, x[:8], [t[:8] for t in targets])])
    with pytest.raises(ValueError):
        opt.accumulate(losses_of(model, x[8:], [t[8:] for t in targets])[:2])


@pytest.mark.parametrize("where", ["first", "last"])
def test_non_finite_micro_batch_skips_the_whole_step(where):
    """A NaN loss in one micro-batch: the step is skipped with no state change, counted,
    and the run then equals one that never took that step."""
    model = build()
    opt = make_opt(model, "gradvac", "adam", "uncertainty")
    never = copy.deepcopy(model)
    never_opt = make_opt(never, "gradvac", "adam", "uncertainty")
    for step in range(2):
        accumulated_step(model, opt, step, 4)
        accumulated_step(never, never_opt, step, 4)

    before_params = [p.detach().clone() for p in model.parameters()]
    before = state_tensors(opt.state_dict())
    x, targets = batch(2)
    bad = 0 if where == "first" else 3
    opt.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n, idx in enumerate(torch.arange(BATCH).chunk(4)):
            losses = [loss / 4 for loss in losses_of(model, x[idx], [t[idx] for t in targets])]
            if n == bad:
                losses[1] = losses[1] * float("nan")
            opt.accumulate(losses)
        opt.step()
    assert any("skipped" in str(w.message) for w in caught)
    assert opt.last_stats["skipped"] == 1
    assert opt.last_stats.get("skipped_step") is True
    for p, q in zip(model.parameters(), before_params):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in model.parameters()), "a skipped step writes no .grad"
    assert_same_state(before, state_tensors(opt.state_dict()), ignore=("/multitask/skipped",))
    assert opt.skipped == 1

    # nothing is left pending: the next steps equal a run that never saw that batch
    for step in range(3, 5):
        accumulated_step(model, opt, step, 4)
        accumulated_step(never, never_opt, step, 4)
    assert_bitwise(model, never)


def test_non_finite_gradient_in_one_micro_batch_skips_the_step():
    """Finite losses, an infinite gradient (sqrt at 0) in one micro-batch."""
    model = build(k=2)
    opt = make_opt(model, "pcgrad")
    before = [p.detach().clone() for p in model.parameters()]
    x, targets = batch(0, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n, idx in enumerate(torch.arange(BATCH).chunk(2)):
            losses = [loss / 2 for loss in losses_of(model, x[idx], [t[idx] for t in targets])]
            if n == 1:
                losses[0] = losses[0] + torch.sqrt(model.heads[0].bias.sum() * 0.0)  # finite value, inf grad
            opt.accumulate(losses)
        opt.step()
    assert opt.last_stats["skipped"] == 1
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_step_without_losses_and_nothing_pending_is_the_inner_step():
    model = build(k=2)
    opt = make_opt(model, "pcgrad")
    ref = copy.deepcopy(model)
    inner = torch.optim.Adam(ref.parameters(), lr=1e-2)
    x, targets = batch(0, 2)
    for m, o in ((model, opt), (ref, inner)):
        o.zero_grad()
        sum(losses_of(m, x, targets)).backward()
        o.step()
    assert_bitwise(model, ref)
