"""MultiTaskOptimizer at its boundary: bad input, non-finite steps, scales, statistics.

What the project design (DESIGN.md, shared with the developers), section 2 (steps 1, 4, 5, 9),
promises a user who hands ``step`` the wrong thing or extreme values:

- bad input raises a ``ValueError``/``TypeError`` naming the task or the argument, before
  *any* state changes (parameters, ``.grad``, the inner optimizer's state, the partition,
  the accumulators, the aggregator state and the generator), on the first step (automatic
  partition not yet discovered) as on a later one, and a correct step afterwards trains
  exactly as if the bad call never happened;
- a non-finite loss or gradient skips the step without a trace, counts it and warns once;
- per-task preconditioning makes the trajectory invariant to a task's loss scale (up to eps) and
  follows ``g_i / (sqrt(v_i) + eps)``;
- ``beta``/``reduction`` reach the aggregator; ``last_stats`` reports the true cosines;
- Gram entries that overflow or underflow float32 still give the PCGrad direction.

Every model here is small and defined in this file; everything is seeded and on the CPU.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

from multitask_optim import MultiTaskOptimizer

NAMES = ("a", "b")


# ---------------------------------------------------------------------- small models
class Net(nn.Module):
    """A shared trunk and one linear head per task (regression to column i of y).

    ``outside`` is a parameter that is never handed to the optimizer. With
    ``all_shared=True`` there are no heads: one shared output layer whose column i is
    task i's prediction, so every parameter is shared.
    """

    def __init__(self, names: Sequence[str] = NAMES, dtype: torch.dtype = torch.float32, all_shared=False):
        super().__init__()
        self.names = tuple(names)
        self.all_shared = all_shared
        self.trunk = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        if all_shared:
            self.out = nn.Linear(6, len(self.names))
            self.heads = nn.ModuleDict()
        else:
            self.heads = nn.ModuleDict({n: nn.Linear(6, 1) for n in self.names})
        self.outside = nn.Parameter(torch.randn(3))
        self.to(dtype)

    def managed(self) -> List[nn.Parameter]:
        """The parameters handed to the optimizer (everything but ``outside``)."""
        out = list(self.trunk.parameters())
        out += list(self.out.parameters()) if self.all_shared else list(self.heads.parameters())
        return out

    def shared(self) -> List[nn.Parameter]:
        return list(self.trunk.parameters()) + (list(self.out.parameters()) if self.all_shared else [])

    def task_params(self) -> Dict[str, List[nn.Parameter]]:
        return {n: list(h.parameters()) for n, h in self.heads.items()}

    def predictions(self, x: Tensor) -> Dict[str, Tensor]:
        z = self.trunk(x)
        if self.all_shared:
            out = self.out(z)
            return {n: out[:, i] for i, n in enumerate(self.names)}
        return {n: h(z).squeeze(-1) for n, h in self.heads.items()}

    def losses(self, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
        pred = self.predictions(x)
        return {n: (pred[n] - y[:, i]).pow(2).mean() for i, n in enumerate(self.names)}


def make_net(seed: int = 0, **kwargs: Any) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def batch(t: int, k: int = 2, dtype: torch.dtype = torch.float32, n: int = 16):
    gen = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(n, k, generator=gen, dtype=torch.float64)
    # the targets pull the tasks apart so that some shared gradients conflict
    y = y + torch.linspace(-2.0, 2.0, k, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


class _BadGrad(torch.autograd.Function):
    """Identity forward; backward returns ``value`` (nan or inf) everywhere."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, value: float) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.value = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        return grad * 0.0 + ctx.value, None


# ---------------------------------------------------------------------- state snapshots
def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    return obj


