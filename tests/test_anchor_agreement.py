"""Our PCGrad / GradVac agree with third-party implementations on the same inputs.

Anchors (each optional, skipped cleanly when missing): TorchJD's ``PCGrad`` and
``GradVac`` aggregators, ``pytorch_optimizer.PCGrad`` and LibMTL's ``PCGrad`` /
``GradVac`` weighting classes (driven on a given Jacobian without LibMTL's trainer).

"Ours" is always the shared update a :class:`MultiTaskOptimizer` writes: the ``.grad``
of the shared parameters captured after ``opt.step(losses)`` with an inner
``SGD(lr=0)`` (so the parameters do not move). Facts the comparisons rely on (checked
in the sources of the versions pinned in the ``anchors`` extra):

- TorchJD's ``PCGrad`` and ``GradVac`` sum the modified rows (``weights = sum_i C[i]``):
  the same scale as ours (``reduction="sum"``, the papers'). No constant factor.
- ``pytorch_optimizer.PCGrad`` defaults to ``reduction="mean"``: its update is ours
  divided by K on the shared parameters. It also projects the *whole* flattened
  gradient (task heads included), so with task-specific parameters its projection
  coefficients use ``||g_j||^2`` over the shared *and* task-j parameters; the exact
  agreement is therefore checked on a model whose parameters are all shared, and the
  difference with heads is pinned down in :func:`test_pytorch_optimizer_projects_heads_too`.
- TorchJD's ``GradVac`` defaults: ``beta=0.5``, ``eps=1e-8`` (added to the cosine's and the
  correction's denominators); ours: ``beta=0.5``, no eps. With eps the results differ by
  a relative ~1e-8; with ``eps=0`` they agree to rounding.
- TorchJD draws task orders with ``torch.randperm`` from the global generator, LibMTL
  with Python's ``random.shuffle``; ours from the optimizer's seeded generator
  (:func:`multitask_optim.aggregators.random_orders`). For K = 2 the order does not
  matter; for K = 3 we replay our orders into the anchors by patching their RNG calls.
- LibMTL's GradVac updates a target ``rho_T[i, j]`` only when it corrects the pair
  (inside ``if rho_ij < rho_T``); the paper, TorchJD and we update every visited pair.
  On the first step (all targets 0) the results agree; later steps can differ.
"""

from __future__ import annotations

import random
from typing import List, Sequence

import pytest
import torch
from libmtl import load_weighting
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer
from multitask_optim.aggregators import random_orders

DTYPE = torch.float64
TIGHT = 1e-12  # relative to the update's scale (float64, different summation orders)


# ---------------------------------------------------------------------- problems


class HeadModel(nn.Module):
    """Shared Linear+Tanh trunk, one linear head per task, all heads from one init."""

    def __init__(self, k: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 5), nn.Tanh()).to(DTYPE)
        head = nn.Linear(5, 1).to(DTYPE)
        self.heads = nn.ModuleList(nn.Linear(5, 1).to(DTYPE) for _ in range(k))
        for h in self.heads:
            h.load_state_dict(head.state_dict())

    def losses(self, x: Tensor, y: Tensor) -> List[Tensor]:
        z = self.trunk(x)
        return [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)]


