"""Smoke test of the training-quality benchmark (``benchmarks.quality``) at tiny sizes.

Runs the harness in-process (1 seed, a few steps, 2-3 methods per suite) and checks the
JSON it writes (no absolute path in it, nothing written into the repository), Delta_m%
on hand-made numbers, that the toy's batched starts follow the same trajectories as
separate runs, that every method's argument builder gives a working optimizer, and the
toy's Pareto set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason='the MultiDigits suite needs scikit-learn (pip install -e ".[test]")')

from benchmarks.quality_data import TOY_STARTS, toy_losses, toy_pareto_set, toy_stationarity  # noqa: E402
from benchmarks.quality_methods import ALL_METHODS, METHODS, MethodContext, MethodSettings  # noqa: E402
from benchmarks.quality_report import delta_m, summarise_suite  # noqa: E402
from benchmarks.quality_suites import DigitsSuite, DigitsSuiteConfig, ToyConfig  # noqa: E402
from benchmarks.quality_train import Config, toy_run  # noqa: E402
from multitask_optim import MultiTaskOptimizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_delta_m_by_hand():
    higher = {"a": True, "b": True}
    # task a: accuracy 0.9 vs 0.8 is 12.5 % better -> -12.5; task b unchanged -> 0
    assert delta_m({"a": 0.9, "b": 0.8}, {"a": 0.8, "b": 0.8}, higher) == pytest.approx(-6.25)
    # mixed directions: accuracy +12.5 % (-12.5) and an error 0.5 vs 0.4, 25 % worse (+25)
    mixed = delta_m({"acc": 0.9, "err": 0.5}, {"acc": 0.8, "err": 0.4}, {"acc": True, "err": False})
    assert mixed == pytest.approx((-12.5 + 25.0) / 2)
    assert delta_m({"a": 0.8}, {"a": 0.8}, {"a": True}) == 0.0
    with pytest.raises(ValueError, match="baseline"):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": False})
    with pytest.raises(ValueError, match="tasks differ"):
        delta_m({"a": 1.0}, {"b": 1.0}, {"a": False})


def test_summary_uses_the_seed_mean_single_task_baseline():
    suite = DigitsSuite(DigitsSuiteConfig())
    runs = []
    for seed, (s_left, s_right, m_left, m_right) in enumerate([(0.8, 0.6, 0.9, 0.6), (0.6, 0.6, 0.7, 0.3)]):
        runs.append(_run("single:0", seed, {"left": _acc(s_left)}))
        runs.append(_run("single:1", seed, {"right": _acc(s_right)}))
        runs.append(_run("equal", seed, {"left": _acc(m_left), "right": _acc(m_right)}))
    section = summarise_suite(suite, runs, ["equal"])
    assert section["single_task"]["left"]["accuracy"]["mean"] == pytest.approx(0.7)
    entry = section["methods"]["equal"]
    # baselines: left 0.7, right 0.6 (means over seeds)
    want = [-100 / 2 * ((0.9 - 0.7) / 0.7 + 0.0), -100 / 2 * ((0.7 - 0.7) / 0.7 + (0.3 - 0.6) / 0.6)]
    assert [p["delta_m"] for p in entry["per_seed"]] == pytest.approx(want)
    assert entry["delta_m"]["mean"] == pytest.approx(sum(want) / 2)
    assert entry["delta_m"]["std"] == pytest.approx(abs(want[0] - want[1]) / math.sqrt(2))
    assert entry["summary"]["right"]["accuracy"]["mean"] == pytest.approx(0.45)


def _acc(a: float) -> dict:
    return {"accuracy": a, "loss": 1.0 - a}


def _run(method: str, seed: int, metrics: dict) -> dict:
    return {"suite": "multidigits", "method": method, "seed": seed, "metrics": metrics, "ms_per_step": 1.0}


def test_demo_quick_run_on_a_fresh_copy_writes_json_tables_and_plots(tmp_path):
    """The README's first command on a fresh clone, in its quick mode: a copy of the
    tracked files (no ``benchmarks/out/`` yet), ``python -m benchmarks.quality --quick``
    run in it as a user would, which must end, leave ``git status`` clean and write its
    JSON, tables and plots (the PCGrad diagnostics plot included) into ``benchmarks/out/``."""
    repo = fresh_copy(tmp_path / "clone")
    assert not (repo / "benchmarks" / "out").exists()
    argv = ["--quick", "--no-progress", "--methods", "equal,pcgrad,mgda-ub"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", *argv],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert git(repo, "status", "--porcelain") == "", "the demo left the checkout dirty"
    assert git(repo, "diff", "--stat", "HEAD") == ""
    assert "Δm%" in proc.stdout and "reached Pareto set" in proc.stdout
    out = repo / "benchmarks" / "out"
    assert (out / "quality_diagnostics.png").stat().st_size > 0

    doc = json.loads((out / "quality.json").read_text())
    assert {"config", "machine", "suites", "wall_seconds", "command"} <= set(doc)
    assert set(doc["suites"]) == {"multidigits", "scale", "toy"}
    for name, tasks in (
        ("multidigits", ["left", "right"]),
        ("scale", ["sigma=1", "sigma=10", "sigma=100", "sigma=1000"]),
    ):
        section = doc["suites"][name]
        assert section["tasks"] == tasks
        assert section["seeds"] == [0]
        assert set(section["single_task"]) == set(tasks)
        assert list(section["methods"]) == ["equal", "pcgrad", "mgda-ub"]
        primary = section["primary_metric"]["name"]
        for entry in section["methods"].values():
            assert set(entry["delta_m"]) == {"mean", "std", "n"} and entry["delta_m"]["n"] == 1
            assert math.isfinite(entry["delta_m"]["mean"])
            (run,) = entry["per_seed"]
            assert run["seed"] == 0 and run["steps"] >= 1
            assert set(run["metrics"]) == set(tasks)
            baseline = {t: section["single_task"][t][primary]["mean"] for t in tasks}
            higher = {t: section["primary_metric"]["higher_is_better"] for t in tasks}
            prim = {t: run["metrics"][t][primary] for t in tasks}
            assert run["delta_m"] == pytest.approx(delta_m(prim, baseline, higher))
    assert (
        doc["suites"]["multidigits"]["methods"]["mgda-ub"]["per_seed"][0]["gradient_mode"] == "representation"
    )
    toy = doc["suites"]["toy"]
    assert len(toy["pareto_set"]) > 10 and len(toy["pareto_front"]) == len(toy["pareto_set"])
    for entry in toy["methods"].values():
        assert [r["start"] for r in entry["runs"]] == [list(s) for s in TOY_STARTS]
        assert entry["reached"] == sum(r["reached_pareto"] for r in entry["runs"])
        for r in entry["runs"]:
            assert r["trajectory"][0] == list(r["start"]) and r["trajectory"][-1] == r["final"]
            assert len(r["losses"]) == 2 and isinstance(r["reached_pareto"], bool)
    assert (out / "quality.md").read_text().count("| method |") == 3
    for png in (
        "quality_delta_m.png",
        "quality_toy.png",
        "quality_toy_objectives.png",
        "quality_diagnostics.png",
    ):
        assert (out / png).stat().st_size > 0
        assert png in doc["plots"]
    _assert_no_absolute_path(doc, repo)
    assert str(repo) not in (out / "quality.md").read_text()


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def fresh_copy(dest: Path) -> Path:
    """The checkout's tracked files (as they are in the work tree) in a new git repository
    at ``dest``, committed: what a fresh clone of this state looks like."""
    if shutil.which("git") is None:
        pytest.skip("needs git (the copy is made from the tracked files)")
    try:
        tracked = git(REPO, "ls-files", "-z").split("\0")
    except subprocess.CalledProcessError:
        pytest.skip("not a git checkout: install from a clone of the repository to run this test")
    for name in filter(None, tracked):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the work tree is left out, as a commit would
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(
        dest,
        "-c",
        "user.name=test",
        "-c",
        "user.email=test@invalid",
        "-c",
        "commit.gpgsign=false",
        "commit",
        "-q",
        "-m",
        "copy",
    )
    return dest


def _assert_no_absolute_path(doc, tmp_path) -> None:
    def strings(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield str(k)
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    for text in strings(doc):
        assert not os.path.isabs(text), f"absolute path in the JSON: {text!r}"
        assert str(tmp_path) not in text and str(REPO) not in text, f"local path in the JSON: {text!r}"


#: PCGrad by default; MGDA and per-task Adam + PCGrad (other states in the same blocks) slow-only.
@pytest.mark.parametrize(
    "method",
    [
        "pcgrad",
        pytest.param("mgda", marks=pytest.mark.slow),
        pytest.param("adam-pre+pcgrad", marks=pytest.mark.slow),
    ],
)
def test_toy_starts_in_blocks_equal_separate_runs(method):
    cfg = Config(toy=ToyConfig(steps=40, lr=0.05))
    batched = toy_run(method, cfg)
    spec = METHODS[method]
    for s, start in enumerate(TOY_STARTS):
        x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        opt = MultiTaskOptimizer(
            torch.optim.Adam([x], lr=cfg.toy.lr), surgery=spec.surgery, precondition=spec.precondition, seed=0
        )
        for _ in range(cfg.toy.steps):
            opt.zero_grad()
            opt.step(list(toy_losses(x)))
        assert batched[s]["final"] == pytest.approx(x.detach().tolist(), abs=1e-12)


def test_every_method_builds_its_optimizer():
    # each row of the table carries its own argument builder: all of them construct
    w = torch.nn.Linear(3, 3)
    heads = [torch.nn.Linear(3, 1) for _ in range(2)]
    params = [*w.parameters(), *heads[0].parameters(), *heads[1].parameters()]
    ctx = MethodContext(
        num_tasks=2,
        settings=MethodSettings(),
        kind="regression",
        first_losses=[1.0, 4.0],
        total_steps=10,
        last_shared=lambda: list(w.parameters()),
    )
    for method in ALL_METHODS:
        kwargs = method.optimizer_kwargs(ctx)
        opt = MultiTaskOptimizer(method.make_inner(params, 1e-3, 1e-3), task_names=["a", "b"], **kwargs)
        x = torch.randn(4, 3)
        z = w(x)
        opt.zero_grad()
        opt.step({"a": heads[0](z).pow(2).mean(), "b": heads[1](z).pow(2).mean()})
    static = METHODS["static"].optimizer_kwargs(ctx)["weighting_kwargs"]["weights"]
    assert static == pytest.approx([1.6, 0.4])  # 1/L_i(0), normalised to sum K


def test_toy_pareto_set():
    pts = toy_pareto_set()
    assert pts[0][0] == pytest.approx(-7.0) and pts[-1][0] == pytest.approx(7.0)
    middle = pts[len(pts) // 2]
    assert middle[0] == pytest.approx(0.0, abs=1e-12)
    assert middle[1] == pytest.approx(-8.3552, abs=1e-4)  # the mark in the CAGrad paper's plot code
    assert max(toy_stationarity(p) for p in pts) < 1e-9
    # each point minimises its weighted sum locally: no neighbour is better
    for i in (0, 50, 100, 150, 200):
        a = i / 200
        x = torch.tensor(pts[i], dtype=torch.float64)
        l1, l2 = toy_losses(x)
        best = a * l1 + (1 - a) * l2
        for d in ((0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)):
            m1, m2 = toy_losses(x + torch.tensor(d, dtype=torch.float64))
            assert a * m1 + (1 - a) * m2 >= best
