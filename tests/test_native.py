"""The native trunk walk (convolutions without vmap) and the measuring ``gradient_mode="auto"``.

- ``native`` equals the dense Jacobian (``batched``) and ``looped`` to 1e-6 on shared
  Conv1d / Conv2d / ConvTranspose2d layers with stride, padding, dilation and groups,
  with and without bias, ReLU + max-pool blocks (fused) and pools that cannot be fused,
  factored linear layers, custom autograd Functions and tasks in chunks;
- per-task preconditioning (element rows) works on it and equals ``looped``;
- ``auto`` on a step big enough to measure: the chosen path is one of the applicable
  ones, every applicable path was timed, results equal an explicit path's, a new
  signature is measured again, a skipped measuring step leaves no trace, and the
  choice survives a checkpoint (bitwise continuation).

No wall-clock time is read: ``auto`` times its paths on the tests' clock (``conftest.py``:
every path costs the same 1 ms unless a test fixes each path's cost), so which path wins
never depends on the machine or its load.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import multitask_optim._engine as engine
import multitask_optim._jacobian as jacobian
import multitask_optim._native as native
from multitask_optim import MultiTaskOptimizer
from multitask_optim._engine import GradientEngine
from multitask_optim._graph import analyse
from multitask_optim._jacobian import MODES


class Scale(torch.autograd.Function):
    """A custom Function inside the trunk (runs through ``node.apply`` in the native walk)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x * 1.5

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g * 1.5


class ConvNet(nn.Module):
    """A shared convolutional trunk and K linear heads (MSE against fixed targets)."""

    def __init__(self, trunk: nn.Module, dims: int, k: int = 3, width: int = 8) -> None:
        super().__init__()
        self.trunk = trunk
        self.dims = dims
        self.proj = nn.LazyLinear(width)
        self.heads = nn.ModuleList(nn.Linear(width, 2) for _ in range(k))

    def losses(self, x: Tensor) -> List[Tensor]:
        z = torch.tanh(self.proj(self.trunk(x).flatten(1)))
        g = torch.Generator().manual_seed(3)
        return [
            ((head(z) - torch.randn(x.shape[0], 2, generator=g, dtype=x.dtype)) ** 2).mean() * (1 + i)
            for i, head in enumerate(self.heads)
        ]


def conv2d_trunk() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # fused with the ReLU
        nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),  # overlapping windows, fused
        nn.Conv2d(8, 8, 1),
        nn.Tanh(),
    )


def conv1d_trunk() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 8, 3, dilation=2, groups=4),
        nn.AvgPool1d(2),
        nn.ReLU(),
    )


