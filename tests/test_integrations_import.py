"""The package and ``multitask_optim.integrations`` import without any framework; a
framework module used without its framework raises an ImportError naming the extra.

One fresh interpreter (where importing the frameworks fails) runs every check and
reports back as JSON: importing torch once is the cost of this test."""

from __future__ import annotations

import json
import subprocess
import sys

from ranks import HANG_TIMEOUT_S

CHECK = """
import importlib, json, sys
for name in ("transformers", "accelerate", "lightning"):
    sys.modules[name] = None  # as if not installed
import multitask_optim, multitask_optim.integrations
out = {"package": multitask_optim.MultiTaskOptimizer.__name__}
for module in ("transformers", "lightning"):
    try:
        importlib.import_module("multitask_optim.integrations." + module)
        out[module] = None
    except ImportError as error:
        out[module] = str(error)
print(json.dumps(out))
"""


def test_imports_without_the_frameworks() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["package"] == "MultiTaskOptimizer"
    for extra in ("transformers", "lightning"):
        assert out[extra] is not None and f"pip install -e '.[{extra}]'" in out[extra]
