"""Representation mode: aggregate per-task gradients w.r.t. the shared features."""

from __future__ import annotations

from typing import List, Optional

import pytest
import torch
from torch import Tensor, nn

from multitask_optim import AGGREGATORS, MultiTaskOptimizer


def _orthonormal_rows(n: int, d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    return q.T.contiguous()  # (n, d) with X X^T = I


class LinearTrunk(nn.Module):
    def __init__(self, k: int, d_in: int = 12, d_z: int = 6) -> None:
        super().__init__()
        self.trunk = nn.Linear(d_in, d_z, bias=False)
        self.heads = nn.ModuleList([nn.Linear(d_z, 1) for _ in range(k)])

    def forward(self, x: Tensor, targets: List[Tensor]):
        z = self.trunk(x)
        return z, [((h(z).squeeze(-1) - t) ** 2).mean() for h, t in zip(self.heads, targets)]


def _data(k: int, n: int = 5, seed: int = 0):
    x = _orthonormal_rows(n, 12, seed)
    g = torch.Generator().manual_seed(seed + 1)
    targets = [torch.randn(n, generator=g, dtype=torch.float64) * (3.0 if i % 2 else -2.0) for i in range(k)]
    return x, targets


def _run(surgery: Optional[str], features: bool, k: int = 3, steps: int = 3):
    torch.manual_seed(0)
    model = LinearTrunk(k).double()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery=surgery, seed=5)
    for step in range(steps):
        x, targets = _data(k, seed=step)
        z, losses = model(x, targets)
        opt.zero_grad()
        if features:
            opt.step(losses, representation=z)
        else:
            opt.step(losses)
    return [p.detach().clone() for p in model.parameters()], opt


EXACT = [None, "pcgrad", "gradvac"] + [m for m in ("mgda",) if m in AGGREGATORS]


@pytest.mark.parametrize("surgery", EXACT)
def test_linear_trunk_with_orthonormal_inputs_matches_parameter_level(surgery: Optional[str]) -> None:
    """With z = X W^T and X X^T = I the feature Gram equals the parameter Gram, so every
    Gram-based method gives the same coefficients, and the trunk update (sum c_i Z_i)^T X
    equals the parameter-level J^T c."""
    rep, opt = _run(surgery, features=True)
    par, _ = _run(surgery, features=False)
    assert opt.last_stats["gradient_mode"] == "representation"
    for a, b in zip(rep, par):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_representation_differs_from_parameter_level_in_general() -> None:
    """Sanity check that the previous test can fail: with non-orthonormal inputs the two
    Grams differ and so do PCGrad's results."""
    torch.manual_seed(0)
    results = []
    for features in (True, False):
        torch.manual_seed(0)
        model = LinearTrunk(3).double()
        opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery="pcgrad", seed=5)
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
        _, targets = _data(3)
        z, losses = model(x, targets)
        opt.step(losses, representation=z) if features else opt.step(losses)
        results.append(model.trunk.weight.detach().clone())
    assert not torch.allclose(results[0], results[1])


@pytest.mark.skipif("mgda" not in AGGREGATORS, reason="mgda aggregator not registered")
def test_mgda_ub_gives_a_common_descent_direction_on_the_features() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    heads = nn.ModuleList([nn.Linear(6, 1).double() for _ in range(4)])
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), surgery="mgda")
    x = torch.randn(10, 8, dtype=torch.float64)
    z = trunk(x)
    signs = [1.0, -1.0, 2.0, -0.5]
    losses = [((h(z).squeeze(-1) - s * x[:, 0]) ** 2).mean() for h, s in zip(heads, signs)]
    rows = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses])
    opt.step(losses, representation=z)
    coefs = torch.tensor(opt.last_stats["coefficients"], dtype=torch.float64)
    assert bool((coefs >= -1e-12).all()) and abs(float(coefs.sum()) - 1.0) < 1e-9  # in the convex hull
    d = coefs @ rows  # the aggregated feature gradient
    assert d.norm() > 0
    inner = rows @ d
    # min-norm point of the hull: <d, g_i> >= ||d||^2 for every task (a common descent direction)
    assert bool((inner >= d.dot(d) * (1 - 1e-6) - 1e-12).all()), inner
    # and the trunk received exactly the backward of that feature gradient
    z2 = trunk(x)
    expected_trunk = torch.autograd.grad(z2, list(trunk.parameters()), d.view_as(z2))
    for p, g in zip(trunk.parameters(), expected_trunk):
        torch.testing.assert_close(p.grad, g)


def test_representation_mode_heads_get_their_own_gradients() -> None:
    torch.manual_seed(0)
    model = LinearTrunk(2).double()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), surgery="pcgrad")
    x, targets = _data(2)
    z, losses = model(x, targets)
    expected = [
        torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
        for loss, h in zip(losses, model.heads)
    ]
    opt.step(losses, representation=z)
    for head, grads in zip(model.heads, expected):
        for p, g in zip(head.parameters(), grads):
            torch.testing.assert_close(p.grad, g)


def test_representation_mode_rejects_bad_features_and_preconditioning() -> None:
    model = LinearTrunk(2).double()
    x, targets = _data(2)
    z, losses = model(x, targets)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="representation"):
        opt.step(losses, representation=z.detach())
    with pytest.raises(TypeError, match="representation"):
        opt.step(losses, representation=[z])  # type: ignore[arg-type]
    pre = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), precondition="adam")
    with pytest.raises(ValueError, match="representation"):
        pre.step(losses, representation=z)


