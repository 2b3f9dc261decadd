"""Many tasks: the native walk keeps only the factored layers' Gram (GramFactor).

With the threshold lowered (``native.DEFER_ABOVE = 0``) small models take the same
path the MLP at K = 40 takes in the speed benchmark: the walk goes node by node with
every task, forms each factored layer's Gram as soon as its output gradients are
complete and drops them, and the update is one backward of ``sum_i c_i L_i``. Every
result must equal the path that keeps the deltas (``frontier``), to rounding.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
import torch
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer
from multitask_optim import _engine as engine
from multitask_optim import _native as native
from multitask_optim._factors import GramFactor, LinearFactor
from multitask_optim._graph import analyse
from multitask_optim._jacobian import run_path


class Deep(nn.Module):
    """Three shared linear layers (one without bias), K linear heads, conflicting targets."""

    def __init__(self, k: int = 4, width: int = 24) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, width)
        self.l2 = nn.Linear(width, width, bias=False)
        self.l3 = nn.Linear(width, width)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def losses(self, x: Tensor, y: Tensor, scale: float = 1.0) -> List[Tensor]:
        z = torch.relu(self.l3(torch.tanh(self.l2(torch.relu(self.l1(x))))))
        return [
            ((head(z).squeeze(-1) - y[:, i]) ** 2).mean() * (1.0 + i) * scale
            for i, head in enumerate(self.heads)
        ]


def batch(step: int, k: int = 4, n: int = 6) -> tuple:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 20, generator=g), torch.randn(n, k, generator=g) * torch.tensor(
        [(-1.0) ** i for i in range(k)]
    )


@pytest.fixture
def defer_always(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "DEFER_ABOVE", 0)


@pytest.fixture
def measure_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "MEASURE_ABOVE", 0)
    monkeypatch.setattr(engine, "LOOP_BELOW", 0)
    monkeypatch.setattr(engine, "JACOBIAN_BUDGET", 0)


def sgd(model: nn.Module, surgery: str, **kw: Any) -> MultiTaskOptimizer:
    return MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), surgery=surgery, **kw)


def train(mode: str, steps: int = 4, k: int = 4, scaler: Optional[Any] = None, **kw: Any):
    torch.manual_seed(0)
    model = Deep(k)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), gradient_mode=mode, seed=3, grad_scaler=scaler, **kw
    )
    stats: List[Dict[str, Any]] = []
    for step in range(steps):
        x, y = batch(step, k)
        opt.zero_grad()
        opt.step(model.losses(x, y))
        stats.append(dict(opt.last_stats))
    return [p.detach().clone() for p in model.parameters()], opt, stats


def assert_close(a: List[Tensor], b: List[Tensor], tol: float = 1e-5) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "kw",
    [
        {"surgery": "pcgrad"},
        {"surgery": "gradvac"},
        {"surgery": "mgda"},
        {"surgery": "upgrad"},
        {"surgery": "cagrad"},
        {"surgery": None, "weighting": "uncertainty"},
        {"surgery": "pcgrad", "weighting": "gradnorm"},
        {"surgery": "pcgrad", "weighting": "dwa", "weighting_kwargs": {"steps_per_epoch": 2}},
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values() if not isinstance(v, dict)),
)
def test_gram_only_walk_trains_as_the_delta_path(defer_always: None, kw: Dict[str, Any]) -> None:
    deferred, _, stats = train("native", **kw)
    reference, _, ref_stats = train("frontier", **kw)
    assert all(s["gram_only_params"] == 5 for s in stats), "l1 (w, b), l2 (w), l3 (w, b): Gram only"
    assert all(s["gram_only_params"] == 0 and s["factored_params"] == 5 for s in ref_stats)
    assert_close(deferred, reference)


def test_default_threshold_keeps_small_steps_on_the_delta_path() -> None:
    _, _, stats = train("native", surgery="pcgrad")
    assert all(s["gram_only_params"] == 0 and s["factored_params"] == 5 for s in stats)


def test_grams_equal_the_factored_ones(defer_always: None) -> None:
    torch.manual_seed(0)
    model = Deep(5)
    x, y = batch(0, 5)
    shared = [model.l1.weight, model.l1.bias, model.l2.weight, model.l3.weight, model.l3.bias]
    tasks = [list(h.parameters()) for h in model.heads]
    blocks = [[0], [1], [2], [3], [4], list(range(5))]
    losses = model.losses(x, y)
    graph = analyse(losses)
    kept = run_path("native", losses, graph, shared, tasks, True, True, False)
    gram_only = run_path("native", losses, graph, shared, tasks, True, True, True)
    assert all(isinstance(f, LinearFactor) for f in kept.factors)
    assert [type(f) for f in gram_only.factors] == [GramFactor]
    torch.testing.assert_close(gram_only.grams(blocks, 5), kept.grams(blocks, 5), rtol=1e-6, atol=1e-9)
    for a, b in zip(gram_only.tasks, kept.tasks):
        for g, h in zip(a, b):
            torch.testing.assert_close(g, h)
    coefs = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1e-3]], dtype=torch.float64)
    got, finite = gram_only.combine([list(range(5))], coefs)
    want, _ = kept.combine([list(range(5))], coefs)
    assert finite
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
    again, _ = gram_only.combine([list(range(5))], coefs)  # the backward ran once; the result is kept
    assert all(torch.equal(g, h) for g, h in zip(got, again))
    with pytest.raises(RuntimeError, match="once"):
        gram_only.combine([list(range(5))], coefs * 2)


def test_weights_and_loss_scale_reach_the_update(defer_always: None) -> None:
    """Task factors (weights, 1 / loss scale) multiply the Gram on both sides and the
    coefficients of the combined backward."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    kw = {
        "surgery": "pcgrad",
        "weighting": "static",
        "weighting_kwargs": {"weights": [1.0, 0.25, 3.0, 1e-40]},
    }
    deferred, _, stats = train("native", scaler=scaler, **kw)
    reference, _, _ = train("frontier", **kw)
    assert stats[-1]["gram_only_params"] == 5
    assert scaler.get_scale() == 2.0**12
    assert_close(deferred, reference)