def assert_bitwise(a: Any, b: Any, path: str = "") -> None:
    """Recursive equality; tensors compared bit for bit (so nan == nan, 0.0 != -0.0)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        bits_a = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        bits_b = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(bits_a, bits_b), f"{path}: tensors differ (max abs diff {_maxdiff(a, b)})"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (
            f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        )
        for k in a:
            assert_bitwise(a[k], b[k], f"{path}[{k!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for n, (u, v) in enumerate(zip(a, b)):
            assert_bitwise(u, v, f"{path}[{n}]")
        return
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    assert a == b, f"{path}: {a!r} vs {b!r}"


def _maxdiff(a: Tensor, b: Tensor) -> float:
    if a.is_floating_point():
        return float((a.double() - b.double()).abs().max())
    return float("nan")


def snapshot(net: Net, opt: MultiTaskOptimizer) -> Dict[str, Any]:
    """Everything a step may change: parameters, grads, every state dict, the partition."""
    params = [*net.managed(), net.outside]
    part = opt.partition
    return _clone(
        {
            "params": [p.data for p in params],
            "grads": [p.grad for p in params],
            "inner": opt.optimizer.state_dict(),
            "state_dict": opt.state_dict(),
            "generator": opt._generator.get_state(),
            "groups": [[id(p) for p in g["params"]] for g in opt.param_groups],
            "tasks": opt.tasks,
            "partition": None
            if part is None
            else (
                [id(p) for p in part.shared],
                [[id(p) for p in t] for t in part.tasks],
                [id(p) for p in part.unused],
            ),
        }
    )


def fill_grads(net: Net, seed: int) -> None:
    """Random ``.grad`` everywhere, so a stray write into ``.grad`` is seen."""
    gen = torch.Generator().manual_seed(seed)
    for p in [*net.managed(), net.outside]:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def good_step(net: Net, opt: MultiTaskOptimizer, t: int) -> None:
    opt.zero_grad()
    opt.step(net.losses(*batch(t, len(net.names))))


def flat(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in params])


# ---------------------------------------------------------------------- 1. bad input, per step
def _build(mode: str, **kwargs: Any):
    net = make_net()
    inner = torch.optim.Adam(net.managed(), lr=1e-2)
    options: Dict[str, Any] = dict(surgery="gradvac", precondition="adam", seed=11)
    options.update(kwargs)
    if mode == "explicit":
        options.update(shared=net.shared(), tasks=net.task_params())
    return net, MultiTaskOptimizer(inner, **options)


def _losses_99(net: Net) -> Dict[str, Tensor]:
    return net.losses(*batch(99))


def _cross_reach(net: Net) -> Dict[str, Tensor]:
    """Task b's loss also reaches head a's parameters (with a zero coefficient)."""
    x, y = batch(99)
    z = net.trunk(x)
    la = (net.heads["a"](z).squeeze(-1) - y[:, 0]).pow(2).mean()
    lb = (net.heads["b"](z).squeeze(-1) - y[:, 1]).pow(2).mean() + 0.0 * net.heads["a"](z).sum()
    return {"a": la, "b": lb}


def _with_b(value: Callable[[Net, Dict[str, Tensor]], Any]) -> Callable[[Net], Dict[str, Any]]:
    def build(net: Net) -> Dict[str, Any]:
        losses: Dict[str, Any] = _losses_99(net)
        losses["b"] = value(net, losses)
        return losses

    return build


# name: (builder, exception, regex the message must match, raises on an auto partition's first step)
BAD_LOSSES: Dict[str, tuple] = {
    "too_many": (
        lambda n: [*_losses_99(n).values(), _losses_99(n)["a"] * 2],
        ValueError,
        r"expected 2 losses.*got 3",
        False,
    ),
    "too_few": (lambda n: [_losses_99(n)["a"]], ValueError, r"expected 2 losses.*got 1", False),
    "empty": (lambda n: [], ValueError, r"loss", True),
    # a task left out of the mapping is absent from the step (tests/test_absent_tasks.py); none at all is an error
    "dict_none_present": (
        lambda n: {"a": None, "b": None},
        ValueError,
        r"no task is present|None is absent",
        False,
    ),
    "dict_unknown": (
        lambda n: {**_losses_99(n), "c": _losses_99(n)["a"] * 3},
        ValueError,
        r"unknown \['c'\]",
        False,
    ),
    "dict_renamed": (
        lambda n: {"a": _losses_99(n)["a"], "c": _losses_99(n)["b"]},
        ValueError,
        r"missing \['b'\].*unknown \['c'\]",
        False,
    ),
    "non_scalar": (_with_b(lambda n, ls: ls["b"] * torch.ones(2)), ValueError, r"'b'.*scalar", True),
    "non_tensor": (_with_b(lambda n, ls: 1.5), TypeError, r"'b'.*tensor", True),
    "int_dtype": (_with_b(lambda n, ls: torch.tensor(3)), TypeError, r"'b'", True),
    "complex_dtype": (
        _with_b(lambda n, ls: ls["b"].to(torch.complex64)),
        TypeError,
        r"'b'",
        True,
    ),
    "detached": (_with_b(lambda n, ls: ls["b"].detach()), ValueError, r"'b'.*grad", True),
    "outside_param": (
        _with_b(lambda n, ls: n.outside.pow(2).sum()),
        ValueError,
        r"'b'.*not connected",
        True,
    ),
    "non_param_leaf": (
        _with_b(lambda n, ls: torch.ones(3, requires_grad=True).pow(2).sum()),
        ValueError,
        r"'b'.*not connected",
        True,
    ),
    "single_tensor": (lambda n: _losses_99(n)["a"], TypeError, r"losses.*tensor", True),
    "cross_reach": (_cross_reach, ValueError, r"task 'a'.*task 'b'", False),
}


def _bad_cases():
    for case, (_, _, _, on_auto_first) in BAD_LOSSES.items():
        for mode in ("auto", "explicit"):
            for when in ("first", "later"):
                if mode == "auto" and when == "first" and not on_auto_first:
                    continue  # the first step defines the tasks; nothing to disagree with yet
                yield pytest.param(case, mode, when, id=f"{case}-{mode}-{when}")


@pytest.mark.parametrize(("case", "mode", "when"), list(_bad_cases()))
def test_bad_losses_raise_before_any_state_change(case: str, mode: str, when: str) -> None:
    builder, exc, pattern, _ = BAD_LOSSES[case]
    net, opt = _build(mode)
    good = [0, 1, 2] if when == "first" else [0, 1]
    if when == "later":
        for t in good:
            good_step(net, opt, t)
    fill_grads(net, seed=5)
    before = snapshot(net, opt)
    with pytest.raises(exc, match=pattern):
        opt.step(builder(net))
    assert_bitwise(before, snapshot(net, opt))

    # a correct step afterwards trains exactly as if the bad call never happened
    rest = [0, 1, 2] if when == "first" else [2, 3]
    for t in rest:
        good_step(net, opt, t)
    ref_net, ref_opt = _build(mode)
    for t in sorted(set(good) | set(rest)):
        good_step(ref_net, ref_opt, t)
    assert opt.last_stats["skipped"] == 0
    assert_bitwise(flat(ref_net.managed()), flat(net.managed()))
    assert_bitwise(ref_opt.state_dict(), opt.state_dict())


def test_wrong_count_on_first_step_with_num_tasks() -> None:
    net = make_net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.managed(), lr=0.1), num_tasks=2, seed=0)
    fill_grads(net, 1)
    before = snapshot(net, opt)
    losses = list(net.losses(*batch(0)).values())
    with pytest.raises(ValueError, match=r"expected 2 losses.*got 3"):
        opt.step([*losses, losses[0] * 2])
    with pytest.raises(ValueError, match=r"missing \['1'\].*unknown \['b'\]"):
        opt.step({"0": losses[0], "b": losses[1]})
    assert_bitwise(before, snapshot(net, opt))
    opt.zero_grad()
    opt.step(losses)
    assert opt.tasks == ("0", "1")


# ---------------------------------------------------------------------- 1. bad input, constructor
def _explicit(net: Net, shared=None, **tasks: List[Tensor]) -> Dict[str, Any]:
    return {"shared": net.shared() if shared is None else shared, "tasks": tasks or net.task_params()}


def _heads(net: Net, name: str) -> List[Tensor]:
    return list(net.heads[name].parameters())


def _pre(name: str, **kwargs: Any) -> Dict[str, Any]:
    return {"precondition": name, "precondition_kwargs": kwargs}


def _surgery(name: Optional[str], **kwargs: Any) -> Dict[str, Any]:
    return {"surgery": name, "surgery_kwargs": kwargs}


BAD_CONSTRUCTORS: Dict[str, tuple] = {
    "param_in_two_tasks": (
        lambda n: _explicit(
            n,
            shared=[n.trunk[0].bias, *n.trunk[2].parameters()],
            a=[*_heads(n, "a"), n.trunk[0].weight],
            b=[*_heads(n, "b"), n.trunk[0].weight],
        ),
        ValueError,
        r"task 'a'.*task 'b'",
    ),
    "param_shared_and_task": (
        lambda n: _explicit(n, a=[*_heads(n, "a"), n.trunk[0].weight], b=_heads(n, "b")),
        ValueError,
        r"shared.*task 'a'",
    ),
    "param_listed_twice": (
        lambda n: _explicit(n, shared=[*n.shared(), n.trunk[0].weight]),
        ValueError,
        r"twice in shared",
    ),
    "unknown_param_in_shared": (
        lambda n: _explicit(n, shared=[*n.shared(), n.outside]),
        ValueError,
        r"shared.*not in the inner optimizer",
    ),
    "unknown_param_in_task": (
        lambda n: _explicit(n, a=_heads(n, "a"), b=[*_heads(n, "b"), n.outside]),
        ValueError,
        r"task 'b'.*not in the inner optimizer",
    ),
    "reserved_task_name": (
        lambda n: _explicit(n, a=_heads(n, "a"), shared=[], unused=_heads(n, "b")),
        ValueError,
        r"'unused'.*reserved",
    ),
    "shared_without_tasks": (lambda n: {"shared": n.shared()}, ValueError, r"shared=.*tasks="),
    "unknown_surgery": (lambda n: {"surgery": "pcgard"}, ValueError, r"surgery 'pcgard'"),
    "surgery_wrong_type": (lambda n: {"surgery": 3}, TypeError, r"surgery"),
    "unknown_precondition": (lambda n: {"precondition": "adamw"}, ValueError, r"precondition 'adamw'"),
    "bad_granularity": (lambda n: {"granularity": "layer"}, ValueError, r"granularity.*'layer'"),
    "granularity_unknown_param": (
        lambda n: {"granularity": [n.shared(), [n.outside]]},
        ValueError,
        r"granularity",
    ),
    "eps_zero": (lambda n: _pre("adam", eps=0.0), ValueError, r"eps"),
    "eps_negative": (lambda n: _pre("adagrad", eps=-1e-8), ValueError, r"eps"),
    "eps_nan": (lambda n: _pre("rmsprop", eps=float("nan")), ValueError, r"eps"),
    "beta2_one": (lambda n: _pre("adam", beta2=1.0), ValueError, r"beta2"),
    "beta2_negative": (lambda n: _pre("rmsprop", beta2=-0.1), ValueError, r"beta2"),
    "beta2_nan": (lambda n: _pre("adam", beta2=float("nan")), ValueError, r"beta2"),
    "beta_above_one": (lambda n: _surgery("gradvac", beta=1.5), ValueError, r"beta"),
    "beta_negative": (lambda n: _surgery("gradvac", beta=-0.1), ValueError, r"beta"),
    "beta_nan": (lambda n: _surgery("gradvac", beta=float("nan")), ValueError, r"beta"),
    "beta_for_pcgrad": (lambda n: _surgery("pcgrad", beta=0.5), TypeError, r"beta"),
    "reduction_pcgrad": (lambda n: _surgery("pcgrad", reduction="max"), ValueError, r"reduction"),
    "reduction_gradvac": (lambda n: _surgery("gradvac", reduction="avg"), ValueError, r"reduction"),
    "reduction_sum": (lambda n: _surgery(None, reduction="Mean"), ValueError, r"reduction"),
    "task_lr_unknown_task_explicit": (
        lambda n: {**_explicit(n), "task_lr": {"a": 0.1, "c": 0.2}},
        ValueError,
        r"task_lr.*'c'",
    ),
    "task_lr_unknown_task_num_tasks": (
        lambda n: {"num_tasks": 2, "task_lr": {"a": 0.1}},
        ValueError,
        r"task_lr.*'a'",
    ),
    "task_lr_list_too_long_explicit": (
        lambda n: {**_explicit(n), "task_lr": [0.1, 0.2, 0.3]},
        ValueError,
        r"task_lr.*3.*2",
    ),
    "task_lr_list_too_short_num_tasks": (
        lambda n: {"num_tasks": 2, "task_lr": [0.1]},
        ValueError,
        r"task_lr.*1.*2",
    ),
    "task_lr_negative": (lambda n: {"task_lr": {"a": -0.1}}, ValueError, r"task_lr"),
    "task_lr_wrong_type": (lambda n: {"task_lr": 0.1}, TypeError, r"task_lr"),
    "num_tasks_zero": (lambda n: {"num_tasks": 0}, ValueError, r"num_tasks"),
    "num_tasks_mismatch": (lambda n: {**_explicit(n), "num_tasks": 3}, ValueError, r"num_tasks"),
    "gradient_mode": (lambda n: {"gradient_mode": "fast"}, ValueError, r"gradient mode.*'fast'"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTORS))
def test_bad_constructor_arguments(case: str) -> None:
    builder, exc, pattern = BAD_CONSTRUCTORS[case]
    net = make_net()
    inner = torch.optim.Adam(net.managed(), lr=1e-2)
    # give the inner optimizer some state first, then check nothing of it moves
    inner.zero_grad()
    sum(net.losses(*batch(0)).values()).backward()
    inner.step()
    fill_grads(net, 3)
    params = [*net.managed(), net.outside]
    before = _clone(
        {"inner": inner.state_dict(), "params": [p.data for p in params], "grads": [p.grad for p in params]}
    )
    groups = [[id(p) for p in g["params"]] for g in inner.param_groups]
    with pytest.raises(exc, match=pattern):
        MultiTaskOptimizer(inner, **builder(net))
    after = _clone(
        {"inner": inner.state_dict(), "params": [p.data for p in params], "grads": [p.grad for p in params]}
    )
    assert_bitwise(before, after)
    assert [[id(p) for p in g["params"]] for g in inner.param_groups] == groups


@pytest.mark.parametrize(
    "task_lr", [{"a": 0.1, "nope": 0.2}, [0.1, 0.2, 0.3]], ids=["unknown-name", "list-length"]
)
def test_task_lr_mismatch_with_automatic_partition(task_lr: Any) -> None:
    """The task names only become known at the first step: the check must then run
    before anything is committed, and must not be lost on the next step."""
    net = make_net()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.managed(), lr=0.1), task_lr=task_lr, seed=0)
    fill_grads(net, 2)
    before = snapshot(net, opt)
    with pytest.raises(ValueError, match=r"task_lr"):
        opt.step(net.losses(*batch(0)))
    assert_bitwise(before, snapshot(net, opt))
    assert opt.partition is None and opt.tasks == ()
    # the same bad task_lr is still refused: it is never silently ignored
    with pytest.raises(ValueError, match=r"task_lr"):
        opt.step(net.losses(*batch(1)))


# ---------------------------------------------------------------------- 2. non-finite steps
def _bad_batch(net: Net, kind: str) -> Dict[str, Tensor]:
    x, y = batch(77)
    losses = net.losses(x, y)
    w = net.trunk[0].weight
    if kind == "inf_loss":
        losses["b"] = losses["b"] + float("inf")
    elif kind == "nan_loss":
        losses["a"] = losses["a"] * float("nan")
    elif kind == "nan_grad_sqrt":  # finite value, nan gradient on a shared tensor
        losses["b"] = losses["b"] + torch.sqrt(w - w).sum()
    elif kind == "nan_grad_trunk":  # custom Function: nan through the whole trunk
        z = _BadGrad.apply(net.trunk(x), float("nan"))
        losses = {n: (net.heads[n](z).squeeze(-1) - y[:, i]).pow(2).mean() for i, n in enumerate(NAMES)}
    elif kind == "inf_grad_head":  # only a task-specific gradient is non-finite
        z = net.trunk(x)
        head = net.heads["a"]
        weight = _BadGrad.apply(head.weight, float("inf"))
        pred = torch.nn.functional.linear(z, weight, head.bias).squeeze(-1)
        losses["a"] = (pred - y[:, 0]).pow(2).mean()
    else:  # pragma: no cover
        raise AssertionError(kind)
    for value in losses.values():
        assert value.requires_grad
    return losses


def _without(d: Dict[str, Any], *keys: str) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _comparable(snap: Dict[str, Any]) -> Dict[str, Any]:
    """The whole snapshot but the skip record: a skipped step changes nothing else (the
    skip count and reason are in the state dict, checked separately; the remembered
    gradient path is only kept once a step is taken)."""
    out = dict(snap)
    out["state_dict"] = dict(out["state_dict"])
    out["state_dict"]["multitask"] = {
        k: v for k, v in out["state_dict"]["multitask"].items() if k != "skipped"
    }
    return out


def test_non_finite_steps_are_skipped_without_a_trace() -> None:
    def build():
        net = make_net()
        inner = torch.optim.Adam(net.managed(), lr=1e-2)
        return net, MultiTaskOptimizer(
            inner, surgery="gradvac", precondition="adam", surgery_kwargs={"beta": 0.3}, seed=21
        )

    plan: List[Any] = [
        "inf_loss",  # the very first step: the partition is not discovered yet
        "nan_grad_sqrt",
        0,
        "nan_loss",
        1,
        "nan_grad_trunk",
        "inf_grad_head",
        2,
        3,
        "nan_grad_sqrt",
        4,
    ]
    net, opt = build()
    skipped = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for entry in plan:
            if isinstance(entry, int):
                good_step(net, opt, entry)
                assert opt.last_stats["skipped"] == skipped
                continue
            fill_grads(net, seed=len(caught) + skipped)
            before = snapshot(net, opt)
            losses = _bad_batch(net, entry)
            assert opt.step(losses) is None
            skipped += 1
            after = snapshot(net, opt)
            assert_bitwise(_comparable(before), _comparable(after), entry)
            assert opt.last_stats["skipped"] == skipped, entry
            assert opt.skipped == skipped == after["state_dict"]["multitask"]["skipped"]["count"]
            if entry == "inf_loss":
                assert opt.partition is None and opt.state_dict()["multitask"]["names"] is None
    skip_warnings = [w for w in caught if "skipped" in str(w.message)]
    assert len(skip_warnings) == 1, [str(w.message) for w in caught]
    assert len(caught) == 1, [str(w.message) for w in caught]

    ref_net, ref_opt = build()
    for entry in plan:
        if isinstance(entry, int):
            good_step(ref_net, ref_opt, entry)
    assert ref_opt.state_dict()["multitask"]["states"]["surgery"]["targets"].abs().sum() > 0
    assert ref_opt.state_dict()["multitask"]["states"]["precondition"]
    assert_bitwise(flat(ref_net.managed()), flat(net.managed()))
    ref_state, state = ref_opt.state_dict(), opt.state_dict()
    assert opt.skipped == skipped and ref_opt.skipped == 0
    ref_state["multitask"] = _without(ref_state["multitask"], "skipped")
    state["multitask"] = _without(state["multitask"], "skipped")
    assert_bitwise(ref_state, state)


# ---------------------------------------------------------------------- 3. scale invariance
def _trajectory(
    inner: str,
    all_shared: bool,
    precondition: Optional[str],
    scale: float,
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float64,
):
    """20 steps with task ``a``'s loss times ``scale``. In float64 by default: the
    invariance is exact arithmetic's, and under an inner Adam the float32 rounding of a
    coordinate where the normalised task gradients cancel (1e-7 of them, above Adam's
    eps) became an lr-sized step whose sign depends on the CPU's summation order."""
    net = make_net(seed=4, all_shared=all_shared, dtype=dtype)
    params = net.managed()
    if inner == "adam":
        base: torch.optim.Optimizer = torch.optim.Adam(params, lr=1e-2)
    else:
        base = torch.optim.SGD(params, lr=1e-2)
    opt = MultiTaskOptimizer(
        base, precondition=precondition, precondition_kwargs={"eps": eps} if precondition else None, seed=8
    )
    start = flat(params)
    first_update = None
    for t in range(20):
        losses = net.losses(*batch(t, dtype=dtype))
        losses["a"] = losses["a"] * scale
        opt.zero_grad()
        opt.step(losses)
        if first_update is None:
            first_update = torch.cat([p.grad.reshape(-1).double() for p in net.shared()])
    return start, flat(params), first_update


