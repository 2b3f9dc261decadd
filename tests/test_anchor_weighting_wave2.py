"""GLS, IMTL-L, STCH and FAMO agree with LibMTL's weighting classes on the same losses.

LibMTL's classes are driven without its trainer: a stub ``self`` supplies the task
count, the epoch and the losses (a float64 leaf tensor), and the weights LibMTL applies
are read as the gradient its ``backward`` leaves on that leaf (``d objective / d L_i``,
the factor of ``grad L_i`` in its update). LibMTL is run under a float64 default dtype so
that its own tensors (FAMO's logits, IMTL's scales) are float64 too; the comparisons
are then at rounding level.

Sources: ``GLS`` and ``IMTL`` come from the installed ``LibMTL`` package (1.1.5);
``STCH`` and ``FAMO`` exist only in LibMTL's GitHub repository, read from a checkout
or a bare clone named by ``LIBMTL_SOURCE``. Every test skips cleanly when its source is
missing, saying what to install or fetch.

Known LibMTL behaviours we depart from (each pinned by a test below):

- ``GLS`` returns the weights ``L_i / (K prod_j L_j)``, not the ``G / (K L_i)`` its
  gradient uses, and forms ``prod_j L_j`` directly, which overflows float32 for many
  tasks or large losses (inf/NaN gradient); we work in log space.
- ``STCH`` returns all-ones weights whatever it applies, and adds ``1e-20`` inside its
  logs (we refuse losses <= 0 instead).
- ``IMTL`` is IMTL-L and IMTL-G fused; only its loss-scale part is compared here.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch
from libmtl import load_weighting
from torch import Tensor

from multitask_optim.weighting import FAMO, IMTLL, GeometricLossStrategy, SmoothTchebycheff, WeightingContext

F64 = torch.float64
TIGHT = 1e-12
#: The largest relative difference seen per method, for the report (printed with -s).
AGREEMENT: Dict[str, float] = {}


# ---------------------------------------------------------------------- loading LibMTL
def load_libmtl(name: str, tmp_path: Path) -> type:
    """LibMTL's weighting class ``name`` (installed package first, then ``$LIBMTL_SOURCE``),
    loaded with stub ``LibMTL`` packages so that its ``__init__`` (trainer, torchvision) never runs."""
    return getattr(load_weighting(name, tmp_path), name)


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def stub(cls: type, k: int) -> object:
    """An instance of LibMTL class ``cls`` with what its trainer would set."""
    obj = cls()
    obj.task_num = k
    obj.device = torch.device("cpu")
    obj.rep_grad = False
    obj.epoch = 0
    obj.init_param()
    return obj


def applied_weights(fn, losses: Tensor) -> Tensor:
    """The factors of ``grad L_i`` LibMTL applies: ``d objective / d L`` after ``fn(leaf)``."""
    leaf = losses.detach().clone().requires_grad_(True)
    with contextlib.redirect_stdout(io.StringIO()):  # STCH prints its nadir point
        fn(leaf)
    assert leaf.grad is not None
    return leaf.grad.detach().clone()


def rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def record(name: str, value: float) -> None:
    AGREEMENT[name] = max(AGREEMENT.get(name, 0.0), value)
    print(f"{name}: {AGREEMENT[name]:.3g}")


def loss_sequence(k: int, steps: int, seed: int) -> List[Tensor]:
    """Positive losses over a run: a decreasing trend per task, noise, scales 1e-3..1e3."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 3, k, dtype=F64)
    rates = torch.rand(k, generator=g, dtype=F64) * 0.2
    return [
        scales * torch.exp(-rates * t) * (1 + 0.3 * torch.rand(k, generator=g, dtype=F64))
        for t in range(steps)
    ]


def ctx(k: int, step: int = 0) -> WeightingContext:
    return WeightingContext(torch.Generator().manual_seed(0), step, [f"t{i}" for i in range(k)])


