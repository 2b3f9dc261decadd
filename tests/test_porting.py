"""Porting traps (issue: coming from TorchJD, LibMTL or Pytorch-PCGrad): each either works as
the user meant or fails loudly."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer


class Net(nn.Module):
    """A shared trunk and two heads; ``forward`` returns the representation and the losses."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh())
        self.h0 = nn.Linear(8, 1)
        self.h1 = nn.Linear(8, 3)

    def forward(self, step: int):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(10, 6, generator=g)
        z = self.trunk(x)
        y0 = torch.randn(10, 1, generator=g)
        y1 = torch.randint(0, 3, (10,), generator=g)
        return z, [F.mse_loss(self.h0(z), y0) * 3.0, F.cross_entropy(self.h1(z), y1)]


def net() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


def run(model: Net, steps: int = 3, how=lambda z, losses: {"losses": losses}, **kw) -> MultiTaskOptimizer:
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), seed=0, **kw)
    for step in range(steps):
        z, losses = model(step)
        opt.zero_grad()
        opt.step(**how(z, losses))
    return opt


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------- 1. features= as in TorchJD
@pytest.mark.parametrize("surgery", ["pcgrad", "mgda", None])
def test_features_is_a_hint_that_never_changes_the_step(surgery) -> None:
    a, b, c = net(), net(), net()
    run(a, surgery=surgery)
    run(b, surgery=surgery, how=lambda z, losses: {"losses": losses, "features": z})
    run(c, surgery=surgery, how=lambda z, losses: {"losses": losses, "features": [z]})
    assert same(a, b) and same(a, c)


def test_representation_is_the_approximation_and_differs() -> None:
    a, b = net(), net()
    run(a, surgery="mgda")
    run(b, surgery="mgda", how=lambda z, losses: {"losses": losses, "representation": z})
    assert not same(a, b)


# ---------------------------------------------------------------------- 2. tensors the losses do not use
@pytest.mark.parametrize("argument", ["features", "representation"])
def test_a_tensor_the_losses_do_not_pass_through_is_refused(argument: str) -> None:
    model = net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    z, losses = model(0)
    unrelated = torch.cat([z, z]).detach().requires_grad_()
    with pytest.raises(ValueError, match=argument):
        opt.step(losses, **{argument: torch.cat([unrelated, unrelated])})
    assert opt.partition is None and opt.state_dict()["multitask"]["names"] is None
    assert all(p.grad is None for p in model.parameters())


def test_multi_input_model_trains_its_shared_trunk() -> None:
    """LibMTL's multi_input: each task its own input and representation, one shared trunk."""
    model = net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery="pcgrad", seed=0)
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(10, 6, generator=g), torch.randn(7, 6, generator=g)
    z0, z1 = model.trunk(x0), model.trunk(x1)
    losses = [model.h0(z0).pow(2).mean(), model.h1(z1).pow(2).mean()]
    before = [p.detach().clone() for p in model.trunk.parameters()]
    opt.step(losses, features=[z0, z1])
    assert opt.partition is not None and len(opt.partition.shared) == 4
    assert all(not torch.equal(p, q) for p, q in zip(model.trunk.parameters(), before))


# ---------------------------------------------------------------------- 3. losses held in one tensor
def _stacked(losses: List[Tensor], how: str):
    if how == "stack":
        return torch.stack(losses)
    if how == "unbind":
        return torch.stack(losses).unbind()
    if how == "list":
        return list(torch.stack(losses))
    if how == "cat":
        return torch.cat([loss.reshape(1) for loss in losses])
    out = torch.zeros(len(losses))  # LibMTL: train_losses[i] = loss
    for i, loss in enumerate(losses):
        out[i] = loss
    return out


@pytest.mark.parametrize("how", ["stack", "unbind", "list", "cat", "preallocated"])
def test_losses_in_one_tensor_train_exactly_like_separate_losses(how: str) -> None:
    a, b = net(), net()
    ref = run(a)
    got = run(b, how=lambda z, losses: {"losses": _stacked(losses, how)})
    assert same(a, b)
    assert got.partition is not None and ref.partition is not None
    assert [len(t) for t in got.partition.tasks] == [2, 2], "every head stays task-specific"
    assert len(got.partition.shared) == len(ref.partition.shared) == 4


def test_mixed_elements_refuse_to_guess_the_partition() -> None:
    model = net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    _, losses = model(0)
    mix = torch.tensor([[1.0, 0.5], [0.0, 1.0]]) @ torch.stack(losses)
    with pytest.raises(ValueError, match="separate losses|partition explicitly"):
        opt.step(mix)
    assert opt.partition is None


