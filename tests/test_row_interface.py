"""The row interface: a method that reads the Jacobian's rows runs through the same stages."""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
import torch
from models import TrunkHeads, build
from torch import Tensor

from multitask_optim import MultiTaskOptimizer
from multitask_optim._components import State
from multitask_optim.aggregators import AggregationContext, RowAggregator


class RowSum(RowAggregator):
    """``sum_i g_i`` from the rows themselves (checks the plumbing, not a method)."""

    name = "test_row_sum"

    def aggregate_rows(
        self, rows: List[Tensor], gram: Tensor, state: State, ctx: AggregationContext
    ) -> Tuple[List[Tensor], Optional[Tensor], State]:
        count = state.get("calls", torch.zeros((), dtype=torch.int64))
        return [r.sum(dim=0) for r in rows], None, {"calls": count + 1}


@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("precondition", [None, "adam"])
def test_row_method_equals_gram_method_with_the_same_update(granularity: str, precondition) -> None:
    a, b = build(TrunkHeads, seed=3), build(TrunkHeads, seed=3)
    kw = dict(granularity=granularity, precondition=precondition, seed=0, weighting="static")
    kw["weighting_kwargs"] = {"weights": [0.5, 2.0]}
    rows = MultiTaskOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), surgery=RowSum(), **kw)
    plain = MultiTaskOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), surgery=None, **kw)
    for step in range(3):
        for model, opt in ((a, rows), (b, plain)):
            opt.zero_grad()
            opt.step(model.losses(model.batch(step)))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert rows.last_stats["coefficients"] is None
    assert int(rows.state_dict()["multitask"]["states"]["surgery"]["calls"]) == 3


def test_row_method_refuses_representation_mode() -> None:
    model = build(TrunkHeads, seed=1)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery=RowSum())
    x, targets = model.batch(0)
    z = model.trunk(x)
    losses = [torch.nn.functional.mse_loss(h(z), t) for h, t in zip(model.heads, targets)]
    with pytest.raises(ValueError, match="representation"):
        opt.step(losses, representation=z)
