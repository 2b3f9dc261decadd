"""Representation mode's head path (dense rows or factored heads): measured, remembered, checkpointed.

Every timing here comes from a deterministic clock put in ``_engine.clock``; a path's
cost is charged to it by a wrapper, so no test depends on the machine's speed or load.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import multitask_optim._engine as engine
from multitask_optim import MultiTaskOptimizer
from multitask_optim._factors import head_gram
from multitask_optim._graph import analyse
from multitask_optim._representation import dense_rows, factored_is_cheaper, factored_rows, head_maps

K, OUT, N, D = 3, 2, 6, 4


class Net(nn.Module):
    def __init__(self, nonlinear: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, D), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(D, OUT) for _ in range(K))
        self.nonlinear = nonlinear

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        z = self.trunk(x)
        read = torch.sin(z) if self.nonlinear else z
        return z, [((h(read) - i) ** 2).mean() for i, h in enumerate(self.heads)]


def _batch(step: int) -> Tensor:
    return torch.randn(N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))


@pytest.fixture
def costs(monkeypatch: pytest.MonkeyPatch, engine_clock: Any) -> Dict[str, float]:
    """Measure at any size, on the tests' clock (``conftest.EngineClock``: every reading
    advances 1 ms); ``costs[path]`` ms are charged to every run of a path."""
    clock = engine_clock
    charged = {"factored": 0.0, "dense": 0.0}
    monkeypatch.setattr(engine, "HEADS_MEASURE_ABOVE", 0)

    def charging(path: str, run: Callable[..., object]) -> Callable[..., object]:
        def wrapped(*args: object) -> object:
            clock.charge(charged[path])
            return run(*args)

        return wrapped

    monkeypatch.setattr(engine, "factored_rows", charging("factored", factored_rows))
    monkeypatch.setattr(engine, "dense_rows", charging("dense", dense_rows))
    return charged


def _train(opt: MultiTaskOptimizer, model: Net, steps: range) -> List[dict]:
    stats = []
    for step in steps:
        z, losses = model(_batch(step))
        opt.zero_grad()
        opt.step(losses, representation=z)
        stats.append(dict(opt.last_stats))
    return stats


def _setup(mode: str = "auto", nonlinear: bool = False) -> Tuple[Net, MultiTaskOptimizer]:
    torch.manual_seed(0)
    model = Net(nonlinear).double()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), surgery="pcgrad", gradient_mode=mode, seed=0
    )
    return model, opt


@pytest.mark.parametrize("slow", ["factored", "dense"])
def test_auto_times_both_head_paths_and_keeps_the_faster(costs: Dict[str, float], slow: str) -> None:
    costs[slow] = 50.0
    fast = "dense" if slow == "factored" else "factored"
    model, opt = _setup()
    stats = _train(opt, model, range(engine.TRIALS))
    for s in stats:  # while measuring, the rule's path is used: factored at these sizes
        assert s["representation_path"] == "factored"
        assert set(s["representation_timings_ms"]) == {"factored", "dense"}
        assert s["representation_timings_ms"][slow] > s["representation_timings_ms"][fast]
    heads = opt.engine.heads
    assert heads.remembered() == fast and set(heads.measurements) == {"factored", "dense"}
    after = _train(opt, model, range(engine.TRIALS, engine.TRIALS + 2))
    assert [s["representation_path"] for s in after] == [fast, fast]
    assert all("representation_timings_ms" not in s for s in after)


def test_measuring_steps_do_not_depend_on_the_timings(costs: Dict[str, float]) -> None:
    runs = []
    for slow in ("factored", "dense"):
        costs.update({"factored": 0.0, "dense": 0.0, slow: 50.0})
        model, opt = _setup()
        _train(opt, model, range(engine.TRIALS))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_a_step_not_taken_leaves_no_measurement(costs: Dict[str, float]) -> None:
    costs["factored"] = 50.0
    heads = engine.HeadPaths(measure=True)
    torch.manual_seed(0)
    model = Net().double()
    tasks = [list(h.parameters()) for h in model.heads]

    def gather() -> None:
        z, losses = model(_batch(0))
        heads.rows(losses, z, tasks, analyse(losses))

    for _ in range(3):  # skipped or refused steps: forget
        gather()
        heads.forget()
    assert heads.remembered() is None and not heads._history
    for _ in range(engine.TRIALS):
        gather()
        assert heads.path == "factored" and heads.timings  # still measuring
        heads.commit()
    assert heads.remembered() == "dense"
    gather()
    assert heads.path == "dense" and not heads.timings


def test_the_checkpoint_records_the_head_path(costs: Dict[str, float]) -> None:
    costs["factored"] = 50.0
    model, opt = _setup()
    _train(opt, model, range(engine.TRIALS))
    saved = opt.state_dict()
    assert saved["multitask"]["representation_path"] == "dense"
    model2, opt2 = _setup()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    costs["dense"] = 100.0  # a restored choice is used, not measured again
    (stats,) = _train(opt2, model2, range(engine.TRIALS, engine.TRIALS + 1))
    assert stats["representation_path"] == "dense" and "representation_timings_ms" not in stats
    older = {
        **saved,
        "multitask": {k: v for k, v in saved["multitask"].items() if k != "representation_path"},
    }
    model3, opt3 = _setup()
    opt3.load_state_dict(older)  # a checkpoint from before the head path was recorded still loads
    assert opt3.engine.heads.remembered() is None


@pytest.mark.parametrize("mode", ["frontier", "looped", "lean"])
def test_explicit_gradient_modes_never_measure(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def no_clock() -> float:
        raise AssertionError("an explicit gradient_mode must not time anything")

    monkeypatch.setattr(engine, "clock", no_clock)
    monkeypatch.setattr(engine, "HEADS_MEASURE_ABOVE", 0)
    model, opt = _setup(mode)
    stats = _train(opt, model, range(3))
    assert [s["representation_path"] for s in stats] == ["factored"] * 3  # the rule's, at these sizes


def test_explicit_modes_follow_the_rule_and_lean_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "factored_is_cheaper", lambda *args: False)
    for mode, path in (("frontier", "dense"), ("lean", "factored")):
        model, opt = _setup(mode)
        assert _train(opt, model, range(1))[0]["representation_path"] == path


def test_heads_that_are_not_linear_maps_take_the_dense_rows(costs: Dict[str, float]) -> None:
    model, opt = _setup(nonlinear=True)
    stats = _train(opt, model, range(3))
    assert all(s["representation_path"] == "dense" and "representation_timings_ms" not in s for s in stats)


def test_small_steps_are_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "clock", lambda: pytest.fail("a step below HEADS_MEASURE_ABOVE was timed"))
    model, opt = _setup()
    assert _train(opt, model, range(2))[-1]["representation_path"] == "factored"


def _maps_of(n: int, d: int, k: int, out: int) -> Tuple[Tensor, list]:
    z = torch.randn(n, d, requires_grad=True)
    heads = [nn.Linear(d, out) for _ in range(k)]
    losses = [h(z).square().mean() for h in heads]
    return z, head_maps(losses, z, analyse(losses))


@pytest.mark.parametrize(
    ("n", "d", "k", "out", "factored"),
    [
        (256, 1024, 40, 1, True),  # the speed benchmark's MLP, one output per head
        (256, 1024, 40, 16, True),  # ... sixteen: the symmetric blocks make it the cheaper
        (256, 64, 2, 1000, False),  # two wide classifiers on narrow features
    ],
)
def test_the_rule_where_nothing_is_measured(n: int, d: int, k: int, out: int, factored: bool) -> None:
    with torch.device("meta"):
        z, maps = _maps_of(n, d, k, out)
    assert maps is not None and len(maps) == k
    assert factored_is_cheaper(k, z, maps) == factored


def test_head_gram_blocks_equal_the_whole_product(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    o, k = 11, 4
    deltas = torch.randn(7, o, dtype=torch.float64, generator=g)
    maps = torch.randn(9, o, dtype=torch.float64, generator=g)
    onehot = nn.functional.one_hot(torch.randint(0, k, (o,), generator=g), k).double()
    whole = onehot.T @ ((deltas.T @ deltas) * (maps.T @ maps)) @ onehot
    for block in (1, 2, 3, 5, 64):
        monkeypatch.setattr("multitask_optim._factors.HEAD_BLOCK", block)
        torch.testing.assert_close(head_gram(deltas, maps.T, onehot), whole, rtol=1e-12, atol=1e-12)


def test_the_factored_gram_in_float32_matches_the_float64_rows() -> None:
    torch.manual_seed(2)
    model = Net()
    z, losses = model(_batch(3).float())
    tasks = [list(h.parameters()) for h in model.heads]
    graph = analyse(losses)
    factored = factored_rows(losses, z, tasks, graph, head_maps(losses, z, graph))
    rows = dense_rows(losses, z, tasks, graph).shared[0].double().reshape(K, -1)
    torch.testing.assert_close(factored.grams([[0]], K)[0], rows @ rows.T, rtol=1e-5, atol=1e-7)
