"""Shared pytest configuration: deterministic hypothesis runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
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


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: intra-op threads only add synchronisation cost (and
    noise on a loaded machine). Benchmarks, not tests, measure multi-threaded speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The devices a test marked ``devices`` runs on: the CPU always, CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A CPU-only machine runs a marked test once, under its usual id; with CUDA present
    # every marked test gains a [cpu] and a [cuda] variant.
    if metafunc.definition.get_closest_marker("devices") and len(DEVICES) > 1:
        metafunc.fixturenames.append("_device")
        metafunc.parametrize("_device", DEVICES, indirect=True)


@pytest.fixture
def _device(request: pytest.FixtureRequest):
    """Point tests/models.py at ``request.param`` for one test."""
    import models

    saved = models.DEVICE
    models.DEVICE = torch.device(request.param)
    yield models.DEVICE
    models.DEVICE = saved