def _relative_change(a: Tensor, b: Tensor, start: Tensor) -> float:
    return float((a - b).norm() / (a - start).norm())


# With an inner SGD a task head's own step is not preconditioned (the project design
# (DESIGN.md, shared with the developers), section 2, step 4), so the SGD case uses a
# model whose every parameter is shared. With an inner Adam the
# preconditioner's eps is set negligible: the invariance holds "up to eps", and an inner
# Adam turns eps-sized differences in coordinates where the tasks' normalised gradients
# cancel into full lr-sized steps (the default eps is checked on the update itself below).
SCALE_CASES = [
    pytest.param("adam", False, 1e-30, id="adam-heads"),
    pytest.param("adam", True, 1e-30, id="adam-all-shared"),
    pytest.param("sgd", True, 1e-8, id="sgd-all-shared"),
]


@pytest.mark.parametrize(("inner", "all_shared", "eps"), SCALE_CASES)
def test_per_task_preconditioning_is_scale_invariant(inner: str, all_shared: bool, eps: float) -> None:
    start, ref, _ = _trajectory(inner, all_shared, "adam", 1.0, eps)
    _, scaled, _ = _trajectory(inner, all_shared, "adam", 1000.0, eps)
    assert float((ref - start).norm()) > 0.5
    assert _relative_change(ref, scaled, start) < 1e-4

    # sanity: the same change without preconditioning moves the trajectory a lot
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain SGD on a 1000x loss may diverge and skip steps
        start, plain, _ = _trajectory(inner, all_shared, None, 1.0)
        _, plain_scaled, _ = _trajectory(inner, all_shared, None, 1000.0)
    assert not _relative_change(plain, plain_scaled, start) <= 1e-2


