"""Every Python block of the documentation runs: each page's blocks in order, as one script.

Pages: ``docs/**/*.md``, the README and the generated method pages (their examples).
The markers a block may start with (``# not run: <reason>``, ``# requires: <module>``)
are described in :mod:`docs_blocks`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import torch
from docs_blocks import pages, run_page

from multitask_optim import AGGREGATORS, WEIGHTINGS

PAGES = pages()


@pytest.fixture
def registries() -> Iterator[None]:
    """Pages register example methods: remove them afterwards so no other test sees them."""
    saved = dict(AGGREGATORS.classes), dict(WEIGHTINGS.classes)
    try:
        yield
    finally:
        for registry, classes in zip((AGGREGATORS, WEIGHTINGS), saved):
            registry.classes.clear()
            registry.classes.update(classes)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_blocks_run(
    page: str, registries: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # examples may write files (a plot, a checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. the automatic partition's notes
        result = run_page(page, PAGES[page])
    assert result.ran + result.compiled_only == len(PAGES[page].split("```python")) - 1


def test_every_generated_method_page_has_a_running_example() -> None:
    generated = [p for p in PAGES if p.endswith("(generated)")]
    from docs_blocks import generator

    assert len(generated) == len(generator().methods()), "a method page without a Python example"


def test_markers_are_honoured() -> None:
    text = (
        "```python\nx = 1\n```\n"
        "```python\n# not run: needs two processes\nraise RuntimeError('never run')\n```\n"
        "```python\n# requires: a_module_that_does_not_exist\nraise RuntimeError('never run')\n```\n"
        "```python\ny = x + 1\n```\n"
    )
    result = run_page("example", text)
    assert (result.ran, result.compiled_only, result.namespace["y"]) == (2, 2, 2)
    with pytest.raises(AssertionError, match="needs a reason"):
        run_page("bad", "```python\n# not run\nx = 1\n```\n")
    with pytest.raises(SyntaxError):
        run_page("bad", "```python\n# not run: shown only\nx = (\n```\n")
    with pytest.raises(DeprecationWarning):
        run_page("old", "```python\nimport warnings\nwarnings.warn('old', DeprecationWarning)\n```\n")


def _torchjd_pair() -> Dict[str, Dict[str, Any]]:
    """The TorchJD porting page's before (TorchJD) and after (ours) namespaces, on the same data."""
    text = PAGES["docs/guides/porting-torchjd.md"]
    from docs_blocks import blocks

    before = next(b for b in blocks(text) if b.startswith("# requires: torchjd"))
    after = next(b for b in blocks(text) if "MultiTaskOptimizer(" in b and "upgrad" in b)
    ours: Dict[str, Any] = {}
    exec(compile(after, "porting-torchjd (ours)", "exec"), ours)  # noqa: S102
    theirs: Dict[str, Any] = {"batches": ours["batches"]}
    exec(compile(before, "porting-torchjd (TorchJD)", "exec"), theirs)  # noqa: S102
    return {"ours": ours, "theirs": theirs}


def test_torchjd_before_and_after_train_the_same_parameters() -> None:
    pytest.importorskip("torchjd")
    pair = _torchjd_pair()
    for name in ("shared", "head1", "head2"):
        for p, q in zip(pair["ours"][name].parameters(), pair["theirs"][name].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
