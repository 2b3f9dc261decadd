"""Aggregation time (Gram -> coefficients) of every registered aggregator at a given K.

Median over many calls, one thread, on the Gram matrix of K random Gaussian rows
(P = 4K, a common component so that some pairs conflict and some do not)::

    python -m benchmarks.aggregation_time --k 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit

import torch

from multitask_optim.aggregators import AGGREGATORS, AggregationContext


def measure(k: int, repeat: int = 300, seed: int = 0) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(k, 4 * k, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        1, 4 * k, generator=g, dtype=torch.float64
    )
    gram = (jac @ jac.T).unsqueeze(0)
    ctx = AggregationContext(
        generator=torch.Generator().manual_seed(0), losses=torch.ones(k, dtype=torch.float64)
    )
    out = {}
    for name, cls in sorted(AGGREGATORS.items()):
        agg = cls()
        if k < 3 and name == "krum":
            continue
        state = agg.init_state(k, 1)
        agg(gram, state, ctx)  # warm-up
        times = timeit.repeat(lambda: agg(gram, state, ctx), number=1, repeat=repeat)  # noqa: B023
        out[name] = statistics.median(times) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()
    result = measure(args.k, args.repeat)
    print(json.dumps({"K": args.k, "median_ms": result}, indent=2))


if __name__ == "__main__":
    main()