class Branches(nn.Module):
    """A ReLU output read by a pool *and* by another branch (not fusable), a transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.c3 = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.c1(x))
        pooled = F.max_pool2d(h, 2)
        up = Scale.apply(self.c2(pooled))
        return self.c3(torch.relu(up) + h)


CASES: Dict[str, Callable[[], ConvNet]] = {
    "conv2d": lambda: ConvNet(conv2d_trunk(), 2),
    "conv1d": lambda: ConvNet(conv1d_trunk(), 1),
    "branches": lambda: ConvNet(Branches(), 2),
}
INPUTS = {"conv2d": (5, 3, 12, 12), "conv1d": (5, 3, 40), "branches": (5, 3, 8, 8)}


def make(case: str, seed: int = 0) -> tuple[ConvNet, Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CASES[case]()
        x = torch.randn(*INPUTS[case])
        model.losses(x)  # materialise the lazy layer
    return model.double(), x.double()


def gradients(model: ConvNet, x: Tensor, mode: str, factored: bool = True):  # type: ignore[no-untyped-def]
    losses = model.losses(x)
    shared = list(model.trunk.parameters()) + list(model.proj.parameters())
    tasks = [list(h.parameters()) for h in model.heads]
    return GradientEngine(mode, factored=factored).compute(losses, analyse(losses), shared, tasks), shared


def assert_same(a, b, tol: float = 1e-6) -> None:  # type: ignore[no-untyped-def]
    da, db = a.dense(), b.dense()
    for x, y in zip(da.shared, db.shared):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=tol, atol=tol * float(y.abs().max()) + 1e-30)
    for ta, tb in zip(da.tasks, db.tasks):
        for x, y in zip(ta, tb):
            torch.testing.assert_close(x, y, rtol=tol, atol=1e-30)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("factored", [True, False])
def test_native_equals_the_dense_jacobian_and_looped(case: str, factored: bool) -> None:
    model, x = make(case)
    got, _ = gradients(model, x, "native", factored)
    dense, _ = gradients(model, x, "batched", factored)
    looped, _ = gradients(model, x, "looped", factored)
    assert_same(got, dense)
    assert_same(got, looped)


def test_native_keeps_the_projection_factored_and_conv_rows_exact() -> None:
    model, x = make("conv2d")
    got, shared = gradients(model, x, "native")
    factored = {pos for f in got.factors for pos in f.positions()}
    proj = {id(model.proj.weight), id(model.proj.bias)}
    assert {id(shared[pos]) for pos in factored} == proj  # N=5 rows < 8 * 3 * 3 inputs: cheaper
    conv = [n for n, p in enumerate(shared) if p.dim() == 4]
    assert all(got.shared[n] is not None for n in conv)


def test_relu_pool_fusion_is_used_where_it_applies() -> None:
    model, x = make("conv2d")
    losses = model.losses(x)
    graph = analyse(losses)
    shared = list(model.trunk.parameters()) + list(model.proj.parameters())
    index = {id(p): n for n, p in enumerate(shared)}
    useful = jacobian._useful_nodes(graph, index)
    order = [n for n in graph.order if useful.get(n, False)]
    assert len(native._fusable_pools(order, graph, useful)) == 2
    model_b, x_b = make("branches")
    losses = model_b.losses(x_b)
    graph = analyse(losses)
    shared = list(model_b.trunk.parameters()) + list(model_b.proj.parameters())
    useful = jacobian._useful_nodes(graph, {id(p): n for n, p in enumerate(shared)})
    order = [n for n in graph.order if useful.get(n, False)]
    assert native._fusable_pools(order, graph, useful) == {}  # the ReLU output has two readers


def test_chunked_tasks_equal_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = make("conv2d")
    whole, _ = gradients(model, x, "native")
    monkeypatch.setattr(native, "CHUNK_BYTES", 1)  # one task per chunk
    chunked, _ = gradients(model, x, "native")
    assert_same(chunked, whole, 1e-12)


@pytest.mark.parametrize("mode", ["frontier", "batched"])
def test_vmapped_paths_in_task_chunks_equal_one_chunk(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    model, x = make("conv2d")
    whole, _ = gradients(model, x, mode)
    monkeypatch.setattr(native, "VMAP_CHUNK_BYTES", 1)
    assert len(jacobian.task_chunks(analyse(model.losses(x)), 3)) == 3
    chunked, _ = gradients(model, x, mode)
    assert_same(chunked, whole, 1e-12)


def test_auto_does_not_measure_full_buffers_above_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "MEASURE_ABOVE", 0)
    monkeypatch.setattr(engine, "JACOBIAN_BUDGET", 0)
    model, x = make("conv2d")
    opt = train(model, x, "auto", steps=1)
    assert set(opt.last_stats["gradient_timings_ms"]) == {"lean", "frontier", "native"}


def train(model: ConvNet, x: Tensor, mode: str, steps: int = 3, **kw) -> MultiTaskOptimizer:  # type: ignore[no-untyped-def]
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), gradient_mode=mode, seed=1, **kw)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(model.losses(x))
    return opt


def assert_params_close(a: nn.Module, b: nn.Module, tol: float) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


@pytest.mark.parametrize("precondition", ["adam", None])
def test_preconditioning_on_the_native_path_equals_looped(precondition: Optional[str]) -> None:
    """Per-task preconditioning needs element rows: nothing stays factored, rows are dense."""
    model, x = make("conv2d")
    other = copy.deepcopy(model)
    opt = train(model, x, "native", precondition=precondition)
    train(other, x, "looped", precondition=precondition)
    assert opt.last_stats["factored_params"] == (0 if precondition else 2)
    assert_params_close(model, other, 1e-9)


# ---------------------------------------------------------------------- auto measures


@pytest.fixture
def measure_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measure even these tiny steps."""
    monkeypatch.setattr(engine, "MEASURE_ABOVE", 0)


