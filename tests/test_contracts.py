"""Contract suites over every registered component.

Parametrised over ``sorted(AGGREGATORS)`` and ``sorted(WEIGHTINGS)``: a method
registered later runs every test here with no new test code (the project design
(DESIGN.md, shared with the developers), section 2 "Stages and components" and
section 4). Components that cannot be built with their defaults take their arguments from the one table in
``tests/components.py``.

Aggregators (hypothesis, the derandomised ``ci`` profile, few examples):

- positive homogeneity of the update ``J^T c``: ``f(sJ) = s f(J)`` for ``s > 0``, unless
  the class declares ``homogeneous = False``;
- relabelling the tasks permutes the coefficients, for stateless methods that do not
  read ``ctx.generator`` (detected by running with two differently seeded generators);
- finite output on zero rows, rank-deficient rows and rows scaled by 1e-20 / 1e20;
- a state round trip (``torch.save`` / ``torch.load(weights_only=True)``) gives bitwise
  the same next output, and the state handed in is never mutated.

Weightings: finite ``(K,)`` weights, the state round trip, no mutation, a fresh state of
tensors only.

End to end (every aggregator without weighting, every weighting under PCGrad): a step
skipped for a NaN loss leaves the parameters and the whole ``state_dict`` bitwise
unchanged but for the skip count and reason (the first step included), and ``state_dict`` -> fresh optimizer ->
``load_state_dict`` continues bitwise.
"""

from __future__ import annotations

import functools
import warnings
from typing import List, Tuple

import pytest
import torch
from components import make_aggregator, make_weighting, seeded, task_names, weighting_kwargs
from faultkit import clone_state, params_equal, round_trip, state_diff
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from models import TrunkHeads, build, snapshot, twin
from profiles import examples
from torch import Tensor

from multitask_optim import AGGREGATORS, WEIGHTINGS, AggregationContext, MultiTaskOptimizer, WeightingContext
from multitask_optim.aggregators import RowAggregator
from multitask_optim.aggregators.base import SCALAR_LIMIT

AGGREGATOR_NAMES = sorted(AGGREGATORS)
WEIGHTING_NAMES = sorted(WEIGHTINGS)
FEW = settings(max_examples=examples(15))
#: The skip count and reason: the one entry of the state_dict a skipped step changes.
SKIP_RECORD = ("/multitask/skipped",)


# ---------------------------------------------------------------------- helpers
def _context(k: int, seed: int = 0, losses: Tensor | None = None, step: int = 0) -> AggregationContext:
    if losses is None:
        losses = torch.linspace(0.5, 2.0, k, dtype=torch.float64)
    return AggregationContext(seeded(seed), losses, step)


def _run(name: str, jac: Tensor, state=None, seed: int = 0, losses: Tensor | None = None):
    """``(update J^T c, coefficients, new_state)`` of aggregator ``name`` on one block."""
    agg = make_aggregator(name, jac.shape[0])
    k = jac.shape[0]
    assume(k >= agg.min_tasks())
    if state is None:
        state = agg.init_state(k, 1)
    gram = (jac @ jac.T).unsqueeze(0)
    if isinstance(agg, RowAggregator):  # reads the rows themselves
        updates, coefs, new_state = agg.aggregate_rows([jac], gram, state, _context(k, seed, losses))
        return updates[0], None if coefs is None else coefs[0], new_state
    coefs, new_state = agg(gram, state, _context(k, seed, losses))
    return coefs[0] @ jac, coefs[0], new_state


def _assert_close_update(got: Tensor, want: Tensor, jac: Tensor, what: str) -> None:
    """Equal up to 1e-6 of the Jacobian's scale (an update that cancels is rounding noise)."""
    scale = float(jac.abs().sum(dim=0).max())
    err = float((got - want).abs().max())
    assert err <= 1e-6 * scale, f"{what}: max |diff| {err:.3e}, scale {scale:.3e}"


