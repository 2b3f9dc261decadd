"""Every script under ``examples/`` runs to its end, on a small budget.

Each example is run as a user runs it (``python examples/<name>.py <budget>``, through
``runpy`` so that its ``__main__`` block and argument parsing run too) with a budget
argument that keeps it to seconds. An example whose run needs an optional framework is
run by that framework's test module instead (named in :data:`RUN_ELSEWHERE`); a new
example that is in neither table fails :func:`test_every_example_is_run`.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: (example, command-line arguments of a run that takes seconds, what its output must show)
RUNS: List[Tuple[str, List[str], List[str]]] = [
    (
        "quickstart.py",
        ["--steps", "3"],
        ["adam (sum of losses)", "pcgrad", "gradvac", "per-task adam", "per-task adam + pcgrad"],
    ),
    ("accelerate_multitask.py", ["--steps", "2"], ["step 0:", "step 1:"]),
    ("accelerate_multitask.py", ["--steps", "2", "--mode", "weights_only"], ["step 0:", "step 1:"]),
]
#: example -> the optional package it needs (in the ``test`` extra)
NEEDS: Dict[str, str] = {"accelerate_multitask.py": "accelerate"}
#: example -> the test that runs it to its end
RUN_ELSEWHERE: Dict[str, str] = {
    "lightning_multitask.py": "tests/test_lightning.py::test_the_example_runs_to_its_end",
}


def test_every_example_is_run() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == {script for script, _, _ in RUNS} | set(RUN_ELSEWHERE), (
        "give the new example a budget here"
    )
    for where in RUN_ELSEWHERE.values():
        path, name = where.split("::")
        assert f"def {name}(" in (EXAMPLES.parent / path).read_text(), where


@pytest.mark.parametrize(("script", "argv", "shows"), RUNS, ids=[" ".join([s, *a]) for s, a, _ in RUNS])
def test_example_runs_to_its_end(
    script: str,
    argv: List[str],
    shows: List[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if script in NEEDS:
        pytest.importorskip(NEEDS[script], reason=f'{script} needs {NEEDS[script]}: pip install -e ".[test]"')
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")  # conftest restores the thread count
    printed = capsys.readouterr().out
    for text in shows:
        assert text in printed, f"{script} did not print {text!r}"