@pytest.fixture
def path_costs(monkeypatch: pytest.MonkeyPatch, engine_clock) -> Dict[str, float]:  # type: ignore[no-untyped-def]
    """Fixed measurements: each path ``auto`` runs costs ``costs[mode]`` ms on the test clock."""
    costs: Dict[str, float] = {}
    real = engine.run_path

    def charged(mode: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(mode, *args, **kwargs)
        engine_clock.charge(costs.get(mode, 0.0))
        return result

    monkeypatch.setattr(engine, "run_path", charged)
    return costs


@pytest.mark.usefixtures("measure_all")
@pytest.mark.parametrize(
    "costs,second,chosen",
    [
        (
            {"lean": 9, "frontier": 4, "native": 3, "batched": 7, "looped": 20},
            {"frontier", "native"},
            "native",
        ),
        ({"lean": 1, "frontier": 2, "native": 5, "batched": 7, "looped": 20}, {"lean", "frontier"}, "lean"),
        # a single path within PRUNE x the best: kept without timing it again
        ({"lean": 0.5, "frontier": 4, "native": 3, "batched": 7, "looped": 20}, set(), "lean"),
        ({"lean": 9, "frontier": 9, "native": 9, "batched": 9, "looped": 5}, set(MODES), "looped"),
    ],
)
def test_auto_times_every_applicable_path_and_keeps_the_fastest(
    path_costs: Dict[str, float], costs: Dict[str, float], second: set, chosen: str
) -> None:
    """With fixed measurements (the test clock, never the wall clock): trial 1 times every
    path, trial 2 those within ``PRUNE`` times the best, then the fastest is kept."""
    path_costs.update(costs)
    model, x = make("conv2d")
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), seed=1)
    seen: List[Dict[str, float]] = []
    for _ in range(engine.TRIALS + 1):
        opt.zero_grad()
        opt.step(model.losses(x))
        seen.append(dict(opt.last_stats.get("gradient_timings_ms", {})))
    assert set(seen[0]) == set(MODES)  # trial 1: every path
    assert seen[0] == pytest.approx({m: costs[m] + 1.0 for m in MODES})  # the clock ticks 1 ms a reading
    assert set(seen[1]) == second  # trial 2: those within PRUNE x the best (if more than one)
    assert seen[2] == {}  # chosen: no more measuring
    assert opt.engine.mode == chosen
    if second:
        assert opt.engine.measurements == pytest.approx({m: costs[m] + 1.0 for m in MODES})
    assert opt.engine.confirmed and opt.state_dict()["multitask"]["gradient_mode"] == chosen
    assert opt.last_stats["gradient_mode"] == chosen


@pytest.mark.usefixtures("measure_all")
def test_auto_without_factoring_does_not_time_lean() -> None:
    model, x = make("conv2d")
    opt = train(model, x, "auto", steps=1, precondition="adam")
    assert set(opt.last_stats["gradient_timings_ms"]) == set(MODES) - {"lean"}


@pytest.mark.usefixtures("measure_all")
@pytest.mark.parametrize("surgery", ["pcgrad", "gradvac"])
def test_auto_results_equal_an_explicit_mode(surgery: str) -> None:
    model, x = make("conv2d")
    other = copy.deepcopy(model)
    train(model, x, "auto", steps=5, surgery=surgery)
    train(other, x, "looped", steps=5, surgery=surgery)
    assert_params_close(model, other, 1e-9)


