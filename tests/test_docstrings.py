"""Every public class and function has a Google-style docstring.

Public: the names of every public module (``__all__``, else the classes and functions a
module defines without a leading ``_``; see ``docs/_gen/public_api.py``) and the public
methods those classes define. Each needs a docstring (an overriding method may inherit
its base's) with, where they apply:

- ``Args:`` naming every parameter (a class documents its constructor's; a dataclass
  may name its fields under ``Attributes:``);
- ``Returns:`` (or ``Yields:``) when the annotation says it returns something;
- ``Raises:`` when its own body raises.

A method that overrides a documented method of a base class inherits its contract:
its own docstring (if any) need not repeat ``Args:`` and ``Returns:``, but still names
what its own body raises.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from typing import Any, Callable, Iterator, List, Tuple

from docs_blocks import public_api


def _sections(doc: str) -> List[str]:
    return re.findall(r"^([A-Z][A-Za-z ]*):\s*$", doc, flags=re.M)


def _params(fn: Callable[..., Any], skip_first: bool) -> List[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    names = [
        p.name
        for p in sig.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name not in ("args", "kwargs")
    ]
    names = [n for n in names if not n.startswith("_")]  # private (a dataclass's cache field)
    return names[1:] if skip_first and names else names


def _raises(fn: Callable[..., Any]) -> bool:
    """Whether ``fn``'s own body (not a nested function) has a ``raise`` with an exception."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    top = tree.body[0]

    def walk(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            yield child
            yield from walk(child)

    return any(isinstance(n, ast.Raise) and n.exc is not None for n in walk(top))


def _returns(fn: Callable[..., Any]) -> bool:
    annotation = inspect.signature(fn).return_annotation
    return annotation not in (inspect.Signature.empty, None, "None", "NoReturn")


def _check(where: str, fn: Callable[..., Any], doc: str, params: List[str], own: bool) -> List[str]:
    out = []
    sections = _sections(doc)
    named = next((s for s in ("Args", "Attributes") if s in sections), None)
    if params and named is None:
        out.append(f"{where}: no 'Args:' for {params}")
    if named is not None and params:
        args = doc.split(f"{named}:", 1)[1]
        for name in params:
            if not re.search(rf"^\s+\**{re.escape(name)}\b.*:", args, flags=re.M):
                out.append(f"{where}: 'Args:' does not name {name!r}")
    if own and _returns(fn) and not {"Returns", "Yields"} & set(sections):
        out.append(f"{where}: no 'Returns:'")
    if own and _raises(fn) and "Raises" not in sections:
        out.append(f"{where}: raises but has no 'Raises:'")
    return out


def _members(cls: type) -> Iterator[Tuple[str, Callable[..., Any]]]:
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            yield name, value.__func__
        elif inspect.isfunction(value):
            yield name, value


def _overrides(cls: type, attr: str) -> bool:
    """Whether ``cls.attr`` overrides a method a base class documents."""
    return any(attr in vars(base) and getattr(vars(base)[attr], "__doc__", None) for base in cls.__mro__[1:])


def problems() -> List[str]:
    """Every public callable whose docstring is missing or lacks a section it needs."""
    out: List[str] = []
    seen = set()
    for module_name in public_api().public_modules():
        module = importlib.import_module(module_name)
        for name in public_api().module_public(module_name):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            where = f"{obj.__module__}.{obj.__qualname__}"
            doc = inspect.getdoc(obj) or ""
            if not doc.strip():
                out.append(f"{where}: no docstring")
                continue
            if inspect.isfunction(obj):
                out += _check(where, obj, doc, _params(obj, False), own=True)
                continue
            if "__init__" in vars(obj):
                init = vars(obj)["__init__"]
                out += _check(where, init, doc, _params(init, True), own=False)
                if _raises(init) and "Raises" not in _sections(doc):
                    out.append(f"{where}: its constructor raises but the class has no 'Raises:'")
            for attr, fn in _members(obj):
                fwhere = f"{where}.{attr}"
                fdoc = inspect.getdoc(getattr(obj, attr)) or ""
                if not fdoc.strip():
                    out.append(f"{fwhere}: no docstring")
                    continue
                if _overrides(obj, attr):
                    if _raises(fn) and "Raises" not in _sections(fdoc):
                        out.append(f"{fwhere}: raises but has no 'Raises:'")
                    continue
                skip = not isinstance(vars(obj)[attr], staticmethod)
                out += _check(fwhere, fn, fdoc, _params(fn, skip), own=True)
    return out


def test_every_public_callable_has_a_complete_docstring() -> None:
    found = problems()
    assert not found, f"{len(found)} public docstrings to complete:\n" + "\n".join(found)
