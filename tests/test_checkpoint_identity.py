"""A checkpoint loads only into an optimizer with the same tasks, in order, and the same partition.

Per-task state (a weighting's parameters and history, a surgery's per-pair targets, the
partition's task lists) is stored by task position, and per-block state by the order of
the shared parameters. A checkpoint whose task names are the same set in another order,
or whose partition differs while sharing as many parameters, would load every such
entry into the wrong task or block; both are refused with an error saying what differs,
and the refused load changes nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, List, Sequence

import pytest
import torch
from faultkit import round_trip, state_diff
from models import TrunkHeads, build

from multitask_optim import MultiTaskOptimizer

#: Runs on every available device (the CPU always, CUDA when present).
pytestmark = pytest.mark.devices

NAMES = ["depth", "label", "edges"]


def model() -> TrunkHeads:
    return build(TrunkHeads, seed=2, out_dims=(2, 3, 1))


def trained(names: Sequence[str], **kwargs: Any) -> MultiTaskOptimizer:
    """An optimizer over a fresh model after three steps whose per-task state differs by task."""
    m = model()
    opt = MultiTaskOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2), seed=1, **kwargs)
    for step in range(3):
        opt.zero_grad()
        losses = m.losses(m.batch(step))
        opt.step({name: (1.0 + 10.0 * i) * loss for i, (name, loss) in enumerate(zip(names, losses))})
    return opt


def test_the_same_task_names_in_another_order_are_refused_and_nothing_changes() -> None:
    src = trained(NAMES, task_names=NAMES, weighting="uncertainty", surgery="gradvac")
    saved = round_trip(src.state_dict())
    log_vars = saved["multitask"]["weighting_params"]
    assert len({round(float(v), 6) for v in log_vars}) == 3  # the per-task state tells the tasks apart
    m = model()
    reordered = [NAMES[1], NAMES[0], NAMES[2]]
    dst = MultiTaskOptimizer(
        torch.optim.Adam(m.parameters(), lr=1e-2),
        seed=1,
        task_names=reordered,
        weighting="uncertainty",
        surgery="gradvac",
    )
    before = round_trip(dst.state_dict())
    with pytest.raises(ValueError, match="same tasks in another order") as err:
        dst.load_state_dict(saved)
    assert str(NAMES) in str(err.value) and str(reordered) in str(err.value)
    assert state_diff(before, dst.state_dict()) is None
    assert dst.tasks == tuple(reordered)


def test_the_same_task_names_in_the_same_order_load() -> None:
    src = trained(NAMES, task_names=NAMES, weighting="uncertainty")
    m = model()
    dst = MultiTaskOptimizer(
        torch.optim.Adam(m.parameters(), lr=1e-2), seed=1, task_names=NAMES, weighting="uncertainty"
    )
    dst.load_state_dict(round_trip(src.state_dict()))
    assert state_diff(src.state_dict(), dst.state_dict()) is None


def trunk_and_heads(m: TrunkHeads) -> List[List[torch.Tensor]]:
    return [list(m.trunk.parameters())] + [list(h.parameters()) for h in m.heads]


def other_shared_set(m: TrunkHeads) -> List[List[torch.Tensor]]:
    """Four shared tensors, as in :func:`trunk_and_heads`, but not the same four."""
    first, last = m.trunk[0], m.trunk[2]
    shared = [first.weight, first.bias, last.weight, m.heads[0].bias]
    return [shared, [m.heads[0].weight], list(m.heads[1].parameters()), list(m.heads[2].parameters())]


def heads_swapped(m: TrunkHeads) -> List[List[torch.Tensor]]:
    """The same shared tensors; tasks 0 and 1 hold each other's head."""
    parts = trunk_and_heads(m)
    return [parts[0], parts[2], parts[1], parts[3]]


def shared_reordered(m: TrunkHeads) -> List[List[torch.Tensor]]:
    """The same shared tensors in another order (per-block state follows that order)."""
    parts = trunk_and_heads(m)
    return [parts[0][::-1], *parts[1:]]


@pytest.mark.parametrize("layout", [other_shared_set, heads_swapped, shared_reordered])
def test_a_partition_with_as_many_shared_parameters_but_not_the_same_is_refused(layout: Any) -> None:
    m = model()
    parts = trunk_and_heads(m)
    src = MultiTaskOptimizer(
        torch.optim.Adam(m.parameters(), lr=1e-2),
        shared=parts[0],
        tasks=parts[1:],
        surgery="gradvac",
        granularity="tensor",
    )
    for step in range(2):
        src.zero_grad()
        src.step(m.losses(m.batch(step)))
    saved = round_trip(src.state_dict())
    other = model()
    dst_parts = layout(other)
    assert len(dst_parts[0]) == len(saved["multitask"]["partition"]["shared"])
    with pytest.warns(UserWarning) if layout is other_shared_set else nullcontext():
        dst = MultiTaskOptimizer(
            torch.optim.Adam(other.parameters(), lr=1e-2),
            shared=dst_parts[0],
            tasks=dst_parts[1:],
            surgery="gradvac",
            granularity="tensor",
        )
    before = round_trip(dst.state_dict())
    with pytest.raises(ValueError, match="partition differs"):
        dst.load_state_dict(saved)
    assert state_diff(before, dst.state_dict()) is None
