"""The host's checks of a step's values: largest magnitudes, finiteness, per-task bounds.

A step decides whether to skip, and whether combining can overflow, from a few values
read on the host (``multitask_optim._host``): every tensor's largest magnitude (NaN or
inf there means a non-finite gradient), the Grams' finiteness, and per task the largest
output gradient of the factored heads. These tests pin those values against their
definitions, including NaN and infinities, in every floating dtype.
"""

from __future__ import annotations

import math
from typing import Callable, List

import pytest
import torch
from torch import Tensor

from multitask_optim._factors import HeadFactor
from multitask_optim._host import SCALAR_VALUES, extreme_peaks, finite_values, fused_peaks, peak_magnitudes

#: Both ways of computing the peaks (the CUDA one runs here on the CPU too).
PEAKS = [peak_magnitudes, fused_peaks, extreme_peaks]

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _tensors(dtype: torch.dtype) -> List[Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (1,), (2, 2, 2)]
    return [(torch.randn(s, generator=g) * 10).to(dtype) for s in shapes]


@pytest.mark.parametrize("peaks", PEAKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_peak_magnitudes_are_the_largest_absolute_values(dtype: torch.dtype, peaks: Callable) -> None:
    tensors = _tensors(dtype)
    got = peaks(tensors)
    assert got.dtype == torch.float64 and got.shape == (len(tensors),)
    want = torch.tensor([t.double().abs().max().item() for t in tensors], dtype=torch.float64)
    assert torch.equal(got, want)


@pytest.mark.parametrize("peaks", PEAKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_peak_magnitudes_carry_nan_and_infinities(dtype: torch.dtype, bad: float, peaks: Callable) -> None:
    tensors = _tensors(dtype)
    tensors[1][3] = bad
    got = peaks(tensors).tolist()
    assert math.isnan(got[1]) if math.isnan(bad) else got[1] == math.inf
    assert all(math.isfinite(v) for i, v in enumerate(got) if i != 1)


@pytest.mark.parametrize("peaks", PEAKS)
def test_peak_magnitudes_of_mixed_dtypes(peaks: Callable) -> None:
    tensors = [t for dtype in DTYPES for t in _tensors(dtype)[:2]]
    want = [t.double().abs().max().item() for t in tensors]
    assert peaks(tensors).tolist() == want


@pytest.mark.parametrize("peaks", PEAKS)
def test_peak_magnitudes_of_complex_tensors(peaks: Callable) -> None:
    tensors = [torch.tensor([3 + 4j, -1j]), torch.tensor([0.5, -2.0])]
    assert peaks(tensors).tolist() == [5.0, 2.0]


@pytest.mark.parametrize("size", [1, SCALAR_VALUES, SCALAR_VALUES + 1, 1600])
def test_finite_values_in_python_and_in_one_tensor_op(size: int) -> None:
    values = torch.randn(size, dtype=torch.float64)
    assert finite_values(values)
    for bad in (math.nan, math.inf, -math.inf):
        spoiled = values.clone()
        spoiled[size // 2] = bad
        assert not finite_values(spoiled)


def _factor(owner: List[int], k: int, seed: int = 0) -> HeadFactor:
    g = torch.Generator().manual_seed(seed)
    o = len(owner)
    deltas = torch.randn(6, o, generator=g)
    weights = torch.randn(o, 4, generator=g) * 3
    return HeadFactor(deltas, weights.contiguous(), torch.tensor(owner), k)


def test_head_bounds_are_the_largest_column_of_each_task() -> None:
    """Tasks own columns of uneven widths, interleaved (a task reading z twice)."""
    owner = [0, 0, 1, 2, 2, 2, 0, 1, 3]
    factor = _factor(owner, k=5)  # task 4 reads z through no map
    peaks = factor.peaks()
    assert peaks is not None
    listed = peaks.tolist()
    columns = factor.deltas.abs().amax(dim=0).tolist()
    spread = max(1.0, len(owner) * factor.weights.abs().max().item())
    want = [max([c for c, t in zip(columns, owner) if t == task], default=0.0) * spread for task in range(5)]
    assert factor.bounds(listed) == pytest.approx(want, rel=1e-12)
    assert listed[-1] == factor.weights.abs().max().item()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_head_gradient_reaches_the_peaks(bad: float) -> None:
    factor = _factor([0, 1, 1, 2], k=3)
    factor.deltas[2, 2] = bad
    peaks = factor.peaks()
    assert peaks is not None
    assert not finite_values(peaks), "the host would take a step with a non-finite head gradient"
    assert finite_values(peaks[[0, 2]]), "only the task that owns the column is affected"
