"""mkdocs hooks: the pages the site generates at build time.

- ``methods/index.md`` and one page per registered method (:mod:`method_pages`), and the
  "Methods" entry of the navigation filled with them;
- ``changelog.md`` from the repository's ``CHANGELOG.md``;
- the benchmark figures of ``benchmarks/results/`` under ``benchmarks/`` in the site.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))

import method_pages  # noqa: E402
import public_api  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def on_config(config: Any, **kwargs: Any) -> Any:
    """Fill the "Methods" navigation entry with the index and every method's page.

    Args:
        config: the mkdocs configuration.
        **kwargs: mkdocs' other hook arguments (unused).

    Returns:
        The configuration.

    Raises:
        ValueError: when ``mkdocs.yml``'s navigation has no "Methods" entry.
    """
    for n, entry in enumerate(config["nav"] or []):
        if isinstance(entry, dict) and "Methods" in entry:
            config["nav"][n] = {"Methods": method_pages.nav()}
            return config
    raise ValueError("mkdocs.yml: the navigation needs a 'Methods' entry for the generated method pages")


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    """Add the generated pages, the changelog and the benchmark figures.

    Args:
        files: the site's files so far.
        config: the mkdocs configuration.
        **kwargs: mkdocs' other hook arguments (unused).

    Returns:
        The files, with the generated ones added.
    """
    for path, text in method_pages.pages().items():
        files.append(File.generated(config, path, content=text))
    files.append(File.generated(config, "changelog.md", content=(ROOT / "CHANGELOG.md").read_text()))
    for image in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{image.name}", abs_src_path=str(image)))
    return files


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Expand ``<!-- public-names: module -->`` markers into tables of linked names.

    Args:
        markdown: a page's Markdown.
        **kwargs: mkdocs' other hook arguments (unused).

    Returns:
        The Markdown with every marker replaced.
    """
    return public_api.expand(markdown)
