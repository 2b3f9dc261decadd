"""Every Python block of the documentation runs: each page's blocks in order, as one script.

Pages: ``docs/**/*.md``, the README and the generated method pages (their examples).
The markers a block may start with (``# not run: <reason>``, ``# requires: <module>``)
are described in :mod:`docs_blocks`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch
from docs_blocks import pages, run_page

from multitask_optim import AGGREGATORS, WEIGHTINGS

PAGES = pages()


@pytest.fixture
def registries() -> Iterator[None]:
    """Pages register example methods: remove them afterwards so no other test sees them."""
    saved = dict(AGGREGATORS.classes), dict(WEIGHTINGS.classes)
    try:
        yield
    finally:
        for registry, classes in zip((AGGREGATORS, WEIGHTINGS), saved):
            registry.classes.clear()
            registry.classes.update(classes)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_blocks_run(
    page: str, registries: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # examples may write files (a plot, a checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. the automatic partition's notes
        result = run_page(page, PAGES[page])
    assert result.ran + result.compiled_only == len(PAGES[page].split("```python")) - 1


def test_every_generated_method_page_has_a_running_example() -> None:
    generated = [p for p in PAGES if p.endswith("(generated)")]
    from docs_blocks import generator

    assert len(generated) == len(generator().methods()), "a method page without a Python example"


def test_markers_are_honoured() -> None:
    text = (
        "```python\nx = 1\n```\n"
        "```python\n# not run: needs two processes\nraise RuntimeError('never run')\n```\n"
        "```python\n# requires: a_module_that_does_not_exist\nraise RuntimeError('never run')\n```\n"
        "```python\ny = x + 1\n```\n"
    )
    result = run_page("example", text)
    assert (result.ran, result.compiled_only, result.namespace["y"]) == (2, 2, 2)
    with pytest.raises(AssertionError, match="needs a reason"):
        run_page("bad", "```python\n# not run\nx = 1\n```\n")
    with pytest.raises(SyntaxError):
        run_page("bad", "```python\n# not run: shown only\nx = (\n```\n")
    with pytest.raises(DeprecationWarning):
        run_page("old", "```python\nimport warnings\nwarnings.warn('old', DeprecationWarning)\n```\n")


def _torchjd_pair() -> Dict[str, Dict[str, Any]]:
    """The TorchJD porting page's before (TorchJD) and after (ours) namespaces, on the same data."""
    text = PAGES["docs/guides/porting-torchjd.md"]
    from docs_blocks import blocks

    before = next(b for b in blocks(text) if b.startswith("# requires: torchjd"))
    after = next(b for b in blocks(text) if "MultiTaskOptimizer(" in b and "upgrad" in b)
    ours: Dict[str, Any] = {}
    exec(compile(after, "porting-torchjd (ours)", "exec"), ours)  # noqa: S102
    theirs: Dict[str, Any] = {"batches": ours["batches"]}
    exec(compile(before, "porting-torchjd (TorchJD)", "exec"), theirs)  # noqa: S102
    return {"ours": ours, "theirs": theirs}


def test_torchjd_before_and_after_train_the_same_parameters() -> None:
    pytest.importorskip("torchjd")
    pair = _torchjd_pair()
    for name in ("shared", "head1", "head2"):
        for p, q in zip(pair["ours"][name].parameters(), pair["theirs"][name].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_getting_started_builds_the_groups_it_shows(registries: None) -> None:
    from docs_blocks import blocks

    page = PAGES["docs/getting-started.md"]
    code = blocks(page)
    upto = next(n for n, b in enumerate(code) if "task_lr=" in b) + 1  # the first loop, then task_lr
    namespace = run_page("getting-started", "".join(f"```python\n{b}```\n" for b in code[:upto])).namespace
    assert [g["task"] for g in namespace["opt"].param_groups] == ["shared", "depth", "label"]
    namespace = run_page("getting-started", page).namespace
    assert namespace["opt"].param_groups[-1]["task"] == "weighting"


def test_the_custom_methods_of_the_extending_guide_work(registries: None) -> None:
    namespace = run_page("extending", PAGES["docs/guides/extending.md"]).namespace
    assert namespace["EqualPull"].name in AGGREGATORS and namespace["InitialLoss"].name in WEIGHTINGS
    weights = namespace["opt"].last_stats["weights"]
    assert weights[1] < weights[0], "the 100x loss gets the smaller weight"
    assert namespace["opt"].last_stats["coefficients"] == [1.0, 1.0], "surgery=None: the plain weighted sum"

    from multitask_optim import AggregationContext, WeightingContext

    gram = torch.tensor([[[4.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    ctx = AggregationContext(torch.Generator(), torch.ones(3, dtype=torch.float64))
    coefs, _ = namespace["EqualPull"]().aggregate(gram, {}, ctx)
    torch.testing.assert_close(coefs, torch.tensor([[1.0 / 6.0, 1.0 / 3.0, 0.0]], dtype=torch.float64))

    weighting = namespace["InitialLoss"]()
    weighting.bind(("a", "b"))
    state: Dict[str, torch.Tensor] = {}
    wctx = WeightingContext(torch.Generator(), 0, ("a", "b"))
    w0, state0 = weighting.weights(torch.tensor([2.0, 4.0], dtype=torch.float64), state, wctx)
    w1, _ = weighting.weights(torch.tensor([1.0, 1.0], dtype=torch.float64), state0, wctx)
    assert w0.tolist() == w1.tolist() == [0.5, 0.25]
    assert state == {} and state0["first"].tolist() == [2.0, 4.0], "the old state is not mutated"
    with pytest.raises(ValueError, match="'b'"):
        weighting.weights(torch.tensor([1.0, 0.0], dtype=torch.float64), state, wctx)


def test_pytorch_optimizer_pcgrad_is_as_the_porting_table_says() -> None:
    """The porting table's pytorch_optimizer row: whole-vector projection (heads included),
    mean on the shared parameters only; ours leaves the heads their own loss's gradient."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    from multitask_optim import MultiTaskOptimizer

    def run(make_opt: Any, theirs: bool) -> List[torch.Tensor]:
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

    def pytorch_optimizer_pcgrad(reduction: str) -> Any:
        return lambda ps: pytorch_optimizer.PCGrad(torch.optim.SGD(ps, lr=0.0), reduction=reduction)

    mean = run(pytorch_optimizer_pcgrad("mean"), theirs=True)
    total = run(pytorch_optimizer_pcgrad("sum"), theirs=True)
    ours = run(lambda ps: MultiTaskOptimizer(torch.optim.SGD(ps, lr=0.0), seed=0), theirs=False)
    for a, b in zip(mean[:2], total[:2]):  # trunk: averaged under "mean", summed under "sum"
        torch.testing.assert_close(2 * a, b)
    for a, b in zip(mean[2:], total[2:]):  # heads: summed under both
        torch.testing.assert_close(a, b)
    own_head = torch.full_like(ours[3], 4.0)  # d(sum of 4 outputs)/d bias
    torch.testing.assert_close(ours[3], own_head)  # ours: the head's own gradient
    assert not torch.allclose(mean[3], own_head), "theirs: the head's gradient is projected"
    assert all(float(g.abs().max()) < 1e-6 for g in ours[:2]), "opposite trunk rows cancel under PCGrad"
    assert float(mean[0].abs().max()) > 1e-3, "their coefficients count the heads: the rows do not cancel"
