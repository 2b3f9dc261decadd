"""The README's usage code runs as written, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_usage_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", _section("Usage"), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    opt = namespace["opt"]
    assert [g["task"] for g in opt.param_groups] == ["shared", "depth", "label"]
    for block in re.findall(r"```python\n(.*?)```", _section("Methods"), flags=re.S):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["opt"].param_groups[-1]["task"] == "weighting"


def test_ci_runs_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", _section("Fresh machine"), flags=re.S)
    assert len(commands) == 2, "the README holds exactly two set-up commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci


def test_demo_command_runs_the_quality_benchmark() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", _section("Fresh machine"), flags=re.S)
    assert "python -m benchmarks.quality" in commands[0]
    assert (ROOT / "benchmarks" / "quality.py").exists()
