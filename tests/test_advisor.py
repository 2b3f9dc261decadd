"""advisor.diagnose and advisor.compare on constructed cases (fast: tiny models, few steps)."""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from multitask_optim import MultiTaskOptimizer
from multitask_optim.advisor import IMBALANCE, Measurements, compare, diagnose
from multitask_optim.advisor._compare import Comparison, Entry
from multitask_optim.advisor._compare import _entries as compare_entries
from multitask_optim.advisor._rules import recommend


class TwoHeads(nn.Module):
    def __init__(self, d: int = 4, width: int = 8, k: int = 2) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d, width), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def forward(self, x: torch.Tensor) -> list:
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def _batches(n: int = 4, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=gen), torch.randn(16, generator=gen)) for _ in range(n)]


def _frozen(params):  # type: ignore[no-untyped-def]
    return torch.optim.SGD(params, lr=0.0)


def _model(seed: int = 0, k: int = 2) -> TwoHeads:
    torch.manual_seed(seed)
    return TwoHeads(k=k)


def test_known_scale_ratio_and_no_conflict() -> None:
    """Task b is task a's loss times 1000: ratios 1000, cosine 1, no conflict."""

    def loss_fn(model, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        out = model(x)
        a = (out[0] - y).pow(2).mean()
        return {"a": a, "b": 1000.0 * (out[0] - y).pow(2).mean() + 0.0 * out[1].sum()}

    report = diagnose(_model(), loss_fn, _batches(), steps=3, optimizer=_frozen, progress=False)
    s = report.summary
    assert s["loss_ratio"] == pytest.approx(1000.0, rel=1e-5)
    assert s["grad_ratio"] == pytest.approx(1000.0, rel=1e-4)
    assert s["conflict_fraction"] == 0.0
    assert s["pairs"]["a|b"] == pytest.approx(1.0, abs=1e-5)
    assert s["loss_ratio"] >= IMBALANCE
    assert "plain sum" in report.warnings  # R1: the large task dominates the sum


def test_known_conflict() -> None:
    """Targets +1 and -1 through one shared output at 0: opposite gradients (cosine -1)."""
    model = _model()
    with torch.no_grad():
        model.trunk[0].weight.zero_()
        model.trunk[0].bias.fill_(1.0)
        for h in model.heads:
            h.weight.fill_(1.0)
            h.bias.fill_(-8.0)  # head output 0 at the start

    def loss_fn(model, batch):  # type: ignore[no-untyped-def]
        x, _ = batch
        out = model(x)
        return [(out[0] - 1.0).pow(2).mean(), (out[1] + 1.0).pow(2).mean()]

    report = diagnose(model, loss_fn, _batches(), steps=4, optimizer=_frozen, progress=False)
    s = report.summary
    assert report.measurements.tasks == ("0", "1")
    assert s["conflict_fraction"] == 1.0
    assert s["conflict_strength"] == pytest.approx(1.0, abs=1e-6)
    assert s["loss_ratio"] == pytest.approx(1.0)
    assert "conflict on 100%" in report.recommended[0].reason


def test_loss_driven_to_zero_is_the_inverse_loss_hazard() -> None:
    """A realisable target (0) falls geometrically under SGD; a noisy one keeps a floor."""

    def loss_fn(model, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        out = model(x)
        return {"noisy": (out[0] - y).pow(2).mean(), "zero": out[1].pow(2).mean()}

    sgd = lambda p: torch.optim.SGD(p, lr=0.2)  # noqa: E731
    report = diagnose(_model(), loss_fn, _batches(), steps=60, optimizer=sgd, horizon=600, progress=False)
    tasks = report.summary["tasks"]
    assert tasks["zero"]["approaches_zero"] is True
    assert tasks["noisy"]["approaches_zero"] is False
    assert "approaches 0" in report.warnings["GLS"]
    assert all(r.get("weighting") not in ("gls", "famo", "stch", "imtl_l") for r in report.recommended)


def _recorded(curves, steps: int = 100, horizon: int = 1000, noise: float = 0.2) -> Measurements:  # type: ignore[no-untyped-def]
    """Measurements of losses ``curve(t)`` times seeded log-normal noise (per-batch scatter)."""
    rng = random.Random(0)
    m = Measurements(tasks=tuple(curves), steps=steps, horizon=horizon, inner="Adam", adaptive=True)
    for t in range(steps):
        m.record(
            {
                "tasks": list(curves),
                "losses": [f(t) * math.exp(rng.gauss(0.0, noise)) for f in curves.values()],
            }
        )
    return m


def test_falling_to_a_floor_is_not_the_hazard_but_falling_to_zero_is() -> None:
    """A regression falling a hundredfold onto its noise floor is not flagged; a loss falling
    geometrically or as a power of the step with no floor is, at the same noise."""
    m = _recorded(
        {
            "to floor": lambda t: 1.0 + 100.0 * 0.9**t,
            "still falling to a floor": lambda t: 1.0 + 40.0 * 0.93**t,
            "geometric": lambda t: 1.1 * 0.95**t,
            "power law": lambda t: (1.0 + 0.2 * t) ** -2,
            "flat": lambda t: 1.0,
        }
    )
    flags = {t: m.approaches_zero(t) for t in m.tasks}
    assert flags == {
        "to floor": False,
        "still falling to a floor": False,
        "geometric": True,
        "power law": True,
        "flat": False,
    }
    floor = m.trend("to floor")
    assert floor is not None and floor.stays_above and floor.floor == pytest.approx(1.0, rel=0.3)
    assert m.trend("to floor").lowest < 0.05 * m.trend("to floor").first  # it did fall far


def test_a_short_horizon_keeps_a_slow_fall_away_from_zero() -> None:
    """The same geometric fall, projected to the run's own end, does not go tenfold lower."""
    m = _recorded({"slow": lambda t: 1.1 * 0.97**t}, horizon=110, noise=0.05)
    assert m.approaches_zero("slow") is False
    assert _recorded({"slow": lambda t: 1.1 * 0.97**t}, horizon=1000, noise=0.05).approaches_zero("slow")


@pytest.mark.slow
def test_diagnose_noisy_regression_onto_its_floor_noise_free_one_towards_zero() -> None:
    """End to end (slow: 100 steps and the balanced probe; the fast default run checks the
    same floor logic on constructed records above). Through diagnose: a regression with unit noise falls from about 30 onto its floor of
    about 1 (thirtyfold): not flagged; one without noise that the model can represent
    exactly heads to 0: flagged."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=gen)
    value = 6.0 + 2.0 * x[:, 1] + torch.randn(512, generator=gen)
    batches = [(x[i : i + 32], value[i : i + 32]) for i in range(0, 512, 32)]

    def loss_fn(model, batch):  # type: ignore[no-untyped-def]
        xb, vb = batch
        out = model(xb)
        return {"value": (out[0] - vb).pow(2).mean(), "other": (out[1] - xb[:, 0]).pow(2).mean()}

    adam = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    report = diagnose(_model(1), loss_fn, batches, steps=100, optimizer=adam, progress=False)
    trend = report.measurements.trend("value")
    assert trend is not None and trend.lowest < 0.1 * trend.first  # it fell more than tenfold
    assert report.summary["tasks"]["value"]["approaches_zero"] is False
    assert trend.floor == pytest.approx(1.0, rel=0.5)
    assert report.summary["tasks"]["other"]["approaches_zero"] is True
    assert "other approaches 0" in report.warnings["GLS"]


def test_missing_labels_are_measured_and_rule_out_methods_that_refuse_them() -> None:
    def loss_fn(model, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        out = model(x)
        present = bool(batch[1][0] > -10) and int(x[0, 0].sign()) >= 0
        return {"a": (out[0] - y).pow(2).mean(), "b": (out[1] - y).pow(2).mean() if present else None}

    batches = _batches(8)
    with torch.no_grad():  # first batch labelled, then alternate
        for i, (x, _) in enumerate(batches):
            x[0, 0] = 1.0 if i % 2 == 0 else -1.0
    report = diagnose(_model(), loss_fn, batches, steps=8, optimizer=_frozen, progress=False)
    assert report.summary["tasks"]["b"]["missing"] == pytest.approx(0.5)
    assert report.summary["tasks"]["a"]["missing"] == 0.0
    assert "absent" in report.warnings["FAMO"]
    assert math.isnan(report.measurements.cosines["a|b"][1])


def _rng_states():  # type: ignore[no-untyped-def]
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _noisy_loss(model, batch):  # type: ignore[no-untyped-def]
    x, y = batch
    out = model(nn.functional.dropout(x, 0.2, training=True))
    noise = float(np.random.rand()) + random.random()
    return {"a": (out[0] - y).pow(2).mean() * (1 + 0 * noise), "b": (out[1] + y).pow(2).mean()}


def _evaluate(model):  # type: ignore[no-untyped-def]
    x, y = _batches(1, seed=9)[0]
    out = model(x)
    return {"a": -float((out[0] - y).pow(2).mean()), "b": -float((out[1] + y).pow(2).mean())}


def test_callers_model_and_every_rng_untouched() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    states = _rng_states()
    sgd = lambda p: torch.optim.SGD(p, lr=0.05)  # noqa: E731
    diagnose(model, _noisy_loss, _batches(), steps=5, optimizer=sgd, progress=False)
    compare(
        model,
        _noisy_loss,
        _batches(),
        _evaluate,
        configs=[{"surgery": "pcgrad"}],
        steps=3,
        seeds=[0],
        progress=False,
    )
    after = _rng_states()
    assert torch.equal(states[0], after[0])
    assert states[1] == after[1]
    assert np.array_equal(states[2], after[2])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_compare_reproducible_and_failures_reported() -> None:
    configs = [
        {"surgery": "pcgrad"},
        {"surgery": "no_such_method"},
        {"surgery": None, "precondition": "adam"},
    ]

    def run():  # type: ignore[no-untyped-def]
        return compare(
            _model(),
            _noisy_loss,
            _batches(),
            _evaluate,
            configs=configs,
            steps=4,
            seeds=[0, 1],
            progress=False,
        )

    first, second = run(), run()
    assert [e.label for e in first.ranking] == [e.label for e in second.ranking]
    for a, b in zip(first.ranking, second.ranking):
        assert a.scores == b.scores
    failed = [e for e in first.ranking if e.failed]
    assert [e.label for e in failed] == ["no_such_method"]
    assert "no_such_method" in failed[0].errors[0]
    assert first.ranking[-1].failed  # ranked last
    ref = next(e for e in first.ranking if e.label == "sum (reference)")
    assert ref.scores == {0: 0.0, 1: 0.0}
    assert "failed" in first.table()
    assert first.best in [dict(c) for c in configs] + [{"surgery": None}]


def test_compare_score_is_the_mean_relative_change() -> None:
    """A config that halves both (negated) errors scores +50%; the plain sum runs once as reference."""
    calls = []

    def evaluate(model):  # type: ignore[no-untyped-def]
        calls.append(1)
        scale = 0.5 if isinstance(model, _Marked) else 1.0
        return {"a": -2.0 * scale, "b": -4.0 * scale}

    class _Marked(TwoHeads):
        pass

    result = compare(
        _model(),
        _noisy_loss,
        _batches(),
        evaluate,
        configs=[{"surgery": None}],
        steps=2,
        seeds=[3],
        progress=False,
    )
    assert len(result.ranking) == 1 and len(calls) == 1  # the plain sum given again is not run twice
    assert result.best == {"surgery": None}


def _entry(label: str, position: int, scores: list) -> Entry:  # type: ignore[type-arg]
    return Entry({"surgery": label}, label, position=position, scores=dict(enumerate(scores)))


def test_best_is_the_first_given_within_one_standard_error_of_the_top() -> None:
    """Scores 0.30 +- sem 0.10 (top), 0.25 (within one standard error, given first): the
    earlier is best; 0.15 (outside) never is; one seed: the top score."""
    top = _entry("top", 2, [0.2, 0.4])  # mean 0.3, std 0.1414, sem 0.1
    close = _entry("close", 1, [0.24, 0.26])
    far = _entry("far", 0, [0.14, 0.16])
    result = Comparison([_entry("sum", 3, [0.0, 0.0]), top, close, far], steps=5, seeds=[0, 1])
    assert [e.label for e in result.ranking] == ["top", "close", "far", "sum"]
    assert top.sem == pytest.approx(0.1)
    assert result.best == {"surgery": "close"} and result.best_entry is close
    assert "* best: close" in result.table()
    tight = _entry("top", 2, [0.29, 0.31])  # sem 0.01: close is 0.05 below, outside
    assert Comparison([tight, _entry("close", 1, [0.24, 0.26])], 5, [0, 1]).best == {"surgery": "top"}
    single = Comparison([_entry("top", 2, [0.3]), _entry("close", 0, [0.29])], 5, [0])
    assert single.best == {"surgery": "top"}


def test_given_plain_sum_takes_its_place_in_the_order() -> None:
    entries = compare_entries([{"surgery": "pcgrad"}, {"surgery": None}, {"surgery": "mgda"}])
    assert [(e.label, e.position) for e in entries] == [("sum (reference)", 1), ("pcgrad", 0), ("mgda", 2)]
    assert compare_entries([{"surgery": "pcgrad"}])[0].position == 1  # not given: after every config


@settings(max_examples=8, deadline=None)
@given(
    k=st.integers(2, 4),
    scales=st.lists(st.floats(1e-3, 1e6), min_size=4, max_size=4),
    cos=st.floats(-1.0, 1.0),
    zero=st.booleans(),
    missing=st.booleans(),
    adaptive=st.booleans(),
)
def test_every_recommendation_constructs_and_steps(k, scales, cos, zero, missing, adaptive) -> None:  # type: ignore[no-untyped-def]
    tasks = tuple(f"t{i}" for i in range(k))
    m = Measurements(
        tasks=tasks, steps=20, horizon=200, inner="Adam" if adaptive else "SGD", adaptive=adaptive
    )
    for step in range(20):
        stats = {
            "tasks": list(tasks),
            "losses": [scales[i] * (0.5**step if zero and i == 0 else 1.0) for i in range(k)],
            "grad_norms": [scales[i] for i in range(k)],
            "cosine": [[1.0 if i == j else cos for j in range(k)] for i in range(k)],
        }
        if missing and step % 2 and k > 2:
            stats = {key: _drop_last(v, key) for key, v in stats.items()}
        m.record(stats)
    m.steps = 20
    picks, _ = recommend(m)
    assert picks
    for config, reason in picks:
        assert reason
        model = _model(k=k)
        opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), **config)
        x, y = _batches(1)[0]
        out = model(x)
        opt.zero_grad()
        opt.step({t: (out[i] - y).pow(2).mean() + 0.1 for i, t in enumerate(tasks)})
        assert all(torch.isfinite(p).all() for p in model.parameters())


def _drop_last(value, key):  # type: ignore[no-untyped-def]
    if key == "cosine":
        return [row[:-1] for row in value[:-1]]
    return value[:-1]


def test_report_prints() -> None:
    report = diagnose(_model(), _noisy_loss, _batches(), steps=4, optimizer=_frozen, progress=False)
    text = str(report)
    assert "recommended (best first)" in text and "loss ratio" in text
    for task in ("a", "b"):
        assert task in text
    result = compare(
        _model(),
        _noisy_loss,
        _batches(),
        _evaluate,
        configs=[{"surgery": "pcgrad"}],
        steps=2,
        seeds=[0],
        progress=False,
    )
    table = result.table()
    assert "pcgrad" in table and "sum (reference)" in table


@pytest.mark.slow
def test_report_and_ranking_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Slow: matplotlib's import and layout take seconds."""
    pytest.importorskip("matplotlib")
    report = diagnose(_model(), _noisy_loss, _batches(), steps=4, optimizer=_frozen, progress=False)
    fig = report.plot(str(tmp_path / "d.png"))
    assert len(fig.axes) == 3 and len(fig.axes[0].lines) == 2  # one loss curve per task
    result = compare(
        _model(),
        _noisy_loss,
        _batches(),
        _evaluate,
        configs=[{"surgery": "pcgrad"}],
        steps=2,
        seeds=[0],
        progress=False,
    )
    result.plot(str(tmp_path / "c.png"))
    assert (tmp_path / "d.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0


def test_without_tqdm_and_matplotlib(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    report = diagnose(_model(), _noisy_loss, _batches(), steps=3, optimizer=_frozen, progress=True)
    assert "diagnose: 3/" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"pip install -e .\.\[plot\]."):
        report.plot()


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="steps"):
        diagnose(_model(), _noisy_loss, _batches(), steps=0)
    with pytest.raises(ValueError, match="empty"):
        diagnose(_model(), _noisy_loss, [], steps=3, progress=False)
    with pytest.raises(TypeError, match="loss_fn"):
        diagnose(_model(), lambda m, b: "loss", _batches(), steps=3, progress=False)
    with pytest.raises(ValueError, match="not a mapping"):
        compare(_model(), _noisy_loss, _batches(), _evaluate, configs=["pcgrad"], progress=False)