def test_not_on_accumulated_or_blockwise_steps(defer_always: None) -> None:
    """The combined backward serves one set of coefficients once: accumulated
    micro-batches and per-tensor blocks keep the deltas."""
    _, _, stats = train("native", surgery="pcgrad", granularity="tensor")
    assert all(s["gram_only_params"] == 0 for s in stats)
    torch.manual_seed(0)
    model = Deep()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), surgery="pcgrad", gradient_mode="native"
    )
    for step in range(2):
        x, y = batch(step)
        opt.accumulate(model.losses(x, y))
    opt.step()
    assert (
        opt.last_stats["gram_only_params"] == 0 and opt.last_stats["jacobian_params"] == 5
    )  # summed densely


def test_absent_tasks(defer_always: None) -> None:
    def run(mode: str) -> List[Tensor]:
        torch.manual_seed(0)
        model = Deep()
        opt = MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05), surgery="gradvac", gradient_mode=mode
        )
        for step in range(4):
            x, y = batch(step)
            losses = model.losses(x, y)
            opt.zero_grad()
            opt.step([None if step and i == step % 4 else loss for i, loss in enumerate(losses)])
        assert opt.last_stats["gram_only_params"] == (5 if mode == "native" else 0)
        return [p.detach().clone() for p in model.parameters()]

    assert_close(run("native"), run("frontier"))


def test_non_finite_gradient_skips_and_changes_nothing(defer_always: None) -> None:
    torch.manual_seed(0)
    model = Deep()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), surgery="pcgrad", gradient_mode="native"
    )
    x, y = batch(0)
    before = [p.detach().clone() for p in model.parameters()]
    losses = model.losses(x, y)
    losses[2] = losses[2] * torch.where(
        model.l3.bias.sum() > -1e30, float("inf"), 1.0
    )  # inf reaches the trunk
    opt.zero_grad()
    with pytest.warns(UserWarning):
        opt.step(losses)
    assert opt.skipped == 1
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_auto_does_not_measure_the_delta_paths(defer_always: None, measure_small: None) -> None:
    """When ``native`` keeps only Grams, ``auto`` does not time the paths that hold every
    layer's deltas (they would set the run's peak memory): with only one candidate left
    nothing is timed."""
    deferred, opt, stats = train("auto", surgery="pcgrad")
    assert opt.engine.mode == "native" and opt.engine.timings == {}
    assert all(s["gradient_mode"] == "native" and s["gram_only_params"] == 5 for s in stats)
    reference, _, _ = train("frontier", surgery="pcgrad")
    assert_close(deferred, reference)