def _conflicting_jacobians() -> List[Tensor]:
    """A few fixed K = 4 Jacobians with conflicting rows."""
    out = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        jac = torch.randn(4, 6, generator=g, dtype=torch.float64)
        jac[1] = -jac[0] + 0.3 * torch.randn(6, generator=g, dtype=torch.float64)
        out.append(jac)
    return out


@functools.cache
def _reads_generator(name: str) -> bool:
    """Whether the aggregator's output depends on ``ctx.generator`` (two seeds differ)."""
    for jac in _conflicting_jacobians():
        a, _, _ = _run(name, jac, seed=1)
        b, _, _ = _run(name, jac, seed=2)
        if not torch.equal(a, b):
            return True
    return False


def _stateless(name: str) -> bool:
    return not make_aggregator(name, 3).init_state(3, 1)


def _homogeneous(name: str) -> bool:
    return bool(getattr(AGGREGATORS[name], "homogeneous", True))


@st.composite
def jacobians(draw, min_tasks: int = 1, max_tasks: int = 6, max_dim: int = 12) -> Tensor:
    """A generic (full-rank, well scaled) ``K x P`` float64 Jacobian."""
    k = draw(st.integers(min_tasks, max_tasks))
    p = draw(st.integers(1, max_dim))
    seed = draw(st.integers(0, 2**31 - 1))
    jac = torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return jac * torch.logspace(-1, 1, k, dtype=torch.float64).view(k, 1)


@st.composite
def degenerate_jacobians(draw) -> Tensor:
    """Zero rows, duplicated / opposite / rank-deficient rows, scales 1e-20 and 1e20."""
    jac = draw(jacobians(min_tasks=2, max_tasks=6))
    k, p = jac.shape
    kind = draw(st.sampled_from(["zero", "rank1", "duplicate", "opposite", "tiny", "huge", "mixed"]))
    if kind == "zero":
        jac[draw(st.integers(0, k - 1))] = 0.0
    elif kind == "rank1":
        jac = torch.linspace(-2.0, 3.0, k, dtype=torch.float64).view(k, 1) * jac[:1]
    elif kind == "duplicate":
        jac[1] = jac[0]
    elif kind == "opposite":
        jac[1] = -jac[0]
    elif kind == "tiny":
        jac = jac * 1e-20
    elif kind == "huge":
        jac = jac * 1e20
    else:
        jac[0] = jac[0] * 1e-20
        jac[-1] = jac[-1] * 1e20
        if k > 2:
            jac[1] = 0.0
    return jac


# ---------------------------------------------------------------------- aggregators
@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
@FEW
@given(jac=jacobians(), scale=st.sampled_from([1e-3, 0.5, 3.0, 1e4]))
def test_aggregator_positive_homogeneity(name: str, jac: Tensor, scale: float) -> None:
    if not _homogeneous(name):
        pytest.skip(f"{name} declares homogeneous = False")
    if AGGREGATORS[name].breaks_ties_by_index:
        pytest.skip(
            f"{name} breaks exact ties by task index: scaling can move a tie (its own tests cover it)"
        )
    want, _, _ = _run(name, jac)
    got, _, _ = _run(name, scale * jac)
    _assert_close_update(got, scale * want, scale * jac, f"{name}: f({scale} J) != {scale} f(J)")


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
@FEW
@given(jac=jacobians(min_tasks=2), perm_seed=st.integers(0, 2**31 - 1))
def test_aggregator_relabelling_the_tasks(name: str, jac: Tensor, perm_seed: int) -> None:
    if not _stateless(name) or _reads_generator(name):
        pytest.skip(f"{name} is stateful or draws from ctx.generator (equal only in distribution)")
    if AGGREGATORS[name].breaks_ties_by_index:
        pytest.skip(f"{name} breaks exact ties by task index (its own tests relabel untied inputs)")
    k = jac.shape[0]
    perm = torch.randperm(k, generator=seeded(perm_seed))
    losses = torch.linspace(0.5, 2.0, k, dtype=torch.float64)
    want, _, _ = _run(name, jac, losses=losses)
    got, _, _ = _run(name, jac[perm], losses=losses[perm])
    _assert_close_update(got, want, jac, f"{name}: relabelled tasks {perm.tolist()}")


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
@FEW
@given(jac=degenerate_jacobians(), seed=st.integers(0, 1000))
def test_aggregator_finite_on_degenerate_rows(name: str, jac: Tensor, seed: int) -> None:
    update, coefs, state = _run(name, jac, seed=seed)
    assert coefs is None or bool(torch.isfinite(coefs).all()), f"{name}: coefficients {coefs.tolist()}"
    assert bool(torch.isfinite(update).all()), f"{name}: non-finite update"
    for key, value in state.items():
        assert bool(torch.isfinite(value).all()), f"{name}: state {key} not finite"