def conflicting_batch(k: int, seed: int = 1, n: int = 8):
    """Targets with alternating signs: tasks 0 and 1 (at least) pull the trunk apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=DTYPE)
    base = torch.randn(n, generator=g, dtype=DTYPE) + 1.0
    y = torch.stack(
        [
            (1.0 if i % 2 == 0 else -1.0) * base + 0.2 * torch.randn(n, generator=g, dtype=DTYPE)
            for i in range(k)
        ],
        dim=1,
    )
    return x, y


def jacobian(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
        )
    return torch.stack(rows)


def ours_update(model: HeadModel, batches, surgery: str, seed: int = 0, **kwargs) -> List[Tensor]:
    """Shared ``.grad`` after each ``opt.step`` (inner SGD(lr=0)), one per batch."""
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), surgery=surgery, seed=seed, **kwargs
    )
    shared = list(model.trunk.parameters())
    out = []
    for x, y in batches:
        opt.zero_grad()
        opt.step(model.losses(x, y))
        out.append(torch.cat([p.grad.reshape(-1) for p in shared]).clone())
    return out


def assert_close(got: Tensor, want: Tensor, rel: float = TIGHT) -> float:
    diff = float((got - want).abs().max())
    scale = float(want.abs().max())
    assert diff <= rel * max(scale, 1.0), f"max abs diff {diff:.3g} (scale {scale:.3g})"
    return diff


def cosine(j: Tensor, a: int, b: int) -> float:
    return float(j[a] @ j[b] / (j[a].norm() * j[b].norm()))


@pytest.fixture
def k2():
    model = HeadModel(2)
    x, y = conflicting_batch(2)
    jac = jacobian(model.losses(x, y), list(model.trunk.parameters()))
    assert cosine(jac, 0, 1) < -0.1  # the comparison is only meaningful under conflict
    return model, (x, y), jac


def our_orders(k: int, seed: int, steps: int = 1) -> List[List[List[int]]]:
    """The task orders our optimizer draws at its first ``steps`` steps (one block).

    With equal weights and no preconditioning nothing else draws from the optimizer's
    generator, so its t-th aggregation uses the t-th ``random_orders`` draw.
    """
    gen = torch.Generator().manual_seed(seed)
    return [random_orders(1, k, gen)[0].tolist() for _ in range(steps)]


# ---------------------------------------------------------------------- TorchJD


def _torchjd():
    return pytest.importorskip(
        "torchjd.aggregation", reason="TorchJD not installed (pip install -e .[anchors])"
    )


class _ReplayRandperm:
    """Stands in for ``torch.randperm``: returns the given permutations, in order."""

    def __init__(self, perms: Sequence[Sequence[int]]) -> None:
        self.perms = [list(p) for p in perms]
        self.calls = 0

    def __call__(self, n, *args, **kwargs):
        perm = self.perms[self.calls]
        assert len(perm) == n, f"anchor asked randperm({n}), replay has {perm}"
        self.calls += 1
        return torch.tensor(perm, dtype=torch.long)


def test_torchjd_pcgrad_k2(k2):
    agg = _torchjd()
    model, batch, jac = k2
    (ours,) = ours_update(model, [batch], "pcgrad")
    theirs = agg.PCGrad()(jac)
    assert_close(ours, theirs)
    assert not torch.allclose(ours, jac.sum(0))  # a projection did happen


def test_torchjd_pcgrad_k3_fixed_order(monkeypatch):
    agg = _torchjd()
    model = HeadModel(3)
    x, y = conflicting_batch(3)
    jac = jacobian(model.losses(x, y), list(model.trunk.parameters()))
    (orders,) = our_orders(3, seed=5)
    (ours,) = ours_update(model, [(x, y)], "pcgrad", seed=5)
    # TorchJD's PCGrad: for i in 0..K-1, j runs over randperm(K) skipping i
    replay = _ReplayRandperm([[i, *orders[i]] for i in range(3)])
    monkeypatch.setattr(torch, "randperm", replay)
    theirs = agg.PCGrad()(jac)
    monkeypatch.undo()
    assert replay.calls == 3
    assert_close(ours, theirs)


def test_torchjd_gradvac_first_steps_k2(k2):
    agg = _torchjd()
    model, batch, jac = k2
    x2, y2 = conflicting_batch(2, seed=7)
    jac2 = jacobian(model.losses(x2, y2), list(model.trunk.parameters()))
    ours = ours_update(model, [batch, (x2, y2)], "gradvac", surgery_kwargs={"beta": 0.5})
    exact = agg.GradVac(beta=0.5, eps=0.0)
    assert_close(ours[0], exact(jac))
    assert_close(ours[1], exact(jac2))  # second step: targets no longer 0, still equal
    default = agg.GradVac()  # beta=0.5, eps=1e-8: differs by ~1e-8 relative
    assert (default.beta, default.eps) == (0.5, 1e-8)
    assert_close(ours[0], default(jac), rel=1e-6)
    # with targets at 0 the first GradVac step is PCGrad's projection
    assert_close(ours[0], agg.PCGrad()(jac))


def test_torchjd_gradvac_k3_fixed_order(monkeypatch):
    agg = _torchjd()
    model = HeadModel(3)
    batches = [conflicting_batch(3), conflicting_batch(3, seed=11)]
    jacs = [jacobian(model.losses(x, y), list(model.trunk.parameters())) for x, y in batches]
    steps = our_orders(3, seed=3, steps=2)
    ours = ours_update(model, batches, "gradvac", seed=3, surgery_kwargs={"beta": 0.5})
    exact = agg.GradVac(beta=0.5, eps=0.0)
    for orders, jac, mine in zip(steps, jacs, ours):
        # TorchJD's GradVac: for i in 0..K-1, j = others[randperm(K-1)], others = [j != i]
        perms = []
        for i in range(3):
            others = [j for j in range(3) if j != i]
            perms.append([others.index(j) for j in orders[i]])
        replay = _ReplayRandperm(perms)
        monkeypatch.setattr(torch, "randperm", replay)
        theirs = exact(jac)
        monkeypatch.undo()
        assert replay.calls == 3
        assert_close(mine, theirs)


# ---------------------------------------------------------------------- pytorch_optimizer


class SharedOnly(nn.Module):
    """Every parameter is shared: the losses read the trunk through fixed projections."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 4), nn.Tanh()).to(DTYPE)
        g = torch.Generator().manual_seed(3)
        self.register_buffer("proj", torch.randn(4, 2, generator=g, dtype=DTYPE))

    def losses(self, x: Tensor, y: Tensor) -> List[Tensor]:
        out = self.trunk(x) @ self.proj
        return [((out[:, i] - y[:, i]) ** 2).mean() for i in range(2)]


