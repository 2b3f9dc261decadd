"""The code blocks of the documentation, and how to run them.

A page's ```python blocks run in order as one script (one namespace per page). Two
markers on a block's first line change that:

- ``# not run: <reason>``: the block is compiled (it stays valid Python) but not run; for
  what a CPU-only test machine cannot do (several processes, a GPU) or another
  library's code shown next to ours. The reason is required.
- ``# requires: <module>[, <module>]``: run only when the modules import (an optional
  dependency, e.g. TorchJD from the ``anchors`` extra); compiled otherwise.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GEN = DOCS / "_gen"

NOT_RUN = re.compile(r"^# not run:\s*(\S.*)$")
REQUIRES = re.compile(r"^# requires:\s*(\S.*)$")
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def generator() -> Any:
    """The method-page generator (``docs/_gen/method_pages.py``), imported by path."""
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))
    import method_pages

    return method_pages


def public_api() -> Any:
    """The public-surface helpers (``docs/_gen/public_api.py``), imported by path."""
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))
    import public_api

    return public_api


def blocks(markdown: str) -> List[str]:
    """The ```python blocks of a Markdown text, in order."""
    return FENCE.findall(markdown)


def pages() -> Dict[str, str]:
    """Every page with Python blocks: the hand-written pages, the README and the
    generated method pages, by path relative to the repository."""
    out = {
        str(path.relative_to(ROOT)): path.read_text()
        for path in sorted(DOCS.rglob("*.md"))
        if GEN not in path.parents
    }
    out["README.md"] = (ROOT / "README.md").read_text()
    for path, code in generator().examples().items():  # the generated pages' one block each
        out[f"docs/{path} (generated)"] = f"```python\n{code}```\n"
    return {path: text for path, text in out.items() if blocks(text)}


@dataclass
class Ran:
    """What running one page did."""

    ran: int
    compiled_only: int
    namespace: Dict[str, Any]


def _importable(modules: str) -> bool:
    return all(importlib.util.find_spec(m.strip()) is not None for m in modules.split(","))


def run_page(name: str, markdown: str) -> Ran:
    """Run a page's blocks in order in one namespace (see the module docstring).

    Args:
        name: the page, for tracebacks and errors.
        markdown: its text.

    Returns:
        The counts and the final namespace.

    Raises:
        AssertionError: a ``# not run:`` marker without a reason.
        Exception: whatever a block raises (a DeprecationWarning included: the pages
            show current spellings).
    """
    namespace: Dict[str, Any] = {"__name__": f"docs:{name}"}
    ran = compiled = 0
    for n, block in enumerate(blocks(markdown)):
        first = block.splitlines()[0] if block.strip() else ""
        code = compile(block, f"{name} [python block {n + 1}]", "exec")
        if first.startswith("# not run"):
            assert NOT_RUN.match(first), f"{name}, block {n + 1}: '# not run:' needs a reason"
            ast.parse(block)
            compiled += 1
            continue
        requires = REQUIRES.match(first)
        if requires and not _importable(requires.group(1)):
            compiled += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            exec(code, namespace)  # noqa: S102
        ran += 1
    return Ran(ran, compiled, namespace)