#: Just past the size where PCGrad and GradVac leave their scalar loop for the vectorised
#: one (``B * K > SCALAR_LIMIT`` with K = 3); every other method runs the same code per block.
MANY_BLOCKS = SCALAR_LIMIT // 3 + 2


@pytest.mark.parametrize("blocks", [2, MANY_BLOCKS], ids=["few-blocks", "many-blocks"])
@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
@FEW
@given(first=jacobians(min_tasks=3, max_tasks=3), second=jacobians(min_tasks=3, max_tasks=3))
def test_aggregator_state_round_trip_and_no_mutation(
    name: str, blocks: int, first: Tensor, second: Tensor
) -> None:
    """Few and many blocks: implementations may switch code paths with the problem size."""
    k = 3
    method = make_aggregator(name, 3)
    if isinstance(method, RowAggregator):  # row state is per parameter: keep the width of the first step
        width = first.shape[1]
        padded = torch.zeros(3, width, dtype=second.dtype)
        padded[:, : min(width, second.shape[1])] = second[:, :width]
        second = padded
    scales = torch.logspace(-1, 1, blocks, dtype=torch.float64)
    rows1 = [(first.flip(1) if b % 2 else first) * scales[b].sqrt() for b in range(blocks)]
    rows2 = [second * scales[blocks - 1 - b].sqrt() for b in range(blocks)]
    gram1 = torch.stack([r @ r.T for r in rows1])
    gram2 = torch.stack([r @ r.T for r in rows2])

    def agg(gram: Tensor, state: dict, ctx: AggregationContext):  # the method on (rows, Gram)
        if isinstance(method, RowAggregator):
            rows = rows1 if gram is gram1 else rows2
            updates, _, new_state = method.aggregate_rows(rows, gram, state, ctx)
            return torch.stack(updates), new_state
        return method(gram, state, ctx)

    state0 = method.init_state(k, blocks)
    assert all(isinstance(v, Tensor) for v in state0.values()), f"{name}: init_state holds a non-tensor"
    _, state1 = agg(gram1, state0, _context(k, 3))
    # the state handed in is never mutated
    kept = clone_state(state1)
    gram_kept = gram2.clone()
    generator = seeded(11)
    saved_generator = generator.get_state()
    coefs_a, state2_a = agg(
        gram2, state1, AggregationContext(generator, torch.ones(k, dtype=torch.float64), 1)
    )
    assert state_diff(state1, kept) is None, f"{name} mutated the state it was given"
    assert torch.equal(gram2, gram_kept), f"{name} mutated the Gram it was given"
    # the same next output from a state that went through torch.save / torch.load
    generator.set_state(saved_generator)
    restored = round_trip(kept)
    coefs_b, state2_b = agg(
        gram2, restored, AggregationContext(generator, torch.ones(k, dtype=torch.float64), 1)
    )
    assert state_diff(coefs_a, coefs_b) is None, f"{name}: coefficients differ after a state round trip"
    assert state_diff(state2_a, state2_b) is None, f"{name}: new state differs after a state round trip"
    assert all(isinstance(v, Tensor) for v in state2_a.values()), f"{name}: state holds a non-tensor"


# ---------------------------------------------------------------------- weightings
def _loss_sequence(k: int, steps: int = 6) -> List[Tensor]:
    g = seeded(5)
    return [torch.rand(k, generator=g, dtype=torch.float64) * 3.0 + 0.1 for _ in range(steps)]


