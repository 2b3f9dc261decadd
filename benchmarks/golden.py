"""Golden runs: the final parameters of a grid of configurations, to compare two checkouts.

A change that must not change results (a refactor, a faster path) is checked by running
the same grid before and after it and comparing the parameters:

    python -m benchmarks.golden --out before.pt          # on the old checkout
    python -m benchmarks.golden --out after.pt           # on the new one
    python -m benchmarks.golden --compare before.pt after.pt

The grid: every surgery under every gradient mode (and representation mode), every
weighting with PCGrad, MGDA, the plain sum and GradDrop, with and without per-task Adam,
every preconditioner with every surgery (K = 3 tasks whose losses are 1, 10 and 100 times
apart, 5 SGD steps on a small MLP); ``--large`` adds a wider MLP (160 units, float32
Grams formed from long rows) under the explicit modes and both granularities. A
configuration that raises records its error, so "raises before and after" compares equal.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from multitask_optim import AGGREGATORS, WEIGHTINGS, MultiTaskOptimizer

K = 3
#: Arguments the weightings that need one get.
WEIGHTING_KWARGS: Dict[str, Dict[str, Any]] = {
    "htw": {"total_steps": 10},
    "staged": {"start_steps": [0, 2, 4]},
    "static": {"weights": [1.0, 2.0, 0.5]},
    "dwa": {"steps_per_epoch": 2},
}
MODES = ("auto", "lean", "frontier", "native", "batched", "looped")
Result = Union[List[Tensor], str]


def run(
    config: Dict[str, Any], mode: str = "auto", representation: bool = False, width: int = 12
) -> List[Tensor]:
    """The parameters (and the weighting's) after the steps of one configuration."""
    torch.manual_seed(0)
    big = width > 12
    in_dim, out_dim, batch, steps = (64, 4, 64, 3) if big else (6, 2, 16, 5)
    layers: List[nn.Module] = [nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh()]
    if big:
        layers += [nn.Linear(width, width), nn.ReLU()]
    trunk = nn.Sequential(*layers)
    heads = nn.ModuleList([nn.Linear(width, out_dim) for _ in range(K)])
    params = list(trunk.parameters()) + list(heads.parameters())
    kwargs = dict(config)
    if kwargs.get("weighting") in WEIGHTING_KWARGS:
        kwargs["weighting_kwargs"] = WEIGHTING_KWARGS[kwargs["weighting"]]
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.05), seed=1, gradient_mode=mode, **kwargs)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(batch, in_dim, generator=g)
        y = torch.randn(K, batch, out_dim, generator=g)
        z = trunk(x)
        losses = [((h(z) - y[i] * (i + 1)) ** 2).mean() * (10.0**i) for i, h in enumerate(heads)]
        opt.zero_grad()
        opt.step(losses, representation=z if representation else None)
    return [p.detach().clone() for p in params] + [p.detach().clone() for p in opt.weighting.parameters()]


def attempt(config: Dict[str, Any], **kwargs: Any) -> Result:
    try:
        return run(config, **kwargs)
    except Exception as error:  # recorded: the same error before and after compares equal
        return f"ERR {type(error).__name__}: {error}"


def grid(large: bool) -> Dict[str, Result]:
    out: Dict[str, Result] = {}
    surgeries = sorted(AGGREGATORS)
    for a in surgeries:
        for mode in MODES:
            out[f"s={a} mode={mode}"] = attempt({"surgery": a}, mode=mode)
        out[f"s={a} rep"] = attempt({"surgery": a}, representation=True)
    for w in sorted(WEIGHTINGS):
        for a in ("pcgrad", "mgda", None, "graddrop"):
            for pre in (None, "adam"):
                for rep in (False, True):
                    cfg = {"surgery": a, "weighting": w, "precondition": pre}
                    out[f"w={w} s={a} pre={pre} rep={rep}"] = attempt(cfg, representation=rep)
    for pre in ("adagrad", "rmsprop", "adam"):
        for a in surgeries:
            out[f"pre={pre} s={a}"] = attempt({"surgery": a, "precondition": pre})
    if large:
        for a in surgeries:
            for mode in ("lean", "frontier", "native", "batched"):
                for gran in ("global", "tensor"):
                    cfg = {"surgery": a, "granularity": gran}
                    out[f"large s={a} mode={mode} gran={gran}"] = attempt(cfg, mode=mode, width=160)
    return out


def compare(before: Dict[str, Result], after: Dict[str, Result]) -> float:
    """Print the configurations that differ; return the largest relative difference."""
    worst: List[tuple] = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, list) and isinstance(b, list):
            rel = max(float((p - q).abs().max() / (p.abs().max() + 1e-30)) for p, q in zip(a, b))
            worst.append((rel, key))
        elif isinstance(a, str) != isinstance(b, str) or a is None or b is None:
            print(f"differs in kind: {key}: {str(a)[:80]} | {str(b)[:80]}")
            worst.append((float("inf"), key))
    worst.sort(reverse=True)
    for rel, key in worst[:10]:
        print(f"{rel:.3g}  {key}")
    top = worst[0][0] if worst else 0.0
    print(f"{len(worst)} configurations compared; largest relative difference {top:.3g}")
    return top


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write this checkout's golden run here")
    parser.add_argument("--large", action="store_true", help="add the wider MLP's configurations")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two golden runs")
    args = parser.parse_args(argv)
    if args.compare:
        compare(torch.load(args.compare[0]), torch.load(args.compare[1]))
        return
    if not args.out:
        parser.error("give --out or --compare")
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out = grid(args.large)
    torch.save(out, args.out)
    print(f"{len(out)} configurations; {sum(isinstance(v, str) for v in out.values())} raised")


if __name__ == "__main__":
    main()
