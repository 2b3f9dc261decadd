"""Steps with tasks missing from the batch (issue 14).

An absent task (left out of the mapping, or ``None`` in the sequence) takes no part in
the step: the step is the method on the present tasks, an absent task's head, its
moments in the inner optimizer, its preconditioning accumulator, the GradVac targets of
its pairs and its learnable weighting parameter stay bitwise as they were, and a run
with random task presence resumes bitwise from a checkpoint.
"""

from __future__ import annotations

import copy
import random
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from faultkit import round_trip, state_diff
from models import MultiHead
from torch import Tensor, nn

from multitask_optim import AGGREGATORS, MultiTaskOptimizer
from multitask_optim._components import merge_tasks, select_tasks
from multitask_optim.aggregators import Aggregator

K = 3


def model_of(k: int = K, seed: int = 0) -> MultiHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultiHead(k)


def losses_of(model: MultiHead, step: int, present: Optional[List[int]] = None) -> List[Optional[Tensor]]:
    g = torch.Generator().manual_seed(31 * step + 3)
    x = torch.randn(12, 6, generator=g)
    base = torch.randn(12, 2, generator=g) + 1.0
    outs = model(x)
    out: List[Optional[Tensor]] = []
    for i, y in enumerate(outs):
        target = (-1.0) ** i * base + 0.2 * torch.randn(12, 2, generator=g)
        out.append(F.mse_loss(y, target) if present is None or i in present else None)
    return out


def make(
    model: MultiHead, inner: str = "adam", heads: Optional[List[int]] = None, **kw
) -> MultiTaskOptimizer:
    heads = list(range(model.k)) if heads is None else heads
    params = list(model.trunk.parameters()) + [p for i in heads for p in model.heads[i].parameters()]
    opt = torch.optim.Adam(params, lr=1e-2) if inner == "adam" else torch.optim.SGD(params, lr=0.1)
    kw.setdefault("seed", 5)
    return MultiTaskOptimizer(
        opt,
        shared=list(model.trunk.parameters()),
        tasks={str(i): list(model.heads[i].parameters()) for i in heads},
        **kw,
    )


def params_of(module: nn.Module) -> List[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def inner_state(opt: MultiTaskOptimizer, module: nn.Module) -> List[Dict[str, Tensor]]:
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in module.parameters() if p in opt.state]


