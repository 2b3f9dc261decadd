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
from typing import Dict, List

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: example -> the command-line arguments of a run that takes seconds
BUDGETS: Dict[str, List[str]] = {
    "quickstart.py": ["--steps", "3"],
}
#: example -> what its output must show
SHOWS: Dict[str, List[str]] = {
    "quickstart.py": ["adam (sum of losses)", "pcgrad", "gradvac", "per-task adam", "per-task adam + pcgrad"],
}
#: example -> the test that runs it to its end
RUN_ELSEWHERE: Dict[str, str] = {
    "lightning_multitask.py": "tests/test_lightning.py::test_the_example_runs_to_its_end",
}


def test_every_example_is_run() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(BUDGETS) | set(RUN_ELSEWHERE), "give the new example a budget here"
    for where in RUN_ELSEWHERE.values():
        path, name = where.split("::")
        assert f"def {name}(" in (EXAMPLES.parent / path).read_text(), where


@pytest.mark.parametrize("script", sorted(BUDGETS))
def test_example_runs_to_its_end(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [script, *BUDGETS[script]])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # an example may choose its own thread count
    printed = capsys.readouterr().out
    for text in SHOWS[script]:
        assert text in printed, f"{script} did not print {text!r}"
