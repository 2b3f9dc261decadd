"""Mixed precision on CPU: bf16 autocast, and fp16 autocast with ``torch.amp.GradScaler``.

With ``grad_scaler=scaler`` the optimizer scales the losses, unscales every per-task
gradient before weighting, preconditioning or the Gram, skips a step with an inf/NaN
(leaving no trace: parameters, inner-optimizer state, accumulators, GradVac targets,
weighting parameters and the generator are untouched) and updates the scale itself
(back-off on a skipped step, growth after ``growth_interval`` clean steps).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from models import MultiHead
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer

BATCH = 32
IN_DIM = 6
HIDDEN = 16


def build(k: int = 3) -> MultiHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(77)
        return MultiHead(k, IN_DIM, HIDDEN)


def batch(step: int, k: int = 3) -> Tuple[Tensor, List[Tensor]]:
    g = torch.Generator().manual_seed(31 * step + 3)
    x = torch.randn(BATCH, IN_DIM, generator=g)
    base = torch.randn(BATCH, 2, generator=g) * 0.2 + 0.2
    targets = [(-1.0) ** i * base + 0.05 * torch.randn(BATCH, 2, generator=g) for i in range(k)]
    return x, targets


def losses_under(
    model: nn.Module, x: Tensor, targets: List[Tensor], dtype: Optional[torch.dtype]
) -> List[Tensor]:
    if dtype is None:
        outputs = model(x)
    else:
        with torch.autocast("cpu", dtype=dtype):
            outputs = model(x)
    return [F.mse_loss(y.float(), t) for y, t in zip(outputs, targets)]


def make_opt(
    model: nn.Module, scaler=None, inner="adam", surgery="gradvac", precondition="adam", weighting=None
):
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=1e-2) if inner == "adam" else torch.optim.SGD(params, lr=0.1)
    return MultiTaskOptimizer(
        opt,
        surgery=surgery,
        precondition=precondition,
        weighting=weighting,
        num_tasks=model.k,
        seed=5,
        grad_scaler=scaler,
    )


def fp16_scaler(**kw: Any) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2, **kw)


def leaves(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """Every leaf of a nested state dict (tensors cloned), keyed by its path."""
    if isinstance(obj, dict):
        out: Dict[str, Any] = {}
        for key, value in obj.items():
            out.update(leaves(value, f"{prefix}/{key}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for n, value in enumerate(obj):
            out.update(leaves(value, f"{prefix}/{n}"))
        return out
    return {prefix: obj.clone() if isinstance(obj, Tensor) else copy.deepcopy(obj)}


def assert_same_leaves(a: Dict[str, Any], b: Dict[str, Any], ignore: Tuple[str, ...] = ()) -> None:
    """Every leaf equal, but those at or below a path in ``ignore``."""
    assert a.keys() == b.keys()
    for key in a:
        if any(key == path or key.startswith(path + "/") for path in ignore):
            continue
        if isinstance(a[key], Tensor):
            assert torch.equal(a[key], b[key]), f"state {key} differs"
        else:
            assert a[key] == b[key], f"state {key} differs: {a[key]!r} vs {b[key]!r}"


def assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), f"{name} differs: max |diff| {(p - q).detach().abs().max().item():.3e}"


# ---------------------------------------------------------------------- bf16
@pytest.mark.parametrize("mode", ["auto", "frontier", "lean"])
def test_bf16_autocast_trains_unchanged(mode: str) -> None:
    model = build()
    precondition = "adam" if mode != "lean" else None
    opt = MultiTaskOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        surgery="pcgrad",
        precondition=precondition,
        gradient_mode=mode,
        seed=0,
    )
    x, targets = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.trunk(x).dtype == torch.bfloat16, "autocast must really run the trunk in bf16"
    history = []
    for _ in range(40):
        losses = losses_under(model, x, targets, torch.bfloat16)
        opt.zero_grad()
        opt.step(losses)
        history.append(sum(opt.last_stats["losses"]))
        assert opt.last_stats["skipped"] == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.8 * history[0], f"the loss must decrease: {history[0]:.4f} -> {history[-1]:.4f}"
    assert opt.engine.mode == ("looped" if mode == "auto" else mode)  # a step this small: looped


def test_bf16_autocast_follows_the_float32_run() -> None:
    """The bf16 run stays near the float32 one (bf16 has ~3 significant digits; observed <= 7% of the movement)."""
    a, b = build(), build()
    oa, ob = make_opt(a, surgery="pcgrad"), make_opt(b, surgery="pcgrad")
    for step in range(5):
        x, targets = batch(step)
        oa.zero_grad()
        oa.step(losses_under(a, x, targets, torch.bfloat16))
        ob.zero_grad()
        ob.step(losses_under(b, x, targets, None))
    start = build()
    for p, q, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        moved = float((q - p0).detach().abs().max())
        assert float((p - q).detach().abs().max()) <= 0.2 * moved + 1e-6


# ---------------------------------------------------------------------- fp16 + GradScaler
def test_cpu_fp16_autocast_and_grad_scaler_are_real() -> None:
    """Preconditions of the tests below: CPU autocast runs linear layers in float16 and
    a CPU GradScaler is enabled and scales."""
    model = build()
    x, _ = batch(0)
    with torch.autocast("cpu", dtype=torch.float16):
        assert model(x)[0].dtype == torch.float16
    scaler = fp16_scaler()
    assert scaler.is_enabled()
    assert scaler.get_scale() == 2.0**16


@pytest.mark.parametrize(
    "surgery,precondition",
    [
        ("gradvac", "adam"),
        ("pcgrad", None),
        (None, "rmsprop"),
        ("graddrop", None),
        ("trimmed_mean", None),
        ("excess_mtl", None),
        ("db_mtl", "adam"),
        ("moco", None),
    ],
)
def test_float32_scaled_steps_equal_unscaled_bitwise(surgery, precondition) -> None:
    """Without autocast, a power-of-two scale is exact: scaled and unscaled runs agree bit
    for bit (a scale left in a gradient would show through the preconditioner's eps, the
    GradVac cosines' thresholds or the SGD step size)."""
    a, b = build(), build()
    sa = fp16_scaler()
    oa = make_opt(a, sa, inner="sgd", surgery=surgery, precondition=precondition)
    ob = make_opt(b, None, inner="sgd", surgery=surgery, precondition=precondition)
    for step in range(6):
        x, targets = batch(step)
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            opt.step(losses_under(model, x, targets, None))
        assert_bitwise(a, b)
    assert sa.get_scale() == 2.0**19, "6 clean steps with growth_interval=2 grow the scale 3 times"
    assert_same_leaves(leaves(oa.state_dict()), leaves(ob.state_dict()))


@pytest.mark.parametrize("surgery,precondition,inner", [("pcgrad", None, "sgd"), ("gradvac", "adam", "adam")])
def test_fp16_scaled_update_equals_the_unscaled_update(surgery, precondition, inner) -> None:
    """fp16 autocast: with the scaler the update equals the one without it (scaler
    disabled) to fp16 tolerance; the scale grows as it should meanwhile."""
    a, b = build(), build()
    sa = fp16_scaler()
    sb = torch.amp.GradScaler("cpu", enabled=False)
    oa = make_opt(a, sa, inner=inner, surgery=surgery, precondition=precondition)
    ob = make_opt(b, sb, inner=inner, surgery=surgery, precondition=precondition)
    start = build()
    scales = []
    for step in range(3):
        x, targets = batch(step)
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            opt.step(losses_under(model, x, targets, torch.float16))
        assert oa.last_stats["skipped"] == 0 and ob.last_stats["skipped"] == 0
        scales.append(sa.get_scale())
        for p, q, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
            update = float((q - p0).detach().abs().max())
            assert update > 0
            assert float((p - q).detach().abs().max()) <= 1e-3 * update
    assert scales == [2.0**16, 2.0**17, 2.0**17]
    assert all(p.dtype == torch.float32 for p in a.parameters())


def _fp16_step(model: nn.Module, opt: MultiTaskOptimizer, step: int, blow_up: float = 1.0) -> None:
    x, targets = batch(step)
    losses = losses_under(model, x, targets, torch.float16)
    losses[0] = losses[0] * blow_up
    opt.zero_grad()
    opt.step(losses)


def test_fp16_overflow_skips_the_step_without_a_trace_and_backs_off() -> None:
    """Loss 0 times 2**20: its value is finite but its scaled gradient overflows float16.

    The step is skipped: no parameter, inner-optimizer state, preconditioning
    accumulator, GradVac target, weighting parameter or generator changes; the scale is
    multiplied by ``backoff_factor``; the run then equals (bit for bit) one that never
    took that step once its scaler is given the same scale; the scale grows again after
    ``growth_interval`` clean steps."""
    kw = {"surgery": "gradvac", "precondition": "adam", "weighting": "uncertainty"}
    a = build()
    never = build()
    sa, sn = fp16_scaler(backoff_factor=0.25), fp16_scaler(backoff_factor=0.25)
    oa, on = make_opt(a, sa, **kw), make_opt(never, sn, **kw)
    for step in range(2):
        _fp16_step(a, oa, step)
        _fp16_step(never, on, step)
    assert sa.get_scale() == 2.0**17  # grown after 2 clean steps
    assert oa.last_stats["skipped"] == 0

    params = [p.detach().clone() for p in a.parameters()]
    weighting = [p.detach().clone() for p in oa.weighting.parameters()]
    state = leaves(oa.state_dict())
    generator = oa._generator.get_state().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fp16_step(a, oa, 2, blow_up=2.0**20)
    assert all(bool(torch.isfinite(torch.tensor(v))) for v in oa.last_stats["losses"]), "the loss is finite"
    assert any("skipped" in str(w.message) for w in caught)
    assert oa.last_stats["skipped"] == 1 and oa.last_stats["skipped_step"] is True
    assert sa.get_scale() == 2.0**17 * 0.25, "backed off by backoff_factor"
    for p, q in zip(a.parameters(), params):
        assert torch.equal(p, q)
    for p, q in zip(oa.weighting.parameters(), weighting):
        assert torch.equal(p, q)
    assert torch.equal(oa._generator.get_state(), generator)
    after = leaves(oa.state_dict())
    assert oa.skipped == 1 and after["/multitask/skipped/count"] == 1
    assert_same_leaves(state, after, ignore=("/multitask/skipped",))  # but the skip count
    assert any(k.startswith("/multitask/states/surgery") for k in state), "GradVac targets are in the state"
    assert any(k.startswith("/multitask/states/precondition") for k in state), "accumulators are in the state"
    assert any(k.startswith("/state/") for k in state), "the inner Adam's moments are in the state"

    # the same run without that step, given the same scale
    sn.load_state_dict(sa.state_dict())
    for step in range(3, 7):
        _fp16_step(a, oa, step)
        _fp16_step(never, on, step)
        assert oa.last_stats["skipped"] == 1, f"step {step} must not overflow"
        assert sa.get_scale() == sn.get_scale()
        if step == 4:
            assert sa.get_scale() == 2.0**16, "grown after growth_interval clean steps"
    assert_bitwise(a, never)
    assert_same_leaves(leaves(oa.state_dict()), leaves(on.state_dict()), ignore=("/multitask/skipped",))


def test_fp16_overflow_in_one_micro_batch_skips_the_accumulated_step() -> None:
    model = build()
    scaler = fp16_scaler()
    opt = make_opt(model, scaler, surgery="pcgrad", precondition=None)
    before = [p.detach().clone() for p in model.parameters()]
    x, targets = batch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n, idx in enumerate(torch.arange(BATCH).chunk(2)):
            losses = [
                loss / 2 for loss in losses_under(model, x[idx], [t[idx] for t in targets], torch.float16)
            ]
            if n == 1:
                losses[2] = losses[2] * 2.0**20
            opt.accumulate(losses)
        opt.step()
    assert opt.last_stats["skipped"] == 1
    assert scaler.get_scale() == 2.0**15
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