# ---------------------------------------------------------------------- GLS
@pytest.mark.parametrize("k", [2, 3, 5])
def test_gls_applies_libmtl_weights(tmp_path: Path, k: int) -> None:
    GLS = load_libmtl("GLS", tmp_path)
    theirs_obj, ours = stub(GLS, k), GeometricLossStrategy()
    worst = 0.0
    for t, losses in enumerate(loss_sequence(k, 12, seed=k)):
        theirs = applied_weights(lambda leaf: theirs_obj.backward(leaf), losses)
        mine, _ = ours.compute(losses, {}, ctx(k, t))
        worst = max(worst, rel(mine, theirs))
    record(f"gls K={k} weights, relative (12 steps)", worst)
    assert worst < TIGHT


def test_gls_libmtl_reports_other_weights_and_overflows_float32(tmp_path: Path) -> None:
    GLS = load_libmtl("GLS", tmp_path)
    losses = torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    reported = torch.as_tensor(stub(GLS, 3).backward(losses.clone().requires_grad_(True)), dtype=F64)
    applied = applied_weights(lambda leaf: stub(GLS, 3).backward(leaf), losses)
    assert torch.allclose(reported, losses / (3 * losses.prod()))  # what LibMTL reports
    assert not torch.allclose(reported, applied)  # ... is not what it applies
    big = torch.full((16,), 1e3)  # prod = 1e48: beyond float32
    leaf = big.clone().requires_grad_(True)
    stub(GLS, 16).backward(leaf)
    assert leaf.grad is not None and not bool(torch.isfinite(leaf.grad).all())
    mine, _ = GeometricLossStrategy().compute(big.to(F64), {}, ctx(16))
    assert torch.allclose(mine, torch.full((16,), 1 / 16, dtype=F64), rtol=1e-14)  # G / (K L_i)


# ---------------------------------------------------------------------- IMTL-L
def test_imtl_l_matches_libmtl_loss_scale_part(tmp_path: Path) -> None:
    """LibMTL's IMTL with its IMTL-G part stubbed out: the scaled losses it builds give
    the weights (``d/dL``) and the scales' gradient, compared with ours over 10 steps in
    which both sides update their scales by the same SGD step."""
    IMTL = load_libmtl("IMTL", tmp_path)
    k, lr = 3, 0.1
    with float64_default():
        theirs = stub(IMTL, k)
        ours = IMTLL()
        ours.bind([f"t{i}" for i in range(k)])
    captured: Dict[str, Tensor] = {}

    def get_grads(scaled: Tensor, mode: str = "backward") -> Tensor:
        leaf = captured["leaf"]
        dl, ds = torch.autograd.grad(scaled.sum(), [leaf, theirs.loss_scale])
        captured["weights"], captured["scale_grad"] = dl, ds
        return torch.eye(k, dtype=F64) + 0.1  # any full-rank rows: IMTL-G then runs

    theirs._get_grads = get_grads
    theirs._backward_new_grads = lambda *a, **kw: None
    sgd_theirs = torch.optim.SGD([theirs.loss_scale], lr=lr)
    sgd_ours = torch.optim.SGD(ours.parameters(), lr=lr)
    worst_w = worst_g = 0.0
    for t, losses in enumerate(loss_sequence(k, 10, seed=1)):
        leaf = losses.clone().requires_grad_(True)
        captured["leaf"] = leaf
        theirs.backward(leaf)
        w, _ = ours.compute(losses, {}, ctx(k, t))
        sgd_ours.zero_grad()
        ours.backward(losses, w, {}, ctx(k, t))
        scale_grad = ours.parameters()[0].grad
        assert scale_grad is not None
        worst_w = max(worst_w, rel(w, captured["weights"]))
        worst_g = max(worst_g, float((scale_grad - captured["scale_grad"]).abs().max()))
        theirs.loss_scale.grad = captured["scale_grad"].clone()
        sgd_theirs.step()
        sgd_ours.step()
    record("imtl_l weights, relative (10 steps)", worst_w)
    record("imtl_l scale gradient, absolute (10 steps)", worst_g)
    assert worst_w < TIGHT and worst_g < 1e-9


