"""The README's code runs as written, and CI runs the README's test command.

Every ```python block of the sections listed in ``RUN`` is executed, in order, one
namespace per section, except two kinds of block marked on their first line:

- ``# before: <library>``: another library's code, shown next to ours in "Coming from
  ...". It is compiled (so it stays valid Python) but not run, since it needs that
  library; the TorchJD one is also run, and compared with ours, when TorchJD is installed.
- ``# requires torchjd``: run only when TorchJD is installed.
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch

from multitask_optim import AGGREGATORS, WEIGHTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

BEFORE = "# before:"
REQUIRES_TORCHJD = "# requires torchjd"
PORTING = "Coming from TorchJD, LibMTL or Pytorch-PCGrad"
#: Sections whose every python block runs (the markers above aside).
RUN = ["Losses and representations", PORTING, "Extending"]


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _blocks(text: str) -> List[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _subsection(section: str, title: str) -> str:
    match = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^### |\Z)", section, flags=re.S | re.M)
    assert match, f"README has no '### {title}' subsection"
    return match.group(1)


def _exec(block: str, namespace: Dict[str, Any]) -> None:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102


@pytest.fixture
def registries() -> Iterator[None]:
    """README examples register methods: remove them afterwards so no other test sees them."""
    saved = dict(AGGREGATORS.classes), dict(WEIGHTINGS.classes)
    try:
        yield
    finally:
        for registry, classes in zip((AGGREGATORS, WEIGHTINGS), saved):
            registry.classes.clear()
            registry.classes.update(classes)


def test_usage_blocks_run() -> None:
    blocks = _blocks(_section("Usage"))
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        _exec(block, namespace)
    opt = namespace["opt"]
    assert [g["task"] for g in opt.param_groups] == ["shared", "depth", "label"]
    for block in _blocks(_section("Methods")):
        _exec(block, namespace)
    assert namespace["opt"].param_groups[-1]["task"] == "weighting"


@pytest.mark.parametrize("title", RUN)
def test_section_blocks_run(title: str, registries: None) -> None:
    namespace: Dict[str, Any] = {}
    ran = 0
    for block in _blocks(_section(title)):
        if block.startswith(BEFORE):
            ast.parse(block)  # another library's code: valid Python, not run here
            continue
        if block.startswith(REQUIRES_TORCHJD):
            try:
                import torchjd  # noqa: F401
            except ImportError:
                continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # the README shows current spellings
            _exec(block, namespace)
        ran += 1
    assert ran >= 2, f"'{title}' runs fewer than two blocks"


def _run_section(title: str) -> Dict[str, Any]:
    namespace: Dict[str, Any] = {}
    for block in _blocks(_section(title)):
        if not block.startswith((BEFORE, REQUIRES_TORCHJD)):
            _exec(block, namespace)
    return namespace


def test_every_porting_subsection_shows_before_and_after() -> None:
    section = _section(PORTING)
    for title in ("TorchJD", "LibMTL", "Pytorch-PCGrad and pytorch_optimizer"):
        blocks = _blocks(_subsection(section, title))
        kinds = ["before" if b.startswith(BEFORE) else "after" for b in blocks]
        assert kinds == ["before", "after"], f"'### {title}': {kinds}"
    outside = [b for t in ("Usage", "Methods", *RUN) if t != PORTING for b in _blocks(_section(t))]
    assert not [b for b in outside if b.startswith(BEFORE)], (
        "'# before:' blocks belong to the porting section"
    )


def _torchjd_pair() -> Tuple[str, str]:
    before, after = _blocks(_subsection(_section(PORTING), "TorchJD"))
    return before, after


def test_torchjd_before_and_after_train_the_same_parameters() -> None:
    pytest.importorskip("torchjd")
    before, after = _torchjd_pair()
    ours: Dict[str, Any] = {}
    _exec(after, ours)
    theirs: Dict[str, Any] = {"batches": ours["batches"]}  # the same data; the block seeds its own model
    _exec(before, theirs)
    for name in ("shared", "head1", "head2"):
        for p, q in zip(ours[name].parameters(), theirs[name].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_readme_custom_methods_are_found_by_name_and_work(registries: None) -> None:
    namespace = _run_section("Extending")
    assert namespace["EqualPull"].name in AGGREGATORS and namespace["InitialLoss"].name in WEIGHTINGS
    weights = namespace["opt"].last_stats["weights"]
    assert weights[1] < weights[0], "the 100x loss gets the smaller weight"
    assert namespace["opt"].last_stats["coefficients"] == [1.0, 1.0], "surgery=None: the plain weighted sum"


def test_readme_custom_surgery_balances_and_weighting_uses_first_losses(registries: None) -> None:
    namespace = _run_section("Extending")
    EqualPull, InitialLoss = namespace["EqualPull"], namespace["InitialLoss"]
    from multitask_optim import AggregationContext, WeightingContext

    gram = torch.tensor([[[4.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    ctx = AggregationContext(torch.Generator(), torch.ones(3, dtype=torch.float64))
    coefs, _ = EqualPull().aggregate(gram, {}, ctx)
    torch.testing.assert_close(coefs, torch.tensor([[1.0 / 6.0, 1.0 / 3.0, 0.0]], dtype=torch.float64))

    weighting = InitialLoss()
    weighting.bind(("a", "b"))
    state: Dict[str, torch.Tensor] = {}
    wctx = WeightingContext(torch.Generator(), 0, ("a", "b"))
    w0, state0 = weighting.weights(torch.tensor([2.0, 4.0], dtype=torch.float64), state, wctx)
    w1, _ = weighting.weights(torch.tensor([1.0, 1.0], dtype=torch.float64), state0, wctx)
    assert w0.tolist() == w1.tolist() == [0.5, 0.25]
    assert state == {} and state0["first"].tolist() == [2.0, 4.0], "the old state is not mutated"
    with pytest.raises(ValueError, match="'b'"):
        weighting.weights(torch.tensor([1.0, 0.0], dtype=torch.float64), state, wctx)


def test_ci_runs_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", _section("Fresh machine"), flags=re.S)
    assert len(commands) == 2, "the README holds exactly two set-up commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci


def test_every_registered_method_is_in_the_methods_table() -> None:
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", _section("Methods"), flags=re.M))
    library = {
        name
        for registry in (AGGREGATORS, WEIGHTINGS)
        for name, cls in registry.classes.items()
        if cls.__module__.startswith("multitask_optim.")
    }
    assert library - rows == set(), "registered methods missing from the README's Methods table"
    assert rows - library == set(), "the Methods table names a method that is not registered"


def test_demo_command_runs_the_quality_benchmark() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", _section("Fresh machine"), flags=re.S)
    assert "python -m benchmarks.quality" in commands[0]
    assert (ROOT / "benchmarks" / "quality.py").exists()


def test_pytorch_optimizer_pcgrad_is_as_the_porting_table_says() -> None:
    """The table's pytorch_optimizer row: whole-vector projection (heads included), mean on
    the shared parameters only; ours leaves the heads their own loss's gradient."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    from multitask_optim import MultiTaskOptimizer

    def run(make_opt, theirs: bool) -> List[torch.Tensor]:
        torch.manual_seed(0)
        trunk, head1, head2 = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        with torch.no_grad():
            head2.weight.copy_(-head1.weight)  # opposite trunk gradients (norms 1 : 2): a conflict
        params = [*trunk.parameters(), *head1.parameters(), *head2.parameters()]
        opt = make_opt(params)
        z = trunk(torch.randn(4, 3))
        losses = [head1(z).sum(), 2 * head2(z).sum()]
        opt.zero_grad()
        if theirs:
            opt.pc_backward(losses)
        else:
            opt.step(losses)
        return [p.grad.clone() for p in params]

    def pytorch_optimizer_pcgrad(reduction: str):
        return lambda ps: pytorch_optimizer.PCGrad(torch.optim.SGD(ps, lr=0.0), reduction=reduction)

    mean = run(pytorch_optimizer_pcgrad("mean"), theirs=True)
    total = run(pytorch_optimizer_pcgrad("sum"), theirs=True)
    ours = run(lambda ps: MultiTaskOptimizer(torch.optim.SGD(ps, lr=0.0), seed=0), theirs=False)
    for a, b in zip(mean[:2], total[:2]):  # trunk: averaged under "mean", summed under "sum"
        torch.testing.assert_close(2 * a, b)
    for a, b in zip(mean[2:], total[2:]):  # heads: summed under both
        torch.testing.assert_close(a, b)
    own_head = [torch.full_like(ours[3], 4.0)]  # d(sum of 4 outputs)/d bias
    torch.testing.assert_close(ours[3], own_head[0])  # ours: the head's own gradient
    assert not torch.allclose(mean[3], own_head[0]), "theirs: the head's gradient is projected"
    assert all(float(g.abs().max()) < 1e-6 for g in ours[:2]), "opposite trunk rows cancel under PCGrad"
    assert float(mean[0].abs().max()) > 1e-3, "their coefficients count the heads: the rows do not cancel"
