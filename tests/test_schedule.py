"""Surgery on a schedule (issue 14): ``surgery_every=k``, ``surgery_start=n``.

Before step ``n`` and between the scheduled steps the step is the plain path (one
backward of the weighted sum, bitwise ``sum_i w_i L_i`` then the inner step); on the
scheduled steps the full method runs. Stateful surgeries and preconditioners update
only where they run; the weighting runs on every step.
"""

from __future__ import annotations

import copy
from typing import List, Optional

import pytest
import torch
from faultkit import round_trip, state_diff
from models import MultiHead, conflicting_losses, multihead
from torch import Tensor

from multitask_optim import MultiTaskOptimizer
from multitask_optim._schedule import Schedule

#: Runs on every available device (the CPU always, CUDA when present).
pytestmark = pytest.mark.devices

K = 3


def model_of(seed: int = 0) -> MultiHead:
    return multihead(K, seed)


def losses_of(model: MultiHead, step: int, scale: float = 1.0) -> List[Tensor]:
    return conflicting_losses(model, 17 * step + 1, scale)


def make(model: MultiHead, **kw) -> MultiTaskOptimizer:
    kw.setdefault("seed", 3)
    return MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), num_tasks=K, **kw)


def test_schedule_rule() -> None:
    assert [Schedule(3, 2).runs(s) for s in range(9)] == [
        False,
        False,
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert all(Schedule().runs(s) for s in range(5)) and Schedule().always
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="surgery_every"):
            MultiTaskOptimizer(torch.optim.SGD(model_of().parameters(), lr=0.1), surgery_every=bad)
    with pytest.raises(ValueError, match="surgery_start"):
        MultiTaskOptimizer(torch.optim.SGD(model_of().parameters(), lr=0.1), surgery_start=-1)


def test_last_stats_say_which_path_each_step_took() -> None:
    model = model_of()
    opt = make(model, surgery="pcgrad", surgery_every=3, surgery_start=2)
    paths = []
    for step in range(8):
        opt.zero_grad()
        opt.step(losses_of(model, step))
        paths.append(opt.last_stats["path"])
    assert paths == ["plain", "plain", "full", "plain", "plain", "full", "plain", "plain"]


@pytest.mark.parametrize("weighting", [None, "static"])
def test_a_plain_step_is_one_backward_of_the_weighted_sum_bitwise(weighting) -> None:
    weights = [0.5, 1.0, 2.0]
    model = model_of()
    other = copy.deepcopy(model)
    kw = {"weighting": weighting, "weighting_kwargs": {"weights": weights} if weighting else None}
    opt = make(model, surgery="gradvac", surgery_every=4, **kw)
    inner = torch.optim.Adam(other.parameters(), lr=1e-2)
    for step in range(4):
        if step % 4 == 0:  # the full step: run the twin by copying its outcome
            opt.zero_grad()
            opt.step(losses_of(model, step))
            other.load_state_dict(model.state_dict())
            inner.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))  # no shared moments
            continue
        opt.zero_grad()
        opt.step(losses_of(model, step))
        inner.zero_grad()
        ls = losses_of(other, step)
        total = sum(loss if not weighting or w == 1.0 else loss * w for loss, w in zip(ls, weights))
        total.backward()
        inner.step()
        for a, b in zip(model.parameters(), other.parameters()):
            assert torch.equal(a, b)
        assert opt.last_stats["path"] == "plain"


def test_stateful_surgery_and_preconditioner_update_only_on_scheduled_steps() -> None:
    model = model_of()
    opt = make(model, surgery="gradvac", precondition="adam", surgery_every=2)
    history = []
    for step in range(6):
        opt.zero_grad()
        opt.step(losses_of(model, step))
        surgery = opt._states["surgery"]["targets"].clone()
        pre = {k: v.clone() for k, v in opt._states["precondition"].items()}
        history.append((opt.last_stats["path"], surgery, pre, opt._generator.get_state().clone()))
    for (path, s, p, g), (_, s_prev, p_prev, g_prev) in zip(history[1:], history[:-1]):
        if path == "plain":
            assert torch.equal(s, s_prev) and torch.equal(g, g_prev)
            assert all(torch.equal(p[k], p_prev[k]) for k in p)
        else:
            assert not torch.equal(s, s_prev)
    steps = [v for k, v in opt._states["precondition"].items() if k.endswith(".step")]
    assert all(c.tolist() == [3.0] * K for c in steps)  # ran on steps 0, 2, 4


