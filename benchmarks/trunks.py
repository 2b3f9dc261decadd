"""The shared trunks of every benchmark, defined once and parametrised.

Both the training-quality suites (:mod:`benchmarks.quality_data`) and the speed
workloads (:mod:`benchmarks.workloads`) build their trunks here, so a layer added or
re-ordered changes both alike. Layers are created in a fixed order, so a seeded
``torch.manual_seed`` before the call gives bitwise-identical weights.
"""

from __future__ import annotations

from typing import List, Sequence

from torch import nn


def mlp_trunk(in_dim: int, widths: Sequence[int]) -> nn.Sequential:
    """``Linear + ReLU`` per entry of ``widths``: ``in_dim -> widths[0] -> ... -> widths[-1]``."""
    layers: List[nn.Module] = []
    width_in = in_dim
    for width in widths:
        layers += [nn.Linear(width_in, width), nn.ReLU()]
        width_in = width
    return nn.Sequential(*layers)


def cnn_trunk(in_channels: int, image: int, channels: Sequence[int], hidden: int) -> nn.Sequential:
    """``(Conv3x3(pad 1) + ReLU + MaxPool2) per channel count``, then ``Flatten + Linear(., hidden) + ReLU``.

    Each pool halves the side, so the flattened width is ``channels[-1] * (image // 2**n)^2``
    (e.g. 3x32x32 with 32/64/64 channels: 64 * 4 * 4 = 1024).
    """
    layers: List[nn.Module] = []
    c_in = in_channels
    for c_out in channels:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c_out
    side = image // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.ReLU()]
    return nn.Sequential(*layers)


def last_linear(trunk: nn.Module) -> nn.Linear:
    """The trunk's last ``Linear`` layer (GradNorm's ``W``: the last shared layer)."""
    linears = [m for m in trunk.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the trunk has no Linear layer")
    return linears[-1]