# ---------------------------------------------------------------------- factored heads
class ManyHeads(nn.Module):
    """Heads of several kinds: one or two linear reads of z, several outputs, no bias."""

    def __init__(self, k: int, kind: str, d_z: int = 16) -> None:
        super().__init__()
        self.kind = kind
        self.trunk = nn.Sequential(nn.Linear(5, d_z), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(d_z, 1 + i % 3, bias=i % 2 == 0) for i in range(k)])
        if kind == "two-reads":
            self.extra = nn.Linear(d_z, 2, bias=False)  # a second read of z by task 0
        if kind == "nonlinear":
            self.norm = nn.LayerNorm(d_z)

    def forward(self, x: Tensor) -> tuple:
        z = self.trunk(x)
        losses = []
        for i, head in enumerate(self.heads):
            out = head(self.norm(z) if self.kind == "nonlinear" and i == 1 else z)
            loss = (torch.sin(out) ** 2).mean() * (i + 1)
            if i == 0 and self.kind == "two-reads":
                loss = loss + (self.extra(z) ** 2).mean()
            losses.append(loss)
        return z, losses


@pytest.mark.parametrize("block", [128, 2, 3])  # the head Gram in one strip, or in several
@pytest.mark.parametrize("kind", ["linear", "two-reads", "nonlinear"])
def test_factored_representation_rows_equal_the_dense_ones(
    kind: str, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitask_optim._graph import analyse
    from multitask_optim._representation import feature_gradients, feature_rows

    monkeypatch.setattr("multitask_optim._factors.HEAD_BLOCK", block)
    torch.manual_seed(3)
    k = 4
    model = ManyHeads(k, kind).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    z, losses = model(x)
    extra = list(model.extra.parameters()) if kind == "two-reads" else []
    tasks = [list(h.parameters()) + (extra if i == 0 else []) for i, h in enumerate(model.heads)]
    graph = analyse(losses)
    got = feature_rows(losses, z, tasks, graph)
    dense, task_grads = feature_gradients(losses, z, tasks, graph)
    assert bool(got.factors) == (kind != "nonlinear"), "linear heads are factored, others are not"
    rows = got.dense().shared[0]
    torch.testing.assert_close(rows, dense, rtol=1e-12, atol=1e-12)
    flat = dense.reshape(k, -1)
    torch.testing.assert_close(got.grams([[0]], k)[0], flat @ flat.T, rtol=1e-12, atol=1e-12)
    coefs = torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=torch.float64)
    update, finite = got.combine([[0]], coefs)
    assert finite
    torch.testing.assert_close(update[0], torch.tensordot(coefs[0], dense, dims=1), rtol=1e-12, atol=1e-12)
    for mine, ref in zip(got.tasks, task_grads):
        for a, b in zip(mine, ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_factored_representation_step_equals_the_dense_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole MGDA-UB run: the factored heads give the dense run's parameters."""
    from multitask_optim import _engine as engine
    from multitask_optim import _representation as representation

    def run() -> List[Tensor]:
        torch.manual_seed(0)
        model = ManyHeads(3, "two-reads").double()
        opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery="mgda", seed=0)
        for step in range(4):
            x = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            z, losses = model(x)
            opt.zero_grad()
            opt.step(losses, representation=z)
            assert opt.last_stats["representation_path"] == path
        return [p.detach().clone() for p in model.parameters()]

    calls = []
    original = representation.factored_rows
    monkeypatch.setattr(engine, "factored_rows", lambda *a: calls.append(1) or original(*a))
    path = "factored"
    factored = run()
    assert len(calls) == 4, "the linear heads must take the factored path"
    monkeypatch.setattr(engine, "factored_is_cheaper", lambda *args: False)
    path = "dense"
    dense = run()
    assert len(calls) == 4
    for a, b in zip(factored, dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- shared parameters outside the trunk
class OutsideTrunk(nn.Module):
    """``z = trunk(x)``; every head adds the shared ``offset`` after ``z``: a shared parameter
    the representation ``z`` does not depend on."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.trunk = nn.Linear(6, 5)
            self.heads = nn.ModuleList([nn.Linear(5, 2) for _ in range(k)])
            self.offset = nn.Parameter(torch.randn(2))

    def losses(self, step: int):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 6, generator=g)
        z = torch.tanh(self.trunk(x))
        targets = [torch.randn(8, 2, generator=g) * (1.0 + i) for i in range(len(self.heads))]
        return z, [((h(z) + self.offset - t) ** 2).mean() for h, t in zip(self.heads, targets)]


@pytest.mark.parametrize("surgery", ["mgda", "pcgrad", "upgrad"])
def test_a_shared_parameter_outside_the_trunk_gets_the_same_combination_on_every_step(surgery: str) -> None:
    """Issue 19 (7d): such a parameter got no gradient on full steps and the weighted sum's
    on the plain (off-schedule) ones. It now gets ``grad(sum_i c_i w_i L_i)`` on every step,
    with the step's own coefficients (``c = 1`` on a plain step): as every shared parameter
    of one block does in parameter mode."""
    model = OutsideTrunk()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        surgery=surgery,
        weighting="static",
        weighting_kwargs={"weights": [0.5, 1.0, 2.0]},
        surgery_every=2,
        seed=0,
    )
    for step in range(4):
        z, losses = model.losses(step)
        per_task = [torch.autograd.grad(loss, model.offset, retain_graph=True)[0] for loss in losses]
        opt.zero_grad()
        opt.step(losses, representation=z)
        stats = opt.last_stats
        assert stats["path"] == ("full" if step % 2 == 0 else "plain")
        coefs = stats["coefficients"]
        assert model.offset.grad is not None, f"step {step} ({stats['path']}): no gradient"
        expected = sum(c * w * g for c, w, g in zip(coefs, stats["weights"], per_task))
        torch.testing.assert_close(model.offset.grad, expected, rtol=1e-5, atol=1e-7)
    assert opt.partition is not None and any(p is model.offset for p in opt.partition.shared)
