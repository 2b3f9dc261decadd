"""The documentation site builds with ``mkdocs build --strict`` and covers the public API.

The build (a subprocess, into a temporary folder) fails on any warning: a broken link or
anchor, a page missing from the navigation, a cross-reference to an undocumented object,
a docstring whose ``Args:`` name a parameter the signature lacks. The tests after it read
the built site: every public name of every public module is in the reference (its
``objects.inv``), and every registered method has its page.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Set

import pytest
from docs_blocks import ROOT, generator, public_api

from multitask_optim import AGGREGATORS, PRECONDITIONERS, WEIGHTINGS


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra (part of the test extra) builds the site")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra builds the API reference")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    problems = [line for line in done.stderr.splitlines() if "WARNING" in line or "Error" in line]
    assert done.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(
        problems or [done.stderr[-3000:]]
    )
    return out


def _inventory(site: Path) -> Set[str]:
    """The identifiers of ``objects.inv`` (Sphinx inventory v2: four header lines, then zlib)."""
    raw = (site / "objects.inv").read_bytes()
    body = raw.split(b"\n", 4)[4]
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines() if line}


def test_site_builds_strict(site: Path) -> None:
    assert (site / "index.html").exists() and (site / "api" / "index.html").exists()


def test_every_public_name_is_in_the_reference(site: Path) -> None:
    documented = _inventory(site)
    missing = [
        f"{module}.{name} (documented at {public_api().canonical(module, name)})"
        for module in public_api().public_modules()
        for name in public_api().module_public(module)
        if public_api().canonical(module, name) not in documented
    ]
    assert not missing, "public names missing from the API reference:\n" + "\n".join(missing)


def test_every_registered_method_has_a_page(site: Path) -> None:
    for kind in generator().KINDS:
        for name in kind.registry:
            assert (site / "methods" / kind.folder / name / "index.html").exists(), f"{kind.arg}={name!r}"


def test_every_registered_method_documents_the_required_sections() -> None:
    methods = generator()
    problems = [p for kind, name, cls in methods.methods() for p in methods.problems(kind, name, cls)]
    assert not problems, "method docstrings lack what their page needs:\n" + "\n".join(problems)


def test_the_generator_covers_every_registry() -> None:
    kinds = {kind.arg: kind.registry for kind in generator().KINDS}
    assert kinds == {"surgery": AGGREGATORS, "weighting": WEIGHTINGS, "precondition": PRECONDITIONERS}


def test_a_method_without_the_sections_is_reported() -> None:
    methods = generator()
    kind = methods.KINDS[0]

    class Bare(AGGREGATORS.base):  # type: ignore[misc]
        """A method without its page's sections."""

        name = "bare"

        def __init__(self, strength: float) -> None:
            self.strength = strength

        def aggregate(self, gram, state, ctx):  # type: ignore[no-untyped-def]
            return gram.sum(-1), state

    found = "\n".join(methods.problems(kind, "bare", Bare))
    for what in (*methods.REQUIRED, "'strength' has no 'Args:' entry", "needs an 'Example:' section"):
        assert what in found, what


def test_docs_extra_is_part_of_the_test_extra() -> None:
    text = (ROOT / "pyproject.toml").read_text()

    def extra(name: str) -> Set[str]:
        match = re.search(rf"^{name} = \[(.*?)\]", text, flags=re.S | re.M)
        assert match, f"pyproject.toml has no '{name}' extra"
        return set(re.findall(r'"([^"]+)"', match.group(1)))

    assert extra("docs") <= extra("test"), "the test extra must install what the docs build needs"
