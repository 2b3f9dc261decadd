"""Griffe extension: every docstring mkdocstrings renders goes through :func:`sphinx_roles.plain_roles`."""

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
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(obj.docstring.value)