def test_pytorch_optimizer_pcgrad_k2():
    po = pytest.importorskip("pytorch_optimizer", reason="pytorch_optimizer not installed")
    model = SharedOnly()
    x, y = conflicting_batch(2)
    params = list(model.trunk.parameters())
    jac = jacobian(model.losses(x, y), params)
    assert cosine(jac, 0, 1) < 0
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), surgery="pcgrad", seed=0)
    opt.step(model.losses(x, y))
    ours = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    for reduction, factor in (("sum", 1.0), ("mean", 0.5)):
        random.seed(0)
        pc = po.PCGrad(torch.optim.SGD(params, lr=0.0), reduction=reduction)
        pc.pc_backward(model.losses(x, y))
        theirs = torch.cat([p.grad.reshape(-1) for p in params])
        assert_close(factor * ours, theirs)
    assert po.PCGrad(torch.optim.SGD(params, lr=0.0)).reduction == "mean"  # its default: ours / K


def test_pytorch_optimizer_projects_heads_too(k2):
    """With task heads, pytorch_optimizer projects the whole flattened gradient.

    Its coefficient for task i against j is ``<g_i, g_j> / ||g_j||^2`` with ``g_j`` the
    full gradient (trunk + head j), where PCGrad-on-the-shared-parameters (ours, TorchJD's
    ``mtl_backward``, LibMTL) uses the trunk part only. We reproduce its shared update
    from that rule exactly, and check that it differs from ours.
    """
    po = pytest.importorskip("pytorch_optimizer", reason="pytorch_optimizer not installed")
    model, (x, y), jac = k2
    params = list(model.parameters())
    full = jacobian(model.losses(x, y), params)  # (2, P_all): heads are 0 in the other row
    n_shared = jac.shape[1]
    random.seed(0)
    pc = po.PCGrad(torch.optim.SGD(params, lr=0.0), reduction="sum")
    pc.pc_backward(model.losses(x, y))
    theirs = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    g0, g1 = full
    dot = g0 @ g1
    expected = (g0 - dot / (g1 @ g1) * g1) + (g1 - dot / (g0 @ g0) * g0)
    assert_close(theirs, expected[:n_shared])
    (ours,) = ours_update(model, [(x, y)], "pcgrad")
    assert float((ours - theirs).abs().max()) > 1e-6


# ---------------------------------------------------------------------- LibMTL


def _load_libmtl(name: str):
    """LibMTL's weighting module and class ``name``, without running ``LibMTL/__init__.py``
    (which imports its trainer and torchvision)."""
    module = load_weighting(name)
    return module, getattr(module, name)


def _drive_libmtl(cls, jac: Tensor, **kwargs) -> Tensor:
    """Run LibMTL weighting ``cls`` on a given Jacobian, without its trainer."""

    class Driver(cls):
        def __init__(self) -> None:
            super().__init__()
            self.task_num = jac.shape[0]
            self.device = jac.device
            self.rep_grad = False
            self.result = None

        def get_share_params(self):
            return [torch.zeros(jac.shape[1], dtype=jac.dtype)]

        def zero_grad_share_params(self):
            pass

        def _compute_grad(self, losses, mode, rep_grad=False):
            return jac.clone()

        def _reset_grad(self, new_grads):
            self.result = new_grads.clone()

    drv = Driver()
    drv.backward([None] * jac.shape[0], **kwargs)
    return drv.result


class _ReplayShuffle:
    """Stands in for LibMTL's ``random`` module: ``shuffle`` writes the given orders."""

    def __init__(self, orders: Sequence[Sequence[int]]) -> None:
        self.orders = [list(o) for o in orders]
        self.calls = 0

    def shuffle(self, lst: list) -> None:
        order = self.orders[self.calls]
        assert sorted(order) == sorted(lst), f"LibMTL shuffles {lst}, replay has {order}"
        lst[:] = order
        self.calls += 1


@pytest.mark.parametrize("name", ["PCGrad", "GradVac"])
def test_libmtl_k2(k2, name):
    _, cls = _load_libmtl(name)
    model, batch, jac = k2
    surgery = name.lower()
    (ours,) = ours_update(model, [batch], surgery)
    random.seed(0)
    theirs = _drive_libmtl(cls, jac, **({"beta": 0.5} if name == "GradVac" else {}))
    assert_close(ours, theirs)


@pytest.mark.parametrize("name", ["PCGrad", "GradVac"])
def test_libmtl_k3_fixed_order(monkeypatch, name):
    module, cls = _load_libmtl(name)
    model = HeadModel(3)
    x, y = conflicting_batch(3)
    jac = jacobian(model.losses(x, y), list(model.trunk.parameters()))
    (orders,) = our_orders(3, seed=9)
    (ours,) = ours_update(model, [(x, y)], name.lower(), seed=9)
    # LibMTL's PCGrad shuffles all K tasks (i itself included: <g_i, g_i> > 0, a no-op
    # first); its GradVac shuffles the K-1 others.
    replay = _ReplayShuffle([[i, *orders[i]] if name == "PCGrad" else orders[i] for i in range(3)])
    monkeypatch.setattr(module, "random", replay)
    theirs = _drive_libmtl(cls, jac, **({"beta": 0.5} if name == "GradVac" else {}))
    assert replay.calls == 3
    assert_close(ours, theirs)
