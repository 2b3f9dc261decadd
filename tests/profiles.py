"""How many hypothesis examples a test draws, per profile (``tests/conftest.py`` loads it).

``ci`` (the default): derandomised, so every run sees the same examples, and few of them,
so that the suite stays within its time budget. ``HYPOTHESIS_PROFILE=thorough``: random
examples, :data:`THOROUGH_FACTOR` times as many for a test that sets its own count, 1000
for the others (run it with ``-m "slow or not slow"``, README "Fresh machine").
"""

from __future__ import annotations

import os

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
THOROUGH = PROFILE == "thorough"
#: A test that sets its own number of examples draws this many times more under ``thorough``.
THOROUGH_FACTOR = 10


def examples(n: int) -> int:
    """``n`` examples under the default profile, ``THOROUGH_FACTOR * n`` under ``thorough``."""
    return n * THOROUGH_FACTOR if THOROUGH else n