def same(a: List[Tensor], b: List[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------- the step is the method on the present tasks
@pytest.mark.parametrize("surgery", ["pcgrad", "mgda", "upgrad", None])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_a_step_without_one_task_equals_an_optimizer_over_the_present_tasks(surgery, inner) -> None:
    """For a stateless surgery the step with task 1 absent is the step of an optimizer
    that only knows tasks 0 and 2, on the same batch."""
    model = model_of()
    other = copy.deepcopy(model)
    opt = make(model, inner, surgery=surgery)
    ref = make(other, inner, heads=[0, 2], surgery=surgery)
    for step in range(4):
        losses = losses_of(model, step, [0, 2])
        opt.zero_grad()
        opt.step({"0": losses[0], "2": losses[2]})
        ref_losses = losses_of(other, step, [0, 2])
        ref.zero_grad()
        ref.step({"0": ref_losses[0], "2": ref_losses[2]})
        for a, b in zip(
            list(model.trunk.parameters())
            + list(model.heads[0].parameters())
            + list(model.heads[2].parameters()),
            list(other.trunk.parameters())
            + list(other.heads[0].parameters())
            + list(other.heads[2].parameters()),
        ):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert opt.last_stats["tasks"] == ["0", "2"]
        assert opt.last_stats["coefficients"] == pytest.approx(ref.last_stats["coefficients"], rel=1e-9)
    assert same(params_of(model.heads[1]), params_of(model_of().heads[1]))


def test_sequence_with_none_and_mapping_subset_are_the_same_step() -> None:
    a, b = model_of(), model_of()
    opt_a, opt_b = make(a, surgery="pcgrad"), make(b, surgery="pcgrad")
    la, lb = losses_of(a, 0, [0, 2]), losses_of(b, 0, [0, 2])
    opt_a.step(la)
    opt_b.step({"2": lb[2], "0": lb[0], "1": None})
    assert same(params_of(a), params_of(b))
    assert state_diff(opt_a.state_dict(), opt_b.state_dict()) is None


# ---------------------------------------------------------------------- absent state stays bitwise
@pytest.mark.parametrize("precondition", [None, "adam", "adagrad"])
def test_absent_task_state_is_left_bitwise(precondition) -> None:
    """Head, inner Adam moments, accumulator slice and GradVac targets of task 1's pairs."""
    model = model_of()
    opt = make(model, surgery="gradvac", precondition=precondition, weighting="uncertainty")
    for step in range(3):  # every task present: all state moves
        opt.zero_grad()
        opt.step(losses_of(model, step))
    head = params_of(model.heads[1])
    moments = inner_state(opt, model.heads[1])
    targets = opt._states["surgery"]["targets"].clone()
    pre = {k: v.clone() for k, v in opt._states["precondition"].items()}
    s1 = opt.weighting.parameters()[1]
    s1_value, s1_state = s1.detach().clone(), {k: v.clone() for k, v in opt.state[s1].items()}
    s0 = opt.weighting.log_var[0].clone()
    for step in range(3, 6):
        opt.zero_grad(set_to_none=False)  # zeros in .grad must not make the inner step touch task 1
        opt.step(losses_of(model, step, [0, 2]))
    assert same(params_of(model.heads[1]), head)
    after = inner_state(opt, model.heads[1])
    assert all(same(list(x.values()), list(y.values())) for x, y in zip(after, moments))
    new_targets = opt._states["surgery"]["targets"]
    assert torch.equal(new_targets[:, 1, :], targets[:, 1, :]) and torch.equal(
        new_targets[:, :, 1], targets[:, :, 1]
    )
    assert not torch.equal(new_targets[:, 0, 2], targets[:, 0, 2])  # the present pair moved
    for key, value in pre.items():
        now = opt._states["precondition"][key]
        assert torch.equal(now[1], value[1]), key
        assert not torch.equal(now[0], value[0]), key
    assert torch.equal(s1.detach(), s1_value)
    assert same(list(opt.state[s1].values()), list(s1_state.values()))
    assert not torch.equal(opt.weighting.log_var[0], s0)  # a present task's s moved


def test_adam_preconditioner_bias_correction_counts_the_steps_a_task_was_present() -> None:
    model = model_of()
    opt = make(model, surgery="pcgrad", precondition="adam")
    presence = [[0, 1, 2], [0, 2], [0, 2], [1, 2]]
    for step, present in enumerate(presence):
        opt.zero_grad()
        opt.step(losses_of(model, step, present))
    counts = [v for k, v in opt._states["precondition"].items() if k.endswith(".step")]
    assert counts and all(c.tolist() == [3.0, 2.0, 4.0] for c in counts)


@pytest.mark.parametrize("weighting", ["uncertainty", "gradnorm"])
def test_learnable_weighting_parameter_of_an_absent_task_is_unchanged_under_adam(weighting) -> None:
    model = model_of()
    opt = make(model, surgery="pcgrad", weighting=weighting)
    for step in range(3):
        opt.zero_grad()
        opt.step(losses_of(model, step))
    params = opt.weighting.parameters()
    assert len(params) == K and all(p.shape == () for p in params)
    before = [p.detach().clone() for p in params]
    moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for step in range(3, 6):
        opt.zero_grad()
        opt.step(losses_of(model, step, [0, 2]))
        assert len(opt.last_stats["weights"]) == 2
    assert torch.equal(params[1].detach(), before[1])
    assert same(list(opt.state[params[1]].values()), list(moments[1].values()))
    assert not torch.equal(params[0].detach(), before[0])
    if weighting == "gradnorm":  # the present weights are renormalised so all K still sum to K
        assert float(sum(p.detach() for p in params)) == pytest.approx(K, rel=1e-5)


def test_loss_ratio_initial_loss_is_each_tasks_first_present_step() -> None:
    model = model_of()
    opt = make(model, surgery="pcgrad", weighting="htw", weighting_kwargs={"total_steps": 10, "main_task": 0})
    first = losses_of(model, 0, [0, 2])
    opt.step(first)
    state = opt._states["weighting"]
    assert state["initialized"].tolist() == [True, False, True]
    second = losses_of(model, 1)
    opt.zero_grad()
    opt.step(second)
    state = opt._states["weighting"]
    assert state["initialized"].tolist() == [True, True, True]
    assert float(state["initial_losses"][1]) == float(second[1].detach().double())
    assert float(state["initial_losses"][2]) == float(first[2].detach().double())


def test_dwa_gives_weight_one_to_a_task_without_two_epoch_means() -> None:
    model = model_of()
    opt = make(model, surgery=None, weighting="dwa", weighting_kwargs={"steps_per_epoch": 2})
    presence = [[0, 1], [0, 1], [0, 1], [0, 1], [0, 2], [0, 1, 2], [0, 1, 2]]
    for step, present in enumerate(presence):
        opt.zero_grad()
        opt.step(losses_of(model, step, present))
    # epochs 1, 2 had tasks 0 and 1; epoch 3 gave task 2 its first mean: only 0 and 1 are rated
    weights = opt.last_stats["weights"]
    assert weights[2] == 1.0
    assert weights[0] + weights[1] == pytest.approx(2.0, rel=1e-12) and weights[0] != 1.0
    assert opt._states["weighting"]["epochs_seen"].tolist() == [3, 3, 1]


# ---------------------------------------------------------------------- accumulation, errors, stats
def test_micro_batches_with_different_task_sets_sum_each_task_over_the_ones_that_had_it() -> None:
    model = model_of()
    other = copy.deepcopy(model)
    acc = make(model, "sgd", surgery="pcgrad")
    ref = make(other, "sgd", surgery="pcgrad")
    acc.zero_grad()
    acc.accumulate(losses_of(model, 0, [0, 1]))
    acc.accumulate(losses_of(model, 1, [1, 2]))
    acc.step()
    a, b = losses_of(other, 0, [0, 1]), losses_of(other, 1, [1, 2])
    ref.zero_grad()
    ref.step([a[0], a[1] + b[1], b[2]])  # each task's loss summed over the micro-batches that had it
    for x, y in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert acc.last_stats["tasks"] == ["0", "1", "2"]
    # float32 losses: the accumulator sums them in another order than ``a[1] + b[1]``
    assert acc.last_stats["losses"] == pytest.approx(ref.last_stats["losses"], rel=1e-6)


def test_a_step_with_no_task_is_an_error_that_changes_nothing() -> None:
    model = model_of()
    opt = make(model, surgery="gradvac")
    opt.step(losses_of(model, 0))
    before = round_trip(opt.state_dict())
    with pytest.raises(ValueError, match="no task is present"):
        opt.step([None, None, None])
    with pytest.raises(ValueError, match="no task is present"):
        opt.step({})
    assert state_diff(opt.state_dict(), before) is None


def test_absent_tasks_need_the_partition_first() -> None:
    model = model_of()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery="pcgrad", num_tasks=K)
    with pytest.raises(ValueError, match=r"absent.*partition is not known yet"):
        opt.step(losses_of(model, 0, [0, 2]))
    opt.step(losses_of(model, 0))  # discovered on a full step; then partial steps work
    opt.zero_grad()
    opt.step(losses_of(model, 1, [0, 2]))
    assert opt.last_stats["tasks"] == ["0", "2"]


class _Undeclared(Aggregator):
    """A stateful surgery that does not declare its task axes."""

    name = "undeclared_for_test"

    def init_state(self, num_tasks: int, num_blocks: int):
        return {"seen": torch.zeros(num_blocks, num_tasks, dtype=torch.float64)}

    def aggregate(self, gram, state, ctx):
        return torch.ones(gram.shape[0], gram.shape[1], dtype=torch.float64), {"seen": state["seen"] + 1}


def test_a_stateful_component_without_task_axes_is_refused_a_partial_step() -> None:
    model = model_of()
    opt = make(model, surgery=_Undeclared())
    opt.step(losses_of(model, 0))
    before = round_trip(opt.state_dict())
    with pytest.raises(ValueError, match=r"surgery 'undeclared_for_test'.*task_axes"):
        opt.step(losses_of(model, 1, [0, 2]))
    assert state_diff(opt.state_dict(), before) is None


def test_every_registered_stateful_surgery_declares_task_axes() -> None:
    for name, cls in AGGREGATORS.items():
        try:
            agg = cls()
        except TypeError:
            continue
        if agg.init_state(3, 2):
            assert agg.task_axes() is not None, name


def test_select_and_merge_round_trip() -> None:
    state = {"t": torch.arange(2 * 3 * 3, dtype=torch.float64).view(2, 3, 3), "n": torch.tensor(4)}
    axes = {"t": (1, 2)}
    sub = select_tasks(state, axes, [0, 2])
    assert sub["t"].shape == (2, 2, 2) and torch.equal(sub["n"], state["n"])
    new = {"t": -sub["t"], "n": state["n"] + 1}
    merged = merge_tasks(state, new, axes, [0, 2], 3, {})
    assert torch.equal(merged["t"][:, 1, :], state["t"][:, 1, :]) and torch.equal(
        merged["t"][:, :, 1], state["t"][:, :, 1]
    )
    assert torch.equal(merged["t"][:, 0, 2], -state["t"][:, 0, 2]) and int(merged["n"]) == 5
    assert torch.equal(state["t"], torch.arange(18, dtype=torch.float64).view(2, 3, 3))  # not mutated


# ---------------------------------------------------------------------- resume bitwise under random presence
@pytest.mark.parametrize(
    "config",
    [
        {"surgery": "gradvac", "precondition": "adam", "weighting": "uncertainty"},
        {"surgery": "nash_mtl", "weighting": "dwa", "weighting_kwargs": {"steps_per_epoch": 3}},
        {"surgery": "pcgrad", "weighting": "gradnorm", "surgery_every": 2},
        {
            "surgery": "pcgrad",
            "weighting": "htw",
            "weighting_kwargs": {"total_steps": 20},
            "max_grad_norm": 0.5,
        },
    ],
)
def test_resumed_run_with_random_task_presence_continues_bitwise(config) -> None:
    rng = random.Random(3)
    presence = [sorted(rng.sample(range(K), rng.randint(1, K))) for _ in range(12)]
    model = model_of()
    opt = make(model, **config)
    twin_model: Optional[MultiHead] = None
    twin: Optional[MultiTaskOptimizer] = None
    for step, present in enumerate(presence):
        if step == 6:
            twin_model = copy.deepcopy(model)
            twin = make(twin_model, **{**config, "seed": 99})
            twin.load_state_dict(round_trip(opt.state_dict()))
        for m, o in ((model, opt), (twin_model, twin)):
            if o is None:
                continue
            o.zero_grad()
            o.step(losses_of(m, step, present))
        if twin is not None:
            assert same(params_of(model), params_of(twin_model))
            assert state_diff(opt.state_dict(), twin.state_dict()) is None


# ---------------------------------------------------------------------- plain path
def test_plain_configuration_with_an_absent_task_is_the_sum_of_the_present_losses() -> None:
    model = model_of()
    other = copy.deepcopy(model)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery=None, num_tasks=K)
    inner = torch.optim.SGD(other.parameters(), lr=0.1)
    losses = losses_of(model, 0, [0, 2])
    opt.step(losses)
    ref = losses_of(other, 0, [0, 2])
    (ref[0] + ref[2]).backward()
    inner.step()
    assert same(params_of(model), params_of(other))
    assert opt.last_stats["tasks"] == ["0", "2"] and opt.last_stats["path"] == "plain"
