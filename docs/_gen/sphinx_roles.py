"""Docstrings written with Sphinx roles, read as Markdown.

The package's docstrings are Google style and name other objects the Sphinx way
(``:class:`~.base.Aggregator```, ``:func:`step_stats```) and end a paragraph that
introduces a literal block with ``::``. mkdocstrings renders Markdown, where both would
show as typed. :func:`plain_roles` rewrites them as code spans (the object's last name when
the target starts with ``~``, the target without its leading dots otherwise) and turns a
trailing ``::`` into ``:``, so the indented block that follows is a code block.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|ref):`([^`]+)`")
LITERAL = re.compile(r"(?<=\S)::$", flags=re.M)


def _target(match: re.Match) -> str:
    target = match.group(1).strip()
    if "<" in target and target.endswith(">"):  # :ref:`title <target>`
        target = target.split("<", 1)[0].strip()
    elif target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target.lstrip('.')}`"


def plain_roles(text: str) -> str:
    """``text`` with Sphinx roles as code spans and trailing ``::`` as ``:``.

    Args:
        text: a docstring (or a part of one).

    Returns:
        The rewritten text.
    """
    return LITERAL.sub(":", ROLE.sub(_target, text))