class Residual(nn.Module):
    """ReLUs read twice (a skip connection), a head that also reads inside the trunk: the
    walk's in-place ReLU must not touch a gradient another branch still reads."""

    def __init__(self, k: int = 4, width: int = 24) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, width)
        self.l2 = nn.Linear(width, width)
        self.l3 = nn.Linear(width, width)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def losses(self, x: Tensor, y: Tensor, scale: float = 1.0) -> List[Tensor]:
        h1 = torch.relu(self.l1(x))
        h2 = torch.relu(self.l2(h1)) + h1
        h3 = self.l3(h2)
        # an add hands one gradient object to both its inputs (a ReLU and a product), in both orders
        z = torch.relu(torch.relu(h3) + h3 * -0.5) + torch.relu(h3 * -0.5 + torch.relu(h3))
        out = []
        for i, head in enumerate(self.heads):
            pred = head(z).squeeze(-1) + (h2.mean(-1) if i == 0 else 0.0)
            out.append(((pred - y[:, i]) ** 2).mean() * (1.0 + i) * scale)
        return out


@pytest.mark.parametrize("surgery", ["pcgrad", "mgda"])
def test_skip_connections_and_a_head_reading_the_trunk(defer_always: None, surgery: str) -> None:
    def run(mode: str) -> List[Tensor]:
        torch.manual_seed(0)
        model = Residual()
        opt = MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05), surgery=surgery, gradient_mode=mode
        )
        for step in range(4):
            x, y = batch(step)
            opt.zero_grad()
            opt.step(model.losses(x, y))
        assert opt.last_stats["gram_only_params"] == (6 if mode == "native" else 0)
        return [p.detach().clone() for p in model.parameters()]

    assert_close(run("native"), run("frontier"))


def test_the_combined_backward_runs_at_the_losses_magnitude() -> None:
    """The backward gets the coefficients divided by the sum of their magnitudes (a loss
    scale stays in effect, no overflow where no task overflows, tiny coefficients stay
    normal) and its result is multiplied back once."""
    seen: List[Tensor] = []

    def solve(c: Tensor) -> Dict[int, Tensor]:
        seen.append(c.clone())
        return {0: torch.full((3,), float(c.sum()))}

    gram = {0: torch.eye(2, dtype=torch.float64)}
    factor = GramFactor(gram, solve).scaled(torch.tensor([2.0**-20, 2.0**-20], dtype=torch.float64))
    got = factor.update(0, torch.tensor([1.0, -0.5], dtype=torch.float64), None)
    # divided by the sum of magnitudes: every gradient the backward forms is a convex combination
    torch.testing.assert_close(seen[0], torch.tensor([2.0 / 3.0, -1.0 / 3.0], dtype=torch.float64))
    torch.testing.assert_close(got, torch.full((3,), 0.5 * 2.0**-20))
    assert torch.equal(factor.gram(0), torch.eye(2, dtype=torch.float64) * 2.0**-40)


def test_auto_still_drops_native_when_a_hook_makes_it_disagree(
    defer_always: None, measure_small: None
) -> None:
    """Without the other paths to compare with, ``auto`` checks the walk against one
    ordinary backward (which runs tensor hooks; the walk does not)."""
    torch.manual_seed(0)
    model = Deep()
    opt, (x, y) = sgd(model, "pcgrad"), batch(0)
    h = torch.relu(model.l1(x))
    h.register_hook(lambda g: g * 3.0)
    z = torch.relu(model.l3(torch.tanh(model.l2(h))))
    losses = [((head(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, head in enumerate(model.heads)]
    with pytest.warns(UserWarning, match="'native' path disagrees with autograd"):
        opt.step(losses)
    assert opt.engine.mode == "frontier" and opt.last_stats["gram_only_params"] == 0


def _gram_methods() -> List[str]:
    from multitask_optim import AGGREGATORS

    return sorted(n for n in AGGREGATORS if not AGGREGATORS[n]().needs_jacobian)


def _weightings() -> List[str]:
    from multitask_optim import WEIGHTINGS

    return sorted(WEIGHTINGS)


WEIGHTING_ARGS: Dict[str, Dict[str, Any]] = {
    "static": {"weights": [1.0, 0.5, 3.0, 1e-42]},
    "staged": {"start_steps": [0, 1, 0, 2], "ramp_steps": 1},
    "htw": {"total_steps": 6},
}


@pytest.mark.parametrize("surgery", _gram_methods())
def test_every_gram_surgery(defer_always: None, surgery: str) -> None:
    deferred, _, stats = train("native", steps=3, surgery=surgery)
    reference, _, _ = train("frontier", steps=3, surgery=surgery)
    assert stats[-1]["gram_only_params"] == 5
    assert_close(deferred, reference, tol=1e-4)


@pytest.mark.parametrize("weighting", _weightings())
def test_every_weighting(defer_always: None, weighting: str) -> None:
    kw = {"surgery": "pcgrad", "weighting": weighting, "weighting_kwargs": WEIGHTING_ARGS.get(weighting, {})}
    deferred, _, stats = train("native", steps=3, **kw)
    reference, _, _ = train("frontier", steps=3, **kw)
    assert all(s["gram_only_params"] == 5 for s in stats)
    assert_close(deferred, reference, tol=1e-4)


# ---------------------------------------------------------------------- found by review


class Mixer(nn.Module):
    """A transposed view of a square activation: same shape and start as the untransposed
    row, other strides."""

    def __init__(self, k: int = 8) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, 64)
        self.l2 = nn.Linear(64, 24)
        self.heads = nn.ModuleList(nn.Linear(24, 1) for _ in range(k))

    def losses(self, x: Tensor, y: Tensor) -> List[Tensor]:
        a = torch.relu(self.l1(x).view(-1, 8, 8))
        b = torch.relu(a.transpose(1, 2) - 0.1)
        z = torch.relu(self.l2(b.flatten(1)))
        return [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)]


def test_a_transposed_square_part_is_not_taken_for_the_part(defer_always: None) -> None:
    def run(mode: str) -> List[Tensor]:
        torch.manual_seed(0)
        model = Mixer()
        opt = MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.01), gradient_mode=mode, surgery="pcgrad"
        )
        for step in range(2):
            x, y = batch(step, 8)
            opt.zero_grad()
            opt.step(model.losses(x, y))
        assert opt.last_stats["gram_only_params"] == (4 if mode == "native" else 0)
        return [p.detach().clone() for p in model.parameters()]

    assert_close(run("native"), run("frontier"))


