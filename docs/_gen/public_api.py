"""The public surface of the package, for the API reference and its tests.

A module is public when no part of its dotted name starts with ``_``. Its public names
are its ``__all__`` when it has one, else the classes and functions it defines whose
names do not start with ``_``. Each public name is documented once, where its object is
defined (its *canonical* path); packages re-export names, and their reference pages list
them with links to that one place (:func:`names_table`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any, List

from sphinx_roles import plain_roles

import multitask_optim

MARKER = re.compile(r"<!--\s*public-names:\s*([\w.]+)\s*-->")


def public_modules() -> List[str]:
    """Every public module of the package, the package itself first."""
    out = ["multitask_optim"]
    for info in pkgutil.walk_packages(multitask_optim.__path__, "multitask_optim."):
        if _is_public(info.name):
            out.append(info.name)
    return out


def module_public(module_name: str) -> List[str]:
    """A module's public names (see the module docstring).

    Args:
        module_name: a dotted module name (imported if needed).

    Returns:
        The names, in ``__all__`` order or definition order.
    """
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module_name
    ]


def _source(module_name: str) -> str:
    """A module's source text, read without importing the module itself.

    The integrations import their framework at import time; the site must build with
    only the docs extra installed (griffe reads them statically too).
    """
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin is not None, module_name
    return Path(spec.origin).read_text(encoding="utf-8")


def _is_public(module_name: str) -> bool:
    return not any(part.startswith("_") for part in module_name.split("."))


def _public_home(defining: str, name: str, exporter: str) -> str:
    """Where a name defined in the private module ``defining`` is documented.

    A package may keep its code in private modules and list what it offers in its
    ``__all__`` (``multitask_optim.advisor``): the nearest public package above the
    definition that exports the name documents it; failing that, the public module
    ``exporter`` that re-exports it (``fsdp`` for ``_fsdp_state``'s names).
    """
    parts = defining.split(".")
    for n in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:n])
        if _is_public(package) and name in getattr(importlib.import_module(package), "__all__", ()):
            return package
    if exporter != "multitask_optim" and _is_public(exporter):
        return exporter
    raise LookupError(f"{defining}.{name}: no public module other than the package's top level exports it")


def canonical(module_name: str, name: str) -> str:
    """The dotted path where the object ``module_name.name`` is documented.

    That is where it is defined when the defining module is public. Classes and functions
    know their module; other objects (a registry instance, a constant) are found in the
    module that assigns the name at its top level. A name defined in a private module is
    documented in the nearest public package above it that lists it in ``__all__``.

    Args:
        module_name: a module that exposes ``name``.
        name: the public name.

    Returns:
        ``"package.module.name"`` of the documentation.

    Raises:
        LookupError: when no module assigns ``name``, or a private one does and no public
            package above it exports it.
    """
    obj = getattr(importlib.import_module(module_name), name)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and hasattr(obj, "__qualname__"):
        if _is_public(obj.__module__):
            return f"{obj.__module__}.{obj.__qualname__}"
        return f"{_public_home(obj.__module__, name, module_name)}.{name}"
    modules = [
        "multitask_optim",
        *(i.name for i in pkgutil.walk_packages(multitask_optim.__path__, "multitask_optim.")),
    ]
    for module in sorted(modules, key=lambda m: not _is_public(m)):
        if re.search(rf"^{re.escape(name)}\s*[:=]", _source(module), re.M):
            return (
                f"{module}.{name}"
                if _is_public(module)
                else f"{_public_home(module, name, module_name)}.{name}"
            )
    raise LookupError(f"{module_name}.{name}: no module of the package assigns it at top level")


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
    summary = (doc or "").strip().split("\n\n")[0].replace("\n", " ")
    return plain_roles(summary).replace("|", "\\|")


def names_table(module_name: str) -> str:
    """A Markdown table of a module's public names, each linked to its documentation.

    Args:
        module_name: a public module.

    Returns:
        The table (autorefs links: the build fails when a target is not documented).
    """
    module = importlib.import_module(module_name)
    lines = ["| name | documented at | summary |", "| --- | --- | --- |"]
    for name in module_public(module_name):
        target = canonical(module_name, name)
        lines.append(f"| [`{name}`][{target}] | `{target}` | {_summary(getattr(module, name))} |")
    return "\n".join(lines) + "\n"


def expand(markdown: str) -> str:
    """Replace each ``<!-- public-names: module -->`` marker with :func:`names_table`."""
    return MARKER.sub(lambda m: names_table(m.group(1)), markdown)
