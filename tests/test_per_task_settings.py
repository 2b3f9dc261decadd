"""Per-task hyper-parameters follow absent tasks (issue 19, item 6).

A setting with one entry per task (a preference vector, PE-LTR's lower bounds,
GradDrop's leaks, static weights, staged start steps, uncertainty kinds) is read at the
present tasks on a step that lacks some: a step with task ``b`` absent equals the step
of an optimizer built for the present tasks only, with the present tasks' entries
(rescaled to the same total where the setting is a distribution over the tasks: the
preference vectors). Surgeries declare such settings in ``per_task`` and the pipeline
restricts them through ``Component.for_tasks``; weightings are bound to every task and
read their entries at ``ctx.indices``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from models import MultiHead, conflicting_losses, multihead
from torch import Tensor

from multitask_optim import AGGREGATORS, WEIGHTINGS, MultiTaskOptimizer

#: Runs on every available device (the CPU always, CUDA when present).
pytestmark = pytest.mark.devices

NAMES = ("a", "b", "c")
PRESENT = (0, 2)  # task "b" is absent
STEPS = 3


def rescaled(values: Sequence[float]) -> List[float]:
    """The present entries, times (sum of all) / (sum of the present ones)."""
    kept = [values[i] for i in PRESENT]
    return [v * sum(values) / sum(kept) for v in kept]


def sliced(values: Sequence[Any]) -> List[Any]:
    return [values[i] for i in PRESENT]


#: (registry, method, argument) -> (K entries, what a step without task "b" must use,
#: other constructor arguments)
CASES: Dict[Tuple[str, str, str], Tuple[List[Any], List[Any], Dict[str, Any]]] = {
    ("surgery", "upgrad", "pref_vector"): ([0.5, 0.2, 0.3], rescaled([0.5, 0.2, 0.3]), {}),
    ("surgery", "dualproj", "pref_vector"): ([0.5, 0.2, 0.3], rescaled([0.5, 0.2, 0.3]), {}),
    ("surgery", "config", "pref_vector"): ([2.0, 1.0, 0.5], rescaled([2.0, 1.0, 0.5]), {}),
    ("surgery", "aligned_mtl", "pref_vector"): ([0.6, 0.3, 0.1], rescaled([0.6, 0.3, 0.1]), {}),
    ("surgery", "pareto", "lower_bounds"): ([0.3, 0.2, 0.1], sliced([0.3, 0.2, 0.1]), {}),
    ("surgery", "graddrop", "leak"): ([0.2, 0.9, 0.5], sliced([0.2, 0.9, 0.5]), {}),
    ("weighting", "static", "weights"): ([0.5, 2.0, 1.5], sliced([0.5, 2.0, 1.5]), {}),
    ("weighting", "staged", "start_steps"): ([1, 0, 2], sliced([1, 0, 2]), {"ramp_steps": 2}),
    ("weighting", "uncertainty", "kind"): (
        ["regression", "classification", "classification"],
        sliced(["regression", "classification", "classification"]),
        {},
    ),
}

#: Arguments that accept a list but hold no per-task values.
NOT_PER_TASK = {("weighting", "gradnorm", "layer")}


def _accepts_k_entries(cls: type, arg: str, extra: Dict[str, Any]) -> bool:
    for value in ([0.2, 0.3, 0.1], [1, 2, 0], ["regression"] * 3):
        try:
            cls(**{arg: value}, **extra)
        except (TypeError, ValueError):
            continue
        return True
    return False


def test_every_setting_with_one_entry_per_task_is_covered() -> None:
    """Introspection over both registries: every constructor argument that takes a list of
    ``K`` entries is in :data:`CASES` (so it is tested below), and the surgeries that
    declare ``per_task`` are exactly the ones with such an argument."""
    found = set()
    for kind, registry in (("surgery", AGGREGATORS), ("weighting", WEIGHTINGS)):
        for name, cls in registry.items():
            extra = {"total_steps": 10} if name == "htw" else {}
            for arg in list(inspect.signature(cls.__init__).parameters)[1:]:
                if arg not in extra and _accepts_k_entries(cls, arg, extra):
                    found.add((kind, name, arg))
    assert found - NOT_PER_TASK == set(CASES)
    declared = {("surgery", name, arg) for name, cls in AGGREGATORS.items() for arg in cls.per_task}
    assert declared == {case for case in CASES if case[0] == "surgery"}


def _optimizer(model: MultiHead, heads: Sequence[int], kind: str, method: str, kwargs: Dict[str, Any]):
    params = list(model.trunk.parameters()) + [p for i in heads for p in model.heads[i].parameters()]
    return MultiTaskOptimizer(
        torch.optim.SGD(params, lr=0.05),
        shared=list(model.trunk.parameters()),
        tasks={NAMES[i]: list(model.heads[i].parameters()) for i in heads},
        surgery=method if kind == "surgery" else "upgrad",
        surgery_kwargs=kwargs if kind == "surgery" else None,
        weighting=method if kind == "weighting" else None,
        weighting_kwargs=kwargs if kind == "weighting" else None,
        seed=3,
    )


def _losses(model: MultiHead, step: int, present: Sequence[int]) -> Dict[str, Optional[Tensor]]:
    losses = conflicting_losses(model, seed=step)
    return {NAMES[i]: losses[i] for i in present}


@pytest.mark.parametrize("case", sorted(CASES), ids=["-".join(c[1:]) for c in sorted(CASES)])
def test_a_step_without_a_task_uses_the_present_tasks_entries(case: Tuple[str, str, str]) -> None:
    kind, method, arg = case
    entries, restricted, extra = CASES[case]
    whole = multihead(k=3, seed=1)
    direct = copy.deepcopy(whole)
    opt = _optimizer(whole, range(3), kind, method, {arg: entries, **extra})
    ref = _optimizer(direct, PRESENT, kind, method, {arg: restricted, **extra})
    for step in range(STEPS):
        opt.zero_grad()
        ref.zero_grad()
        opt.step(_losses(whole, step, PRESENT))
        ref.step(_losses(direct, step, PRESENT))
        assert opt.last_stats["weights"] == pytest.approx(ref.last_stats["weights"], rel=1e-6)
        if opt.last_stats["coefficients"] is not None:
            assert opt.last_stats["coefficients"] == pytest.approx(
                ref.last_stats["coefficients"], rel=1e-6, abs=1e-12
            )
    for i in PRESENT:
        for p, q in zip(whole.heads[i].parameters(), direct.heads[i].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(whole.trunk.parameters(), direct.trunk.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.last_stats["tasks"] == ["a", "c"]
    full_settings = opt.aggregator.settings() if kind == "surgery" else opt.weighting.settings()
    assert list(full_settings[arg]) == entries  # the optimizer keeps the full setting


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if c[0] == "surgery"], ids=lambda c: c[1])
def test_a_full_step_still_checks_the_number_of_entries(case: Tuple[str, str, str]) -> None:
    kind, method, arg = case
    entries, _, extra = CASES[case]
    model = multihead(k=3, seed=1)
    opt = _optimizer(model, range(3), kind, method, {arg: entries[:2], **extra})
    with pytest.raises(ValueError, match=arg):
        opt.step(_losses(model, 0, range(3)))


def test_for_tasks_leaves_the_component_alone() -> None:
    upgrad = AGGREGATORS["upgrad"](pref_vector=[0.5, 0.2, 0.3])
    part = upgrad.for_tasks(PRESENT, 3)
    assert part is not upgrad and part.pref_vector == pytest.approx((0.625, 0.375))
    assert upgrad.pref_vector == (0.5, 0.2, 0.3)
    assert upgrad.for_tasks((0, 1, 2), 3) is upgrad
    assert AGGREGATORS["upgrad"]().for_tasks(PRESENT, 3).pref_vector is None  # the default for K'
    assert AGGREGATORS["pareto"](lower_bounds=0.1).for_tasks(PRESENT, 3).lower_bounds == 0.1
