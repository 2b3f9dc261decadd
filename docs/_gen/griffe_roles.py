"""Griffe extension for the API reference.

- Every docstring mkdocstrings renders goes through :func:`sphinx_roles.plain_roles`.
- A module-level constant documented the Sphinx way, with ``#:`` comment lines right
  above its assignment, gets that comment as its docstring (griffe reads only string
  literals after the assignment), so constants a package exports in ``__all__``
  (``multitask_optim.advisor.IMBALANCE``) are documented where they are written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sphinx_roles import plain_roles  # noqa: E402


class PlainRoles(griffe.Extension):
    """Rewrites every loaded object's docstring with :func:`plain_roles`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring in place (called by griffe for every object).

        Args:
            obj: the object griffe just loaded.
            **kwargs: the rest of griffe's hook arguments (unused).
        """
        if obj.docstring is None and obj.is_attribute:
            comment = _sphinx_comment(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(obj.docstring.value)


def _sphinx_comment(obj: griffe.Object) -> str:
    """The ``#:`` comment lines right above ``obj``'s assignment, without the markers."""
    if not obj.lineno or not isinstance(obj.filepath, Path):
        return ""
    lines = obj.filepath.read_text(encoding="utf-8").splitlines()[: obj.lineno - 1]
    found = []
    while lines and lines[-1].lstrip().startswith("#:"):
        found.insert(0, lines.pop().lstrip()[2:].strip())
    text = " ".join(found)
    return text[:1].upper() + text[1:] if text else ""