# ---------------------------------------------------------------------- STCH
@pytest.mark.parametrize("mu", [1.0, 0.2])
def test_stch_matches_libmtl_through_warmup_and_after(tmp_path: Path, mu: float) -> None:
    """LibMTL's ``STCH_warmup_epoch = 1`` is our ``warmup_epochs = 2``; 4 epochs of 3 steps."""
    STCH = load_libmtl("STCH", tmp_path)
    k, per_epoch = 3, 3
    theirs = stub(STCH, k)
    ours = SmoothTchebycheff(mu=mu, warmup_epochs=2, steps_per_epoch=per_epoch)
    state: dict = {}
    sequence = loss_sequence(k, 4 * per_epoch, seed=2)
    worst = 0.0
    for t, losses in enumerate(sequence):
        theirs.epoch = t // per_epoch
        applied = applied_weights(
            lambda leaf: theirs.backward(leaf, STCH_mu=mu, STCH_warmup_epoch=1),
            losses,
        )
        mine, state = ours.compute(losses, state, ctx(k, t))
        worst = max(worst, rel(mine, applied))
    assert torch.allclose(state["nadir"], torch.stack(sequence[per_epoch : 2 * per_epoch]).mean(0))
    assert torch.allclose(state["nadir"], theirs.nadir_vector)
    record(f"stch mu={mu} weights, relative (12 steps, 6 after warm-up)", worst)
    assert worst < TIGHT


def test_stch_libmtl_reports_ones(tmp_path: Path) -> None:
    STCH = load_libmtl("STCH", tmp_path)
    theirs = stub(STCH, 2)
    reported = theirs.backward(torch.tensor([0.5, 4.0], requires_grad=True), STCH_mu=1.0, STCH_warmup_epoch=0)
    assert list(reported) == [1.0, 1.0]
    mine, _ = SmoothTchebycheff(warmup_epochs=1).compute(torch.tensor([0.5, 4.0], dtype=F64), {}, ctx(2))
    assert torch.allclose(mine, torch.tensor([2.0, 0.25], dtype=F64))  # 1 / L in the warm-up


# ---------------------------------------------------------------------- FAMO
def _famo_run(tmp_path: Path, same_batch: bool, steps: int = 12) -> Dict[str, float]:
    """Ours and LibMTL's FAMO over ``steps`` steps on the same losses.

    Same batch (LibMTL's trainer): ``backward(L_t)``, then ``update_w(L_t after)``; ours
    ``weights(L_t)`` then ``observe(L_t after)``. Next step (our default): LibMTL's own
    ``update_w(L_t)`` called just before ``backward(L_t)`` at ``t > 0`` is exactly our
    update with the previous step's losses.
    """
    FAMO_cls = load_libmtl("FAMO", tmp_path)
    k = 3
    with float64_default():
        theirs = stub(FAMO_cls, k)
    ours, state = FAMO(), {}
    before = loss_sequence(k, steps, seed=3)
    after = [
        L * (0.7 + 0.5 * torch.rand(k, generator=torch.Generator().manual_seed(t), dtype=F64))
        for t, L in enumerate(before)
    ]
    kwargs = {"FAMO_w_lr": 0.025, "FAMO_w_gamma": 1e-3}
    worst_w = worst_logits = 0.0
    with float64_default():
        for t in range(steps):
            if not same_batch and t > 0:
                theirs.update_w(before[t])
            applied = applied_weights(lambda leaf: theirs.backward(leaf, **kwargs), before[t])
            mine, state = ours.compute(before[t], state, ctx(k, t))
            worst_w = max(worst_w, rel(mine, applied))
            if same_batch:
                theirs.update_w(after[t])
                state = ours.observe(after[t], state)
            worst_logits = max(worst_logits, float((state["logits"] - theirs.w.detach()).abs().max()))
    assert float(state["logits"].abs().max()) > 1e-3  # the logits did move
    return {"weights": worst_w, "logits": worst_logits}


@pytest.mark.parametrize("same_batch", [True, False], ids=["same_batch", "next_step"])
def test_famo_matches_libmtl(tmp_path: Path, same_batch: bool) -> None:
    found = _famo_run(tmp_path, same_batch)
    name = "same-batch" if same_batch else "next-step"
    record(f"famo {name} weights, relative (12 steps)", found["weights"])
    record(f"famo {name} logits, absolute (12 steps)", found["logits"])
    assert found["weights"] < TIGHT and found["logits"] < 1e-12
