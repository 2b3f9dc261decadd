"""Shared pytest configuration: deterministic hypothesis runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

# ``tests/reference.py`` (the vector-loop references) is importable as ``reference``
# whichever way pytest is told to import the test modules.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# Derandomised so that the suite is deterministic: the same examples on every run.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60)

# Many more examples, for an occasional deeper local run: HYPOTHESIS_PROFILE=thorough.
settings.register_profile("thorough", derandomize=False, deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
