"""Aggregation time (Gram -> coefficients) of every registered aggregator at a given K.

Median over many calls, one thread, on the Gram matrix of K random Gaussian rows
(P = 4K, a common component so that some pairs conflict and some do not)::

    python -m benchmarks.aggregation_time --k 16
    python -m benchmarks.aggregation_time --k 16 --device cpu

The Gram is handed to each aggregator on ``--device`` (default: CUDA when available),
so the time includes any transfer the aggregator makes (CUDA synchronised around every
call). In a training step the library hands the aggregator the float64 Gram on the host
(the K x K problems are solved there whatever the device), so ``--device cpu`` is the
figure a step pays. The JSON records the device and the torch, CUDA and cuDNN versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any, Dict, Union

import torch

from multitask_optim.aggregators import AGGREGATORS, AggregationContext

from .common import add_device_argument, machine_info
from .speed_timing import step_timer


def measure(
    k: int, repeat: int = 300, seed: int = 0, device: Union[str, torch.device] = "cpu"
) -> Dict[str, float]:
    """Median ms per call of every registered aggregator on one ``(1, K, K)`` Gram on ``device``."""
    torch.set_num_threads(1)
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(k, 4 * k, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        1, 4 * k, generator=g, dtype=torch.float64
    )
    gram = (jac @ jac.T).unsqueeze(0).to(device)
    ctx = AggregationContext(
        generator=torch.Generator().manual_seed(0), losses=torch.ones(k, dtype=torch.float64, device=device)
    )
    timed = step_timer(device)
    out = {}
    for name, cls in sorted(AGGREGATORS.items()):
        agg = cls()
        if (k < 3 and name == "krum") or agg.needs_jacobian:  # row methods read the Jacobian, not a Gram
            continue
        state = agg.init_state(k, 1)
        agg(gram, state, ctx)  # warm-up
        times = [timed(lambda: agg(gram, state, ctx)) for _ in range(repeat)]  # noqa: B023 (called at once)
        out[name] = statistics.median(times)
    return out


def main() -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=300)
    add_device_argument(parser)
    args = parser.parse_args()
    result = measure(args.k, args.repeat, device=args.device)
    doc = {"K": args.k, "median_ms": result, "machine": machine_info(args.device, threads=1)}
    print(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
