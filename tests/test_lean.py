"""The factored Gram of shared linear layers: exact, and no K x P weight buffer."""

from __future__ import annotations

from typing import Callable, List

import pytest
import torch
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer
from multitask_optim._engine import GradientEngine
from multitask_optim._graph import analyse


class Trunk(nn.Module):
    """Linear layers with and without bias, a 3-D input, a tied weight, a head-read weight."""

    def __init__(self, tied: bool = False, head_reads_weight: bool = False) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 12)
        self.l2 = nn.Linear(12, 12, bias=False)
        self.l3 = nn.Linear(12, 10)
        self.heads = nn.ModuleList([nn.Linear(10, 2) for _ in range(3)])
        self.tied = tied
        self.head_reads_weight = head_reads_weight

    def losses(self, x: Tensor) -> List[Tensor]:
        h = torch.relu(self.l1(x))
        h = torch.tanh(self.l2(h))
        if self.tied:  # the same weight used twice: must not be factored
            h = torch.tanh(self.l2(h))
        z = self.l3(h)
        out = []
        for i, head in enumerate(self.heads):
            loss = ((head(z) - (i - 1.0)) ** 2).mean() * (1.0 + 2.0 * i) * (-1) ** i
            if self.head_reads_weight and i == 0:
                loss = loss + self.l1.weight.square().sum() * 0.1
            out.append(loss.abs())
        return out


def run(
    mode: str, make: Callable[[], Trunk], x: Tensor, surgery: str = "pcgrad", granularity: str = "global"
):
    torch.manual_seed(0)
    model = make()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        surgery=surgery,
        gradient_mode=mode,
        granularity=granularity,
        seed=7,
    )
    for _ in range(4):
        opt.zero_grad()
        opt.step(model.losses(x))
    return [p.detach().clone() for p in model.parameters()], opt


CASES = {
    "2d": (lambda: Trunk(), torch.randn(5, 6, dtype=torch.float64)),
    "3d-input": (lambda: Trunk(), torch.randn(2, 3, 6, dtype=torch.float64)),
    "tied-weight": (lambda: Trunk(tied=True), torch.randn(5, 6, dtype=torch.float64)),
    "head-reads-weight": (lambda: Trunk(head_reads_weight=True), torch.randn(5, 6, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("surgery", ["pcgrad", "gradvac", None])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_lean_equals_unfactored(case: str, surgery: str, granularity: str) -> None:
    make, x = CASES[case]

    def make64() -> Trunk:
        return make().double()

    lean, opt = run("lean", make64, x, surgery, granularity)
    batched, _ = run("batched", make64, x, surgery, granularity)
    assert opt.engine.mode == "lean"
    for a, b in zip(lean, batched):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _factored_positions(model: Trunk, x: Tensor) -> List[str]:
    losses = model.losses(x)
    graph = analyse(losses)
    shared = [model.l1.weight, model.l1.bias, model.l2.weight, model.l3.weight, model.l3.bias]
    names = ["l1.weight", "l1.bias", "l2.weight", "l3.weight", "l3.bias"]
    heads = [list(h.parameters()) for h in model.heads]
    grads = GradientEngine("lean").compute(losses, graph, shared, heads)
    held = set()
    for f in grads.factors:
        held.add(names[f.weight])
        if f.bias is not None:
            held.add(names[f.bias])
        assert f.deltas.shape[0] == 3
    for name, row in zip(names, grads.shared):
        assert (row is None) == (name in held), name  # no K x P buffer for factored layers
    return sorted(held)


def test_lean_factors_every_plain_linear_layer() -> None:
    torch.manual_seed(0)
    held = _factored_positions(Trunk(), torch.randn(5, 6))
    assert held == ["l1.bias", "l1.weight", "l2.weight", "l3.bias", "l3.weight"]


def test_tied_and_head_read_weights_are_not_factored() -> None:
    torch.manual_seed(0)
    assert "l2.weight" not in _factored_positions(Trunk(tied=True), torch.randn(5, 6))
    torch.manual_seed(0)
    held = _factored_positions(Trunk(head_reads_weight=True), torch.randn(5, 6))
    assert "l1.weight" not in held and "l3.weight" in held


def test_lean_refused_with_preconditioning() -> None:
    model = Trunk()
    with pytest.raises(ValueError, match="lean"):
        MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), gradient_mode="lean", precondition="adam"
        )


def test_default_frontier_factors_only_where_cheaper() -> None:
    torch.manual_seed(0)
    model = Trunk()
    few_rows = torch.randn(2, 6)  # N=2 rows < widths: factoring is cheaper
    losses = model.losses(few_rows)
    shared = [model.l1.weight, model.l1.bias, model.l2.weight, model.l3.weight, model.l3.bias]
    heads = [list(h.parameters()) for h in model.heads]
    grads = GradientEngine("frontier").compute(losses, analyse(losses), shared, heads)
    assert grads.factors
    many_rows = torch.randn(400, 6)  # N >> widths: the weight Jacobian is cheaper
    losses = model.losses(many_rows)
    grads = GradientEngine("frontier").compute(losses, analyse(losses), shared, heads)
    assert not grads.factors