def test_weighting_runs_on_plain_steps_gradnorm_parameters_do_not_move() -> None:
    model = model_of()
    opt = make(
        model, surgery="pcgrad", weighting="dwa", weighting_kwargs={"steps_per_epoch": 100}, surgery_every=3
    )
    for step in range(5):
        opt.zero_grad()
        opt.step(losses_of(model, step))
    assert int(opt._states["weighting"]["epoch_count"]) == 5
    model = model_of()
    opt = make(model, surgery="pcgrad", weighting="gradnorm", surgery_every=2)
    for step in range(4):
        before = [p.detach().clone() for p in opt.weighting.parameters()]
        opt.zero_grad()
        opt.step(losses_of(model, step, scale=1.0 + step))
        moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, opt.weighting.parameters()))
        assert moved == (opt.last_stats["path"] == "full"), step


def test_uncertainty_parameters_train_on_plain_steps() -> None:
    model = model_of()
    opt = make(model, surgery="pcgrad", weighting="uncertainty", surgery_every=10, surgery_start=10)
    for step in range(3):
        opt.zero_grad()
        opt.step(losses_of(model, step))
    assert opt.last_stats["path"] == "plain"
    assert bool((opt.weighting.log_var != 0).all())


def test_a_non_finite_plain_step_is_skipped_with_nothing_written() -> None:
    model = model_of()
    opt = make(model, surgery="gradvac", weighting="dwa", surgery_every=2)
    opt.step(losses_of(model, 0))
    before = round_trip(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    losses = losses_of(model, 1)
    losses[1] = losses[1] * float("nan")
    opt.zero_grad()
    with pytest.warns(UserWarning, match="skipped"):
        opt.step(losses)
    assert opt.last_stats.get("skipped_step") and opt.skipped == 1
    assert state_diff(opt.state_dict(), before, ignore=("/multitask/skipped",)) is None
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    opt.zero_grad()
    opt.step(losses_of(model, 2))  # the schedule counts taken steps: step 1 again, plain
    assert opt.last_stats["path"] == "plain"


def test_accumulated_unscheduled_step_combines_with_the_weights_only() -> None:
    model = model_of()
    other = copy.deepcopy(model)
    acc = make(model, surgery="gradvac", precondition="adam", surgery_every=2, surgery_start=1)
    ref = torch.optim.Adam(other.parameters(), lr=1e-2)
    acc.zero_grad()
    for m in range(2):
        acc.accumulate([loss / 2 for loss in losses_of(model, m)])
    acc.step()
    assert acc.last_stats["path"] == "plain"
    ref.zero_grad()
    for m in range(2):
        (sum(losses_of(other, m)) / 2).backward()
    ref.step()
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert acc._states["precondition"] == {}  # neither the preconditioner nor GradVac ran
    assert not bool(acc._states["surgery"]["targets"].any())


def test_resume_on_a_schedule_continues_bitwise() -> None:
    model = model_of()
    opt = make(model, surgery="nash_mtl", precondition="rmsprop", surgery_every=3, surgery_start=1)
    twin_model: Optional[MultiHead] = None
    twin: Optional[MultiTaskOptimizer] = None
    for step in range(9):
        if step == 4:
            twin_model = copy.deepcopy(model)
            twin = make(
                twin_model, surgery="nash_mtl", precondition="rmsprop", surgery_every=3, surgery_start=1
            )
            twin.load_state_dict(round_trip(opt.state_dict()))
        for m, o in ((model, opt), (twin_model, twin)):
            if o is not None:
                o.zero_grad()
                o.step(losses_of(m, step))
        if twin is not None:
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))
            assert state_diff(opt.state_dict(), twin.state_dict()) is None
