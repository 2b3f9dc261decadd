"""Diagnostics: ``last_stats`` as plain Python values, ``log_stats``, ``StatsHistory``, ``plot_history``."""

from __future__ import annotations

import json
import math
import sys
import warnings
from typing import Any, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from models import MultiHead
from torch import Tensor

from multitask_optim import AGGREGATORS, MultiTaskOptimizer
from multitask_optim.diagnostics import StatsHistory, log_stats, plot_history

BATCH = 16
IN_DIM = 5
HIDDEN = 10


def build(k: int = 3) -> MultiHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        return MultiHead(k, IN_DIM, HIDDEN, depth=1)


def batch(step: int, k: int = 3) -> Tuple[Tensor, List[Tensor]]:
    g = torch.Generator().manual_seed(7 * step + 2)
    x = torch.randn(BATCH, IN_DIM, generator=g)
    base = torch.randn(BATCH, 2, generator=g) + 1.0
    return x, [(-1.0) ** i * base * (i + 1) + 0.3 * torch.randn(BATCH, 2, generator=g) for i in range(k)]


def losses_of(model: MultiHead, step: int) -> List[Tensor]:
    x, targets = batch(step, model.k)
    return [F.mse_loss(y, t) for y, t in zip(model(x), targets)]


def assert_plain(value: Any, where: str = "last_stats") -> None:
    """Only Python numbers, strings, None, and lists/dicts of them; no tensors or NumPy."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where}: key {key!r}"
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for n, item in enumerate(value):
            assert_plain(item, f"{where}[{n}]")
    else:
        assert value is None or type(value) in (float, int, bool, str), f"{where} is a {type(value).__name__}"


class FakeWriter:
    def __init__(self) -> None:
        self.calls: List[Tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.calls.append((tag, value, step))

    def tags(self, step: int) -> dict:
        return {tag: value for tag, value, s in self.calls if s == step}


# ---------------------------------------------------------------------- last_stats
@pytest.mark.parametrize("surgery", sorted({None, "pcgrad", "gradvac"} | set(AGGREGATORS) - {"sum"}, key=str))
def test_last_stats_are_plain_python_values(surgery) -> None:
    model = build()
    # with no surgery, "auto" takes the plain path (no per-task gradients): ask for them
    mode = "frontier" if surgery is None else "auto"
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), surgery=surgery, seed=0, gradient_mode=mode
    )
    for step in range(3):
        opt.zero_grad()
        opt.step(losses_of(model, step))
        stats = opt.last_stats
        assert_plain(stats)
        k = model.k
        assert len(stats["losses"]) == len(stats["weights"]) == len(stats["grad_norms"]) == k
        assert len(stats["cosine"]) == k and all(len(row) == k for row in stats["cosine"])
        if stats["coefficients"] is None:  # only a row method whose update is not J^T c
            assert surgery is not None and AGGREGATORS[surgery].needs_jacobian
            assert stats["block_coefficients"] is None
        else:
            assert len(stats["coefficients"]) == k
            assert isinstance(stats["block_coefficients"], list) and len(stats["block_coefficients"][0]) == k
        assert type(stats["conflicts"]) is int and type(stats["skipped"]) is int
        assert type(stats["objective"]) is float
        assert stats["gradient_mode"] in ("frontier", "lean", "batched", "looped")
        assert all(math.isfinite(v) for row in stats["cosine"] for v in row)


def test_last_stats_match_the_per_task_gradients() -> None:
    """Cosines, norms and the conflict count are those of the task gradients on the trunk."""
    model = build()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), surgery="pcgrad", seed=0)
    losses = losses_of(model, 0)
    trunk = list(model.trunk.parameters())
    g = [
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, trunk, retain_graph=True)]).double()
        for loss in losses
    ]
    opt.step(losses)
    stats = opt.last_stats
    k = len(g)
    for i in range(k):
        assert stats["grad_norms"][i] == pytest.approx(float(g[i].norm()), rel=1e-5)
        assert stats["losses"][i] == pytest.approx(float(losses[i].detach()), rel=1e-6)
        for j in range(k):
            want = float(g[i] @ g[j] / (g[i].norm() * g[j].norm()))
            assert stats["cosine"][i][j] == pytest.approx(want, rel=1e-4, abs=1e-6)
    negative = sum(1 for i in range(k) for j in range(i + 1, k) if float(g[i] @ g[j]) < 0)
    assert stats["conflicts"] == negative > 0
    assert stats["weights"] == [1.0] * k
    assert stats["skipped"] == 0


def test_skipped_steps_are_counted_in_last_stats() -> None:
    model = build(k=2)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), surgery="pcgrad", seed=0)
    opt.step(losses_of(model, 0))
    assert opt.last_stats["skipped"] == 0 and "skipped_step" not in opt.last_stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in (1, 2):
            losses = losses_of(model, n)
            losses[n % 2] = losses[n % 2] * float("nan")
            opt.zero_grad()
            opt.step(losses)
            assert opt.last_stats["skipped"] == n
            assert opt.last_stats["skipped_step"] is True
            assert_plain(opt.last_stats)
    opt.zero_grad()
    opt.step(losses_of(model, 3))
    assert opt.last_stats["skipped"] == 2
    assert "skipped_step" not in opt.last_stats
    assert opt.skipped == 2


def test_last_stats_plain_in_representation_mode_and_after_accumulation() -> None:
    model = build()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), surgery="pcgrad", seed=0)
    x, targets = batch(0)
    z = model.trunk(x)
    opt.step([F.mse_loss(head(z), t) for head, t in zip(model.heads, targets)], representation=z)
    assert_plain(opt.last_stats)
    assert opt.last_stats["gradient_mode"] == "representation"
    opt.zero_grad()
    for idx in torch.arange(BATCH).chunk(2):
        opt.accumulate([F.mse_loss(y, t[idx]) / 2 for y, t in zip(model(x[idx]), targets)])
    opt.step()
    assert_plain(opt.last_stats)
    assert len(opt.last_stats["cosine"]) == 3


# ---------------------------------------------------------------------- log_stats
def test_log_stats_writes_the_expected_tags_and_values() -> None:
    model = build()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        shared=model.trunk.parameters(),
        tasks={name: h.parameters() for name, h in zip(("depth", "normals", "label"), model.heads)},
        surgery="gradvac",
        weighting="dwa",
        seed=0,
    )
    writer = FakeWriter()
    for step in range(2):
        losses = dict(zip(opt.tasks, losses_of(model, step)))
        opt.zero_grad()
        opt.step(losses)
        written = log_stats(writer, opt.last_stats, step, task_names=opt.tasks)
    stats = opt.last_stats
    names = ("depth", "normals", "label")
    expected = {}
    for n, name in enumerate(names):
        expected[f"multitask/loss/{name}"] = stats["losses"][n]
        expected[f"multitask/weight/{name}"] = stats["weights"][n]
        expected[f"multitask/grad_norm/{name}"] = stats["grad_norms"][n]
        expected[f"multitask/coefficient/{name}"] = stats["coefficients"][n]
    pairs = [(0, 1), (0, 2), (1, 2)]
    for i, j in pairs:
        expected[f"multitask/cosine/{names[i]}-{names[j]}"] = stats["cosine"][i][j]
    expected["multitask/cosine/mean"] = sum(stats["cosine"][i][j] for i, j in pairs) / 3
    expected["multitask/conflicts"] = stats["conflicts"]
    expected["multitask/skipped"] = 0
    expected["multitask/objective"] = stats["objective"]
    got = writer.tags(1)
    assert got.keys() == expected.keys()
    for tag, value in expected.items():
        assert got[tag] == pytest.approx(value, rel=1e-12), tag
        assert type(got[tag]) is float
    assert written == got
    assert len(writer.calls) == 2 * len(expected)
    assert {s for _, _, s in writer.calls} == {0, 1}


def test_log_stats_default_names_prefix_and_a_skipped_step() -> None:
    model = build(k=2)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), surgery="pcgrad", seed=0)
    writer = FakeWriter()
    opt.step(losses_of(model, 0))
    log_stats(writer, opt.last_stats, 10, prefix="train/mt")
    tags = set(writer.tags(10))
    assert {"train/mt/loss/0", "train/mt/loss/1", "train/mt/cosine/0-1", "train/mt/cosine/mean"} <= tags
    assert all(tag.startswith("train/mt/") for tag in tags)
    assert writer.tags(10)["train/mt/cosine/0-1"] == writer.tags(10)["train/mt/cosine/mean"]

    losses = losses_of(model, 1)
    losses[0] = losses[0] * float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.zero_grad()
        opt.step(losses)
    written = log_stats(writer, opt.last_stats, 11)
    assert set(written) == {"multitask/loss/0", "multitask/loss/1", "multitask/skipped"}
    assert written["multitask/skipped"] == 1.0
    assert written["multitask/loss/1"] == opt.last_stats["losses"][1]


def test_a_skipped_step_reports_the_offending_loss_values() -> None:
    """last_stats["losses"] of a skipped step shows the values that made it skip (here the
    non-finite loss of task 1 and the finite loss of task 0), not zeros: that is what a
    user looks for in the logs."""
    model = build(k=2)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), surgery="pcgrad", seed=0)
    losses = losses_of(model, 0)
    want = float(losses[0].detach())
    losses[1] = losses[1] * float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(losses)
    assert opt.last_stats["skipped_step"] is True
    assert opt.last_stats["losses"][0] == pytest.approx(want, rel=1e-6)
    assert math.isnan(opt.last_stats["losses"][1])


def test_log_stats_errors() -> None:
    stats = {"losses": [1.0, 2.0], "weights": [1.0, 1.0], "skipped": 0}
    with pytest.raises(TypeError, match="add_scalar"):
        log_stats(object(), stats, 0)
    with pytest.raises(ValueError, match="task_names"):
        log_stats(FakeWriter(), stats, 0, task_names=["a", "b", "c"])


# ---------------------------------------------------------------------- history and plot
def short_run(steps: int = 12, nan_at: int = 5) -> Tuple[StatsHistory, MultiTaskOptimizer]:
    model = build()
    opt = MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=2e-2),
        surgery="gradvac",
        weighting="uncertainty",
        num_tasks=3,
        seed=0,
    )
    history = StatsHistory(task_names=("depth", "normals", "label"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            losses = losses_of(model, step)
            if step == nan_at:
                losses[2] = losses[2] * float("nan")
            opt.zero_grad()
            opt.step(losses)
            history.append(opt.last_stats, step)
    return history, opt


def test_stats_history_records_plain_aligned_lists() -> None:
    history, opt = short_run()
    assert len(history) == 12 and history.steps == list(range(12))
    assert history.names == ["depth", "normals", "label"]
    for key in (
        "losses",
        "weights",
        "grad_norms",
        "coefficients",
        "cosine",
        "conflicts",
        "skipped",
        "skipped_step",
    ):
        assert len(getattr(history, key)) == 12, key
    assert history.skipped_step == [s == 5 for s in range(12)]
    assert history.skipped == [0] * 5 + [1] * 7
    assert history.cosine[5] is None and history.weights[5] is None and history.losses[5] is not None
    assert history.weights[-1] == opt.last_stats["weights"]
    assert history.weights[0] != history.weights[-1], "the uncertainty weights moved"
    data = history.to_dict()
    assert_plain(data, "history")
    json.dumps(data)  # plain enough for JSON (NaN allowed)
    pairs, rows = history.pair_cosines()
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    assert len(rows) == 3 and all(len(r) == 12 for r in rows)
    assert math.isnan(rows[0][5]) and rows[0][0] == history.cosine[0][0][1]
    assert sum(c for c in history.conflicts if c is not None) > 0
    weights = history.series("weights")
    assert len(weights) == 3 and math.isnan(weights[0][5])
    # the history owns copies: changing last_stats later does not change it
    opt.last_stats["weights"][0] = 123.0
    assert history.weights[-1][0] != 123.0


def test_stats_history_record_takes_task_names_and_checks_input() -> None:
    model = build(k=2)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), surgery="pcgrad", seed=0)
    history = StatsHistory()
    opt.step(dict(zip(("a", "b"), losses_of(model, 0))))
    history.record(opt)
    history.record(opt)
    assert history.names == ["a", "b"] and history.steps == [0, 1]
    with pytest.raises(ValueError, match="tasks"):
        history.append({"losses": [1.0, 2.0, 3.0], "skipped": 0})
    with pytest.raises(ValueError, match="empty"):
        history.append({})
    with pytest.raises(TypeError):
        history.append([1.0])  # type: ignore[arg-type]


def test_plot_history_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    history, _ = short_run()
    path = plot_history(history, tmp_path / "run.png", title="three tasks")
    data = (tmp_path / "run.png").read_bytes()
    assert path == str(tmp_path / "run.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1000, 1050)
    assert len(data) > 20_000, "a real figure, not an empty canvas"


def test_plot_history_two_tasks_and_errors(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model = build(k=2)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), surgery="pcgrad", seed=0)
    history = StatsHistory()
    with pytest.raises(ValueError, match="empty"):
        plot_history(history, tmp_path / "empty.png")
    for step in range(3):
        opt.zero_grad()
        opt.step(losses_of(model, step))
        history.record(opt)
    plot_history(history, tmp_path / "two.png")
    assert (tmp_path / "two.png").stat().st_size > 0
    with pytest.raises(TypeError):
        plot_history({"steps": []}, tmp_path / "x.png")  # type: ignore[arg-type]


def test_plot_history_without_matplotlib_names_the_extra(monkeypatch, tmp_path) -> None:
    history, _ = short_run(steps=2, nan_at=-1)
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e .\.\[plot\]."):
        plot_history(history, tmp_path / "run.png")
