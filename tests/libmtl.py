"""Loading one LibMTL weighting module on its own (for the anchor tests).

``import LibMTL`` runs the package's ``__init__``, which imports its trainer and
torchvision; a weighting module needs only ``LibMTL.weighting.abstract_weighting``. Stub
packages stand in for ``LibMTL`` and ``LibMTL.weighting`` while the two files are
executed, then ``sys.modules`` is restored.

Where the files come from: the installed ``LibMTL`` package (the README's test command
installs the PyPI release 1.1.5 without its dependencies), else, for the methods that are
only on LibMTL's GitHub (DB_MTL, MoCo, ExcessMTL, STCH, FAMO, ...), a LibMTL checkout or
git directory named by the ``LIBMTL_SOURCE`` environment variable. A test whose source
is missing skips, saying what to install or fetch.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Optional

import pytest

INSTALL = "pip install --no-deps libmtl==1.1.5"
FETCH = "set LIBMTL_SOURCE to a clone of https://github.com/median-research-group/LibMTL"


def installed_folder() -> Optional[Path]:
    """``LibMTL/weighting`` of the installed package (None when not installed)."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weighting"


def source_text(file: str) -> Optional[str]:
    """``LibMTL/weighting/<file>`` from ``$LIBMTL_SOURCE`` (a checkout or a git directory)."""
    given = os.environ.get("LIBMTL_SOURCE")
    if not given:
        return None
    source = Path(given)
    if (source / "LibMTL" / "weighting" / file).exists():
        return (source / "LibMTL" / "weighting" / file).read_text()
    try:
        shown = subprocess.run(
            ["git", f"--git-dir={source}", "show", f"HEAD:LibMTL/weighting/{file}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return shown.stdout if shown.returncode == 0 else None


def load_weighting(name: str, tmp: Optional[Path] = None) -> Any:
    """LibMTL's module ``LibMTL.weighting.<name>``: from the installed package, else from
    ``$LIBMTL_SOURCE`` (written under ``tmp``); skips when neither has it."""
    installed = installed_folder()
    if installed is not None and (installed / f"{name}.py").exists():
        folder = installed
    else:
        if installed is None:
            why = f"LibMTL is not installed: {INSTALL} (and, for the methods only on its GitHub, {FETCH})"
        else:
            why = f"LibMTL's {name} is not in its PyPI release: {FETCH}"
        if tmp is None:
            pytest.skip(why)
        texts = {}
        for file in ("abstract_weighting.py", f"{name}.py"):
            local = installed / file if installed is not None else None
            texts[file] = local.read_text() if local is not None and local.exists() else source_text(file)
            if texts[file] is None:
                pytest.skip(why)
        folder = tmp / "libmtl_weighting"
        folder.mkdir(exist_ok=True)
        for file, text in texts.items():
            (folder / file).write_text(text)
    try:
        return load_weighting_module(folder, name)
    except ImportError as err:  # pragma: no cover - depends on the LibMTL version
        pytest.skip(f"LibMTL weighting {name} cannot be loaded alone: {err}")


def load_weighting_module(folder: Path, name: str) -> Any:
    """The module ``LibMTL.weighting.<name>`` from ``folder`` (which holds
    ``abstract_weighting.py`` and ``<name>.py``). ImportError propagates."""
    keys = ["LibMTL", "LibMTL.weighting", "LibMTL.weighting.abstract_weighting", f"LibMTL.weighting.{name}"]
    saved = {k: sys.modules.get(k) for k in keys}
    try:
        pkg, sub = types.ModuleType("LibMTL"), types.ModuleType("LibMTL.weighting")
        pkg.__path__, sub.__path__ = [str(folder.parent)], [str(folder)]
        sys.modules["LibMTL"], sys.modules["LibMTL.weighting"] = pkg, sub
        module: Any = None
        for mod_name in ("abstract_weighting", name):
            full = f"LibMTL.weighting.{mod_name}"
            spec = importlib.util.spec_from_file_location(full, folder / f"{mod_name}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            spec.loader.exec_module(module)
        return module
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
