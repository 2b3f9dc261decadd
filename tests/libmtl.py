"""Loading one LibMTL weighting module on its own (for the anchor tests).

``import LibMTL`` runs the package's ``__init__``, which imports its trainer and
torchvision; a weighting module needs only ``LibMTL.weighting.abstract_weighting``. Stub
packages stand in for ``LibMTL`` and ``LibMTL.weighting`` while the two files are
executed, then ``sys.modules`` is restored.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


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