def test_preconditioned_update_is_scale_invariant_at_default_eps() -> None:
    """What the inner optimizer receives on the first step: unchanged up to eps (the
    project design (DESIGN.md, shared with the developers), section 4)."""
    _, _, ref = _trajectory("adam", False, "adam", 1.0)
    _, _, scaled = _trajectory("adam", False, "adam", 1000.0)
    assert float((scaled - ref).norm() / ref.norm()) < 1e-4
    _, _, plain = _trajectory("adam", False, None, 1.0)
    _, _, plain_scaled = _trajectory("adam", False, None, 1000.0)
    assert float((plain_scaled - plain).norm() / plain.norm()) > 1.0


# ---------------------------------------------------------------------- 4. adagrad identity
@pytest.mark.parametrize("eps", [1e-8, 0.05])
def test_adagrad_first_step_is_sum_of_normalised_task_gradients(eps: float) -> None:
    lr = 0.1
    net = make_net(seed=2, dtype=torch.float64)
    opt = MultiTaskOptimizer(
        torch.optim.SGD(net.managed(), lr=lr),
        surgery=None,
        precondition="adagrad",
        precondition_kwargs={"eps": eps},
        seed=0,
    )
    x, y = batch(3, dtype=torch.float64)
    shared, heads = net.shared(), net.task_params()
    losses = net.losses(x, y)
    per_task = {n: torch.autograd.grad(losses[n], shared + heads[n], retain_graph=True) for n in NAMES}
    expected_shared = [
        p.detach() - lr * sum(per_task[n][i] / (per_task[n][i].abs() + eps) for n in NAMES)
        for i, p in enumerate(shared)
    ]
    expected_heads = {
        n: [p.detach() - lr * g for p, g in zip(heads[n], per_task[n][len(shared) :])] for n in NAMES
    }
    opt.zero_grad()
    opt.step(losses)
    for p, want in zip(shared, expected_shared):
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    for n in NAMES:
        for p, want in zip(heads[n], expected_heads[n]):
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    assert len(
        [k for k in opt.state_dict()["multitask"]["states"]["precondition"] if k.endswith(".v")]
    ) == len(shared)


