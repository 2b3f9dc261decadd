"""Shared pytest configuration: deterministic hypothesis runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

import multitask_optim._engine as engine

# ``tests/reference.py`` (the vector-loop references) is importable as ``reference``
# whichever way pytest is told to import the test modules.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# Derandomised so that the suite is deterministic: the same examples on every run.
# Tests that set their own number of examples scale it with ``profiles.examples``.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60)

# Many more random examples, for an occasional deeper run (README "Fresh machine"):
# HYPOTHESIS_PROFILE=thorough python -m pytest -m "slow or not slow"
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


@pytest.fixture(autouse=True)
def _still_one_thread(_one_thread: None):
    """A test that runs code choosing its own thread count (a benchmark's ``main``, an
    example) must not leave it to the tests after it: with two threads on tiny ops
    every later test ran several times slower, far more on a loaded machine."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


class EngineClock:
    """A deterministic stand-in for the wall clock ``gradient_mode="auto"`` times its paths
    with: every reading advances it by 1 ms, so every measured path costs the same 1 ms
    (ties go to the earlier path in ``MODES``) unless a test charges a path more with
    :meth:`charge`. No test depends on the machine's speed or load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1e-3
        return self.now

    def charge(self, ms: float) -> None:
        """Let ``ms`` more milliseconds pass (a path's fixed cost)."""
        self.now += ms / 1e3


@pytest.fixture(autouse=True)
def engine_clock(monkeypatch: pytest.MonkeyPatch) -> EngineClock:
    """Every test times ``auto``'s paths on :class:`EngineClock`, never on the wall clock."""
    clock = EngineClock()
    monkeypatch.setattr(engine, "clock", clock)
    return clock


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