def _weigh(weighting, losses: Tensor, state, step: int, seed: int) -> Tuple[Tensor, dict]:
    k = losses.shape[0]
    return weighting.compute(losses, state, WeightingContext(seeded(seed), step, task_names(k)))


@pytest.mark.parametrize("name", WEIGHTING_NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_weighting_contract(name: str, k: int) -> None:
    weighting = make_weighting(name, k)
    state = weighting.init_state(k)
    assert all(isinstance(v, Tensor) for v in state.values()), f"{name}: init_state holds a non-tensor"
    for step, losses in enumerate(_loss_sequence(k)):
        if step == 3:
            state = weighting.epoch_end(state)
        kept = clone_state(state)
        weights, new_state = _weigh(weighting, losses, state, step, seed=step)
        assert state_diff(state, kept) is None, f"{name}: compute mutated the state it was given"
        assert weights.shape == (k,), f"{name}: weights of shape {tuple(weights.shape)}"
        assert bool(torch.isfinite(weights).all()), f"{name}: weights {weights.tolist()}"
        assert all(isinstance(v, Tensor) for v in new_state.values()), f"{name}: state holds a non-tensor"
        # round trip: the same next output, bitwise
        again, again_state = _weigh(weighting, losses, round_trip(kept), step, seed=step)
        assert state_diff(weights, again) is None, f"{name}: weights differ after a state round trip"
        assert state_diff(new_state, again_state) is None, f"{name}: state differs after a round trip"
        state = new_state


# ---------------------------------------------------------------------- end to end
K = 3
END_TO_END = [(name, None) for name in AGGREGATOR_NAMES] + [("pcgrad", name) for name in WEIGHTING_NAMES]


def _model():
    return build(TrunkHeads, seed=3, out_dims=(2, 3, 1))


def _optimizer(model, surgery: str, weighting, seed: int = 17) -> MultiTaskOptimizer:
    return MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        surgery=surgery,
        weighting=weighting,
        weighting_kwargs=weighting_kwargs(weighting, K),
        num_tasks=K,
        seed=seed,
    )


def _step(model, opt: MultiTaskOptimizer, step: int, nan: bool = False) -> None:
    losses = model.losses(model.batch(step))
    if nan:
        losses[1] = losses[1] * float("nan")
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(losses)


@pytest.mark.parametrize(("surgery", "weighting"), END_TO_END, ids=[f"{s}-{w}" for s, w in END_TO_END])
def test_skipped_step_changes_nothing(surgery: str, weighting) -> None:
    model = _model()
    opt = _optimizer(model, surgery, weighting)
    for step in range(4):
        params, state = snapshot(model), clone_state(opt.state_dict())
        skipped = opt.skipped
        _step(model, opt, step, nan=True)  # the first step included
        assert opt.skipped == skipped + 1 and opt.last_stats.get("skipped_step")
        assert params_equal(snapshot(model), params), f"step {step}: parameters changed on a skip"
        found = state_diff(opt.state_dict(), state, ignore=SKIP_RECORD)
        assert found is None, f"step {step}: state_dict changed on a skip: {found}"
        assert opt.state_dict()["multitask"]["skipped"]["count"] == skipped + 1
        _step(model, opt, step)
        assert not opt.last_stats.get("skipped_step")


@pytest.mark.parametrize(("surgery", "weighting"), END_TO_END, ids=[f"{s}-{w}" for s, w in END_TO_END])
def test_restored_run_continues_bitwise(surgery: str, weighting) -> None:
    model = _model()
    opt = _optimizer(model, surgery, weighting)
    for step in range(3):
        _step(model, opt, step)
    resumed_model = twin(model)
    resumed = _optimizer(resumed_model, surgery, weighting, seed=99)
    resumed.load_state_dict(round_trip(opt.state_dict()))
    for step in range(3, 7):
        _step(model, opt, step)
        _step(resumed_model, resumed, step)
        assert params_equal(snapshot(resumed_model), snapshot(model)), f"step {step}: runs diverged"
    assert state_diff(resumed.state_dict(), opt.state_dict()) is None