# ---------------------------------------------------------------------- 6. TorchJD weightings as surgery
def test_a_torchjd_gramian_weighting_is_accepted_as_surgery() -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    model = net()
    opt = MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), surgery=aggregation.UPGradWeighting()
    )
    _, losses = model(0)
    trunk = list(model.trunk.parameters())
    rows = [torch.autograd.grad(loss, trunk, retain_graph=True) for loss in losses]
    jac = torch.stack([torch.cat([g.flatten() for g in r]) for r in rows])
    want = aggregation.UPGrad()(jac)
    opt.step(losses)
    got = torch.cat([p.grad.flatten() for p in trunk])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_a_torchjd_matrix_weighting_is_refused() -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    model = net()
    with pytest.raises(TypeError, match="Gramian"):
        MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), surgery=aggregation.MeanWeighting())


# ---------------------------------------------------------------------- 7. the plain path is the inner optimizer
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_plain_configuration_is_the_inner_optimizer_bitwise(inner: str) -> None:
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    }[inner]
    a, b = net(), net()
    plain = make(a.parameters())
    opt = MultiTaskOptimizer(make(b.parameters()), surgery=None)
    for step in range(10):
        plain.zero_grad()
        sum(a(step)[1]).backward()
        plain.step()
        opt.zero_grad()
        opt.step(b(step)[1])
    assert same(a, b)
    assert opt.last_stats["gradient_mode"] == "plain"


def test_plain_path_still_skips_a_non_finite_step() -> None:
    model = net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), surgery=None)
    before = [p.detach().clone() for p in model.parameters()]
    _, losses = model(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step([losses[0] * float("nan"), losses[1]])
    assert opt.skipped == 1 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ---------------------------------------------------------------------- 9. zero_grad drops accumulation
def test_zero_grad_discards_accumulated_micro_batches() -> None:
    a, b = net(), net()
    opt_a = MultiTaskOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), seed=0)
    opt_b = MultiTaskOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), seed=0)
    opt_a.accumulate(a(5)[1])
    opt_a.zero_grad()
    opt_a.step(a(0)[1])  # no "accumulate() was called before" error: the micro-batch was dropped
    opt_b.zero_grad()
    opt_b.step(b(0)[1])
    assert same(a, b)
    opt_a.accumulate(a(5)[1])
    opt_a.zero_grad()
    frozen = [p.detach().clone() for p in a.parameters()]
    opt_a.step()  # a bare step after zero_grad applies nothing stale
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), frozen))


# ---------------------------------------------------------------------- 10. checkpoints of another configuration
def test_a_checkpoint_of_another_configuration_is_refused() -> None:
    a = net()
    src = run(
        a, surgery="gradvac", precondition="adam", weighting="dwa", weighting_kwargs={"steps_per_epoch": 1}
    )
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b = net()
    dst = MultiTaskOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), surgery="pcgrad", seed=0)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError) as err:
        dst.load_state_dict(saved)
    for word in ("surgery", "precondition", "weighting"):
        assert word in str(err.value)
    after = dst.state_dict()
    assert after["multitask"]["config"] == before["multitask"]["config"]
    assert after["param_groups"] == before["param_groups"] and not after["state"]


def test_a_checkpoint_with_other_hyper_parameters_is_refused() -> None:
    src = run(net(), surgery="gradvac", surgery_kwargs={"beta": 0.25})
    dst = MultiTaskOptimizer(torch.optim.SGD(net().parameters(), lr=0.1), surgery="gradvac")
    with pytest.raises(ValueError, match="beta"):
        dst.load_state_dict(src.state_dict())


# ---------------------------------------------------------------------- 12. small things
def test_scheduler_error_for_learnable_weightings_names_task_names() -> None:
    model = net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MultiTaskOptimizer(inner, weighting="uncertainty")
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(RuntimeError, match="task_names="):
        opt.step(model(0)[1])


def test_reported_cosines_are_within_minus_one_and_one() -> None:
    model = net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    _, losses = model(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the second head is unused here
        opt.step([losses[0], losses[0] * 1.0])  # identical rows: cosine 1 up to rounding
    flat = [c for row in opt.last_stats["cosine"] for c in row]
    assert all(-1.0 <= c <= 1.0 for c in flat) and max(flat) == pytest.approx(1.0)


def test_one_warning_when_no_parameter_is_shared() -> None:
    heads: Dict[str, nn.Module] = {"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)}
    params = [p for h in heads.values() for p in h.parameters()]
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1))
    x = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            opt.step({name: h(x).pow(2).mean() for name, h in heads.items()})
    shared = [w for w in caught if "no parameter is shared" in str(w.message)]
    assert len(shared) == 1
