"""The README is short, its commands are CI's, and it lists every method.

Its Python blocks run with the documentation's (``tests/test_docs_examples.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

from docs_blocks import generator

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
#: The README says what the library does and points to the documentation site.
MAX_LINES = 250


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _commands() -> List[str]:
    return re.findall(r"```bash\n(.*?)\n```", _section("Fresh machine"), flags=re.S)


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= MAX_LINES


def test_ci_runs_readme_test_command() -> None:
    commands = _commands()
    assert len(commands) == 2, "the README holds exactly two set-up commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci


def test_demo_command_runs_the_quality_benchmark() -> None:
    assert "python -m benchmarks.quality" in _commands()[0]
    assert (ROOT / "benchmarks" / "quality.py").exists()


def test_getting_started_shows_the_readme_commands() -> None:
    page = (ROOT / "docs" / "getting-started.md").read_text()
    for command in _commands():
        assert command.strip() in page, f"docs/getting-started.md lacks the README's {command!r}"


def test_readme_lists_every_registered_method_with_its_source() -> None:
    listed = _section("Methods")
    library = [m for m in generator().methods() if m[2].__module__.startswith("multitask_optim.")]
    for kind, name, cls in library:
        source = cls.__module__.replace(".", "/") + ".py"
        assert f"[`{name}`]({source})" in listed, f"README's Methods table lacks {kind.arg}={name!r}"
        assert (ROOT / source).exists()
    rows = set(re.findall(r"^\| \[`([a-z_]+)`\]\(", listed, flags=re.M))
    assert rows == {name for _, name, _ in library}, "the Methods table names a method that is not registered"


def test_readme_links_resolve() -> None:
    prose = re.sub(r"```.*?```", "", README, flags=re.S)  # code is not links
    prose = re.sub(r"`[^`]*`", "", prose)
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", prose):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to a missing file: {target}"