# ---------------------------------------------------------------------- 5. beta and reduction
def _task_grads(losses: Dict[str, Tensor], params: Sequence[Tensor]) -> Dict[str, Tensor]:
    out = {}
    for n, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[n] = torch.cat(
            [torch.zeros(p.numel()) if g is None else g.reshape(-1) for p, g in zip(params, grads)]
        )
    return {n: g.double() for n, g in out.items()}


def _cos(u: Tensor, v: Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.parametrize("beta", [None, 0.25, 1.0])
def test_gradvac_beta_reaches_the_aggregator(beta: Optional[float]) -> None:
    net = make_net(seed=1)
    kwargs = None if beta is None else {"beta": beta}
    opt = MultiTaskOptimizer(
        torch.optim.SGD(net.managed(), lr=0.0), surgery="gradvac", surgery_kwargs=kwargs, seed=0
    )
    want = 0.5 if beta is None else beta
    assert opt.aggregator.beta == want
    losses = net.losses(*batch(0))
    g = _task_grads(losses, net.shared())
    phi = _cos(g["a"], g["b"])
    opt.step(losses)
    targets = opt.state_dict()["multitask"]["states"]["surgery"]["targets"]
    assert targets.shape == (1, 2, 2)
    # from zero targets, each visited pair moves to beta * (pre-correction cosine)
    assert targets[0, 0, 1].item() == pytest.approx(want * phi, rel=1e-5, abs=1e-7)
    assert targets[0, 1, 0].item() == pytest.approx(want * phi, rel=1e-5, abs=1e-7)


class _Aligned(nn.Module):
    """Two tasks whose shared gradients never conflict: positive heads, both losses
    linear and increasing in the (positive) trunk output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.trunk = nn.Linear(3, 5)
        self.heads = nn.ModuleDict({n: nn.Linear(5, 1) for n in NAMES})
        with torch.no_grad():
            for h in self.heads.values():
                h.weight.abs_()

    def losses(self) -> Dict[str, Tensor]:
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
        z = torch.nn.functional.softplus(self.trunk(x))
        return {n: h(z).mean() * (i + 1) for i, (n, h) in enumerate(self.heads.items())}


@pytest.mark.parametrize("surgery", [None, "pcgrad", "gradvac"])
def test_mean_reduction_halves_the_shared_update(surgery: Optional[str]) -> None:
    grads = {}
    for reduction in ("sum", "mean"):
        model = _Aligned()
        params = list(model.parameters())
        opt = MultiTaskOptimizer(
            torch.optim.SGD(params, lr=0.0),
            surgery=surgery,
            surgery_kwargs={"reduction": reduction},
            seed=0,
            gradient_mode="frontier",  # per-task statistics also for the plain sum
        )
        losses = model.losses()
        g = _task_grads(losses, list(model.trunk.parameters()))
        assert float(g["a"] @ g["b"]) > 0  # the case is non-conflicting
        opt.step(losses)
        grads[reduction] = [p.grad.clone() for p in params]
        assert opt.last_stats["conflicts"] == 0
    n_shared = len(list(_Aligned().trunk.parameters()))
    for s, m in zip(grads["sum"][:n_shared], grads["mean"][:n_shared]):
        torch.testing.assert_close(m, s / 2, rtol=1e-6, atol=0)
        assert s.abs().sum() > 0
    for s, m in zip(grads["sum"][n_shared:], grads["mean"][n_shared:]):
        assert torch.equal(s, m)  # a task's own parameters see their own loss only


# ---------------------------------------------------------------------- 6. last_stats
def _stats_case(k: int):
    names = tuple("abcdefgh"[:k])
    net = make_net(seed=3, names=names)
    opt = MultiTaskOptimizer(torch.optim.SGD(net.managed(), lr=0.0), surgery="pcgrad", seed=0)
    x, y = batch(5, k)
    losses = net.losses(x, y)
    g = _task_grads(losses, net.shared())
    return net, opt, losses, g


@pytest.mark.parametrize("k", [2, 3])
def test_last_stats_match_an_independent_computation(k: int) -> None:
    net, opt, losses, g = _stats_case(k)
    names = list(losses)
    opt.step(losses)
    stats = opt.last_stats
    assert {"cosine", "grad_norms", "conflicts", "coefficients", "weights", "losses", "skipped"} <= set(stats)
    cos = stats["cosine"]
    assert isinstance(cos, list) and len(cos) == k and all(isinstance(r, list) and len(r) == k for r in cos)
    assert all(isinstance(v, float) for r in cos for v in r)
    conflicts = 0
    for i, a in enumerate(names):
        assert cos[i][i] == pytest.approx(1.0, abs=1e-12)
        assert stats["grad_norms"][i] == pytest.approx(float(g[a].norm()), rel=1e-5)
        for j, b in enumerate(names):
            assert cos[i][j] == pytest.approx(_cos(g[a], g[b]), abs=1e-5)
            if i < j and float(g[a] @ g[b]) < 0:
                conflicts += 1
    assert conflicts >= 1  # the case exercises the surgery
    assert isinstance(stats["conflicts"], int) and stats["conflicts"] == conflicts
    assert stats["losses"] == pytest.approx([float(losses[n].detach()) for n in names], rel=1e-6)
    assert stats["weights"] == [1.0] * k
    assert stats["skipped"] == 0 and isinstance(stats["skipped"], int)
    assert len(stats["coefficients"]) == k and all(isinstance(c, float) for c in stats["coefficients"])
    if k == 2:
        # K = 2 PCGrad: each task projects once onto the other (order-free)
        a, b = g[names[0]], g[names[1]]
        dot = float(a @ b)
        assert dot < 0
        want = [1.0 - dot / float(a @ a), 1.0 - dot / float(b @ b)]
        assert stats["coefficients"] == pytest.approx(want, rel=1e-5)
        # and the shared .grad is J^T c
        shared_grad = torch.cat([p.grad.reshape(-1).double() for p in net.shared()])
        torch.testing.assert_close(shared_grad, want[0] * a + want[1] * b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- 7. Gram overflow / underflow
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_loss_scales_keep_the_pcgrad_direction(scale: float) -> None:
    k = 3

    def run(factor: float):
        net = make_net(seed=3, names=("a", "b", "c"))
        opt = MultiTaskOptimizer(torch.optim.SGD(net.managed(), lr=0.0), surgery="pcgrad", seed=5)
        losses = {n: loss * factor for n, loss in net.losses(*batch(5, k)).items()}
        opt.step(losses)
        shared = torch.cat([p.grad.reshape(-1).double() for p in net.shared()])
        heads = torch.cat([p.grad.reshape(-1).double() for p in net.heads.parameters()])
        return net, opt, shared, heads

    _, ref_opt, ref_shared, ref_heads = run(1.0)
    assert ref_opt.last_stats["conflicts"] >= 1
    net, opt, shared, heads = run(scale)
    assert opt.last_stats["skipped"] == 0
    for p in net.managed():
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all() and torch.isfinite(p).all()
    assert shared.norm() > 0
    assert _cos(shared, ref_shared) > 0.9999
    assert _cos(heads, ref_heads) > 0.9999
    assert float(shared.norm() / ref_shared.norm()) == pytest.approx(scale, rel=1e-3)
    assert all(math.isfinite(v) for row in opt.last_stats["cosine"] for v in row)
    for row, ref_row in zip(opt.last_stats["cosine"], ref_opt.last_stats["cosine"]):
        assert row == pytest.approx(ref_row, abs=1e-4)
    assert opt.last_stats["coefficients"] == pytest.approx(ref_opt.last_stats["coefficients"], rel=1e-3)


def test_mixed_extreme_scales_match_float64_pcgrad() -> None:
    """One task x 1e20, the other x 1e-20 (float32): the Gram (1e40 / 1e-40 entries) and
    the coefficients (up to ~1e40) leave float32, the update must not."""
    net, opt, losses, _ = _stats_case(2)
    scaled = {"a": losses["a"] * 1e20, "b": losses["b"] * 1e-20}
    g = _task_grads(scaled, net.shared())
    a, b = g["a"], g["b"]
    dot = float(a @ b)
    assert dot < 0
    want = (1.0 - dot / float(a @ a)) * a + (1.0 - dot / float(b @ b)) * b
    opt.step(scaled)
    assert opt.last_stats["skipped"] == 0
    got = torch.cat([p.grad.reshape(-1).double() for p in net.shared()])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert _cos(got, want) > 0.9999


# ---------------------------------------------------------------------- deprecated spellings
@pytest.mark.parametrize(
    "old,new",
    [
        (
            {"surgery": "pcgrad", "reduction": "mean"},
            {"surgery": "pcgrad", "surgery_kwargs": {"reduction": "mean"}},
        ),
        ({"surgery": "gradvac", "beta": 0.3}, {"surgery": "gradvac", "surgery_kwargs": {"beta": 0.3}}),
        (
            {"precondition": "adam", "eps": 1e-3, "beta2": 0.9},
            {"precondition": "adam", "precondition_kwargs": {"eps": 1e-3, "beta2": 0.9}},
        ),
        ({"precondition": None, "eps": 1e-3}, {"precondition": None}),  # ignored, as before the split
    ],
)
def test_deprecated_spellings_warn_and_equal_the_current_ones(
    old: Dict[str, Any], new: Dict[str, Any]
) -> None:
    def run(kwargs: Dict[str, Any]) -> Tuple[Tensor, Dict[str, Any]]:
        net = make_net(seed=3)
        opt = MultiTaskOptimizer(torch.optim.SGD(net.managed(), lr=0.1), seed=0, **kwargs)
        for step in range(2):
            opt.zero_grad()
            opt.step(net.losses(*batch(step)))
        return flat(net.managed()), opt.state_dict()["multitask"]["config"]

    with pytest.warns(DeprecationWarning, match=r"is deprecated: pass (surgery|precondition)_kwargs="):
        got, got_settings = run(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        want, want_settings = run(new)
    assert torch.equal(got, want) and got_settings == want_settings


def test_a_deprecated_spelling_that_disagrees_with_the_current_one_is_an_error() -> None:
    net = make_net()
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ValueError, match=r"beta= and surgery_kwargs\['beta'\]"),
    ):
        MultiTaskOptimizer(
            torch.optim.SGD(net.managed(), lr=0.1), surgery="gradvac", beta=0.3, surgery_kwargs={"beta": 0.5}
        )