def hooked(model: Deep, x: Tensor, y: Tensor) -> List[Tensor]:
    """A tensor hook on an activation task 0 does not read (heads 1.. read past it)."""
    h1 = torch.relu(model.l1(x))
    h2 = torch.tanh(model.l2(h1))
    h2.register_hook(lambda g: g * 3.0)
    z = torch.relu(model.l3(h2))
    return [
        ((head(h1[:, :24] if i == 0 else z).squeeze(-1) - y[:, i]) ** 2).mean()
        for i, head in enumerate(model.heads)
    ]


def test_the_hook_check_covers_every_task(defer_always: None, measure_small: None) -> None:
    torch.manual_seed(0)
    model = Deep()
    opt, (x, y) = sgd(model, "mgda"), batch(0)
    with pytest.warns(UserWarning, match="'native' path disagrees with autograd"):
        opt.step(hooked(model, x, y))
    assert opt.engine.mode != "native" and opt.last_stats["gram_only_params"] == 0


def test_an_accumulated_measurement_then_a_whole_step(defer_always: None, measure_small: None) -> None:
    """A measured accumulated step prunes ``native`` (it disagrees); the next whole step
    leaves only ``native`` to measure: it is checked, dropped, and the step goes on."""
    torch.manual_seed(0)
    model = Deep()
    opt, (x, y) = sgd(model, "pcgrad"), batch(0)
    with pytest.warns(UserWarning, match="disagrees"):
        opt.accumulate(hooked(model, x, y))
        opt.step()
    with pytest.warns(UserWarning, match="disagrees"):
        opt.step(hooked(model, x, y))
    assert opt.skipped == 0 and opt.engine.mode != "native"


def test_fp16_agreeing_tasks_do_not_overflow_the_combined_backward(defer_always: None) -> None:
    """The combined backward adds K tasks' gradients at the loss scale: divided by the sum
    of the coefficients' magnitudes it never exceeds the largest task's."""

    def run(mode: str) -> int:
        torch.manual_seed(0)
        model = Deep(k=8).half()
        with torch.no_grad():
            for head in model.heads:
                head.weight.fill_(3.0)
                head.bias.zero_()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**13)
        opt = MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=1e-4),
            gradient_mode=mode,
            surgery="sum",
            grad_scaler=scaler,
        )
        x = torch.randn(6, 20, generator=torch.Generator().manual_seed(0)).half()
        for _ in range(3):
            losses = []
            z = torch.relu(model.l3(torch.tanh(model.l2(torch.relu(model.l1(x))))))
            for head in model.heads:
                out = head(z).squeeze(-1)
                losses.append(((out - (out.detach() + 1.0)) ** 2).mean())
            opt.zero_grad()
            opt.step(losses)
        assert opt.last_stats["gram_only_params"] == (5 if mode == "native" else 0)
        return opt.skipped

    assert run("frontier") == 0
    assert run("native") == 0