@pytest.mark.usefixtures("measure_all")
def test_auto_measures_again_when_the_shapes_or_the_losses_change() -> None:
    model, x = make("conv2d")
    opt = train(model, x, "auto", steps=engine.TRIALS)
    chosen = opt.engine.mode
    opt.zero_grad()
    opt.step(model.losses(x))
    assert "gradient_timings_ms" not in opt.last_stats and opt.engine.mode == chosen
    opt.zero_grad()
    opt.step(model.losses(x[:3]))  # a smaller batch: new shapes
    assert set(opt.last_stats["gradient_timings_ms"]) == set(MODES)
    losses = model.losses(x)
    opt.zero_grad()
    opt.step([losses[0], losses[1], losses[2].detach() * 0 + model.heads[2].bias.sum()])  # reaches less
    assert set(opt.last_stats["gradient_timings_ms"]) == set(MODES)
    opt.zero_grad()
    opt.step(model.losses(x))  # the first signature's choice is still known
    assert "gradient_timings_ms" not in opt.last_stats and opt.engine.mode == chosen


@pytest.mark.usefixtures("measure_all")
def test_a_skipped_measuring_step_leaves_no_trace() -> None:
    model, x = make("conv2d")
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), seed=1)
    before = opt.state_dict()["multitask"]["gradient_mode"]
    losses = model.losses(x)
    # finite losses, NaN gradients: d sqrt(u)/du at u = 0 is inf, times 0
    bad = [loss + torch.sqrt(model.trunk[0].weight.sum() * 0.0) for loss in losses]
    with pytest.warns(UserWarning, match="skipped a step"):
        opt.step(bad)
    assert opt.last_stats.get("skipped_step")
    assert opt.engine.mode is None and opt.state_dict()["multitask"]["gradient_mode"] == before is None
    assert opt.engine._history == {}  # the trial was not recorded
    opt.zero_grad()
    opt.step(model.losses(x))
    assert set(opt.last_stats["gradient_timings_ms"]) == set(MODES)  # still trial 1 of TRIALS


@pytest.mark.usefixtures("measure_all")
def test_the_choice_survives_a_checkpoint_and_the_run_continues_bitwise() -> None:
    model, x = make("conv2d")
    opt = train(model, x, "auto", steps=engine.TRIALS)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["multitask"]["gradient_mode"] == opt.engine.mode in MODES
    clone = copy.deepcopy(model)
    fresh = MultiTaskOptimizer(torch.optim.SGD(clone.parameters(), lr=0.05), seed=1)
    fresh.load_state_dict(saved)
    assert fresh.engine.mode == opt.engine.mode
    for _ in range(2):
        for o, m in ((opt, model), (fresh, clone)):
            o.zero_grad()
            o.step(m.losses(x))
        assert "gradient_timings_ms" not in fresh.last_stats  # no measuring after a restore
        assert fresh.engine.mode == opt.engine.mode
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_small_steps_are_not_measured() -> None:
    model, x = make("conv2d")
    opt = train(model, x, "auto", steps=2)
    assert opt.engine.mode == "looped"  # below LOOP_BELOW: K plain backward calls
    assert "gradient_timings_ms" not in opt.last_stats


def test_a_disagreeing_path_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor hook inside the shared graph: the engine runs it, the native walk does not."""
    monkeypatch.setattr(engine, "MEASURE_ABOVE", 0)
    model, x = make("conv2d")
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), seed=1)

    def losses() -> List[Tensor]:
        h = model.trunk[:3](x)
        h.register_hook(lambda g: g * 3.0)
        z = torch.tanh(model.proj(model.trunk[3:](h).flatten(1)))
        return [(head(z) ** 2).mean() for head in model.heads]

    with pytest.warns(UserWarning, match="'native' path disagrees"):
        opt.step(losses())
    assert opt.last_stats["gradient_timings_ms"]["native"] == float("inf")
    for _ in range(engine.TRIALS):
        opt.zero_grad()
        opt.step(losses())
    assert opt.engine.mode != "native"
