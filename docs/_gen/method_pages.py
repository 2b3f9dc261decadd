"""The method pages: one per registered surgery, weighting and preconditioner.

Everything on a page comes from the code, so a new method gets its page by registering:

- the class docstring (Google style) gives the summary and the formula (the text before
  the first section) and the sections of :data:`REQUIRED` (see :func:`problems`);
- the constructor's signature gives the hyper-parameters and their defaults, and the
  ``Args:`` sections along the class's MRO describe them;
- class attributes give the facts table (needs the Jacobian's rows, minimum tasks,
  learnable parameters, epoch boundaries, ...);
- ``benchmarks/results/quality*.json`` give the measured rows (every configuration
  the quality benchmark ran that uses the method), next to the plain sum of the same run;
- the example is the ``Example:`` section when the class has one, else a loop built
  from the registry name (every method needs one, so a constructor argument without a
  default requires an ``Example:`` section).

:func:`pages` returns every generated page; ``hooks.py`` hands them to mkdocs and the
tests run their examples.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
if str(Path(__file__).resolve().parent) not in sys.path:  # sphinx_roles and public_api, next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from public_api import module_public  # noqa: E402
from sphinx_roles import plain_roles  # noqa: E402

from multitask_optim import AGGREGATORS, PRECONDITIONERS, WEIGHTINGS  # noqa: E402
from multitask_optim._components import Component, Registry  # noqa: E402
from multitask_optim.weighting import Weighting  # noqa: E402

#: The sections every registered method's class docstring has (Google-style custom sections).
REQUIRED = ("Paper", "Departures", "Cost", "When to use")
#: Sections the page renders itself, in this order, with these headings.
HEADINGS = {
    "Paper": "Paper",
    "Departures": "Where it departs from the paper and from other libraries",
    "Cost": "Cost",
    "When to use": "When to use it, and when not",
}
SECTION = re.compile(r"^([A-Z][A-Za-z /-]*):\s*$")
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Kind:
    """One family of components: its constructor argument, registry and page folder."""

    arg: str
    title: str
    registry: Registry
    folder: str


KINDS = (
    Kind("surgery", "Surgeries", AGGREGATORS, "surgery"),
    Kind("weighting", "Loss weightings", WEIGHTINGS, "weighting"),
    Kind("precondition", "Preconditioners", PRECONDITIONERS, "precondition"),
)


@dataclass
class Docstring:
    """A Google-style docstring split into its summary, free text and sections."""

    summary: str
    body: str
    sections: Dict[str, str] = field(default_factory=dict)


def parse(doc: Optional[str]) -> Docstring:
    """Split a docstring into summary, body (text outside sections) and sections.

    A section is a line ``Title:`` at the docstring's own indentation followed by an
    indented block; it ends at the next line back at that indentation.

    Args:
        doc: the docstring (``inspect.getdoc`` form or raw).

    Returns:
        The parts, each dedented and stripped.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: List[str] = []
    while lines and lines[0].strip():
        summary.append(lines.pop(0).strip())
    body: List[str] = []
    sections: Dict[str, List[str]] = {}
    current: Optional[List[str]] = None
    for line in lines:
        header = SECTION.match(line)
        if header:
            current = sections.setdefault(header.group(1), [])
        elif current is not None and (not line.strip() or line.startswith((" ", "\t"))):
            current.append(line)
        else:
            current = None
            body.append(line)
    return Docstring(
        " ".join(summary),
        "\n".join(body).strip(),
        {title: textwrap.dedent("\n".join(text)).strip() for title, text in sections.items()},
    )


def args_entries(text: str) -> Dict[str, str]:
    """``{name: description}`` from a Google ``Args:`` section (``a, b: ...`` names both)."""
    out: Dict[str, str] = {}
    names: List[str] = []
    for line in text.splitlines():
        entry = re.match(r"^([*\w][\w, *]*?)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if entry and not line.startswith((" ", "\t")):
            names = [n.strip().lstrip("*") for n in entry.group(1).split(",")]
            for name in names:
                out[name] = entry.group(2).strip()
        elif names and line.strip():
            for name in names:
                out[name] = f"{out[name]} {line.strip()}".strip()
    return out


def hyper_parameters(cls: type) -> List[Tuple[str, str, str]]:
    """``(name, default, description)`` for every constructor argument of ``cls``.

    The default is the signature's (``required`` when there is none); the description
    is the first ``Args:`` entry naming it along ``cls``'s MRO.
    """
    described: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        described.update(args_entries(parse(klass.__doc__).sections.get("Args", "")))
    rows = []
    for param in inspect.signature(cls).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = "required" if param.default is param.empty else f"`{param.default!r}`"
        rows.append((param.name, default, described.get(param.name, "")))
    return rows


def methods() -> List[Tuple[Kind, str, type]]:
    """Every registered method as ``(kind, name, class)``, sorted by kind then name."""
    return [(kind, name, kind.registry[name]) for kind in KINDS for name in sorted(kind.registry)]


def problems(kind: Kind, name: str, cls: type) -> List[str]:
    """What the method's docstring lacks for its page (empty when nothing).

    Args:
        kind: the method's family.
        name: its registry name.
        cls: its class.

    Returns:
        One message per problem: a missing required section, a constructor argument
        without an ``Args:`` entry, or a required argument without an ``Example:``.
    """
    doc = parse(cls.__doc__)
    where = f"{kind.arg}={name!r} ({cls.__module__}.{cls.__qualname__})"
    out = [f"{where}: no summary line" for _ in [0] if not doc.summary]
    out += [f"{where}: no '{title}:' section" for title in REQUIRED if not doc.sections.get(title)]
    for param, default, text in hyper_parameters(cls):
        if not text:
            out.append(f"{where}: argument {param!r} has no 'Args:' entry")
        if default == "required" and "Example" not in doc.sections:
            out.append(
                f"{where}: argument {param!r} has no default, so the class needs an 'Example:' section"
            )
    return out


# ----------------------------------------------------------------------------- facts
def facts(kind: Kind, cls: type) -> List[Tuple[str, str]]:
    """``(fact, value)`` rows read from the class's attributes and overridden hooks."""
    rows = [("argument", f'`{kind.arg}="{cls.name}"`'), ("class", f"`{cls.__module__}.{cls.__qualname__}`")]
    if kind.arg == "surgery":
        rows.append(
            (
                "reads",
                "the Jacobian's rows (parameter mode only; no factored fast path)"
                if cls.needs_jacobian
                else "the K x K Gram matrix only (parameter or representation mode)",
            )
        )
        rows.append(("positively homogeneous", "yes" if cls.homogeneous else "no"))
    if kind.arg == "weighting":
        rows.append(("learnable parameters", "yes (their own param group)" if cls.learnable else "no"))
        rows.append(("reads the Gram matrix", "yes" if cls.needs_gram else "no"))
        if cls.epoch_end is not Weighting.epoch_end:
            rows.append(("epoch boundaries", "yes: call `opt.epoch_end()` (or pass `steps_per_epoch=`)"))
        if cls.observe is not Weighting.observe:
            rows.append(("losses after the step", "optional: `opt.update_weighting(losses)`"))
    rows.append(("keeps its own state (checkpointed)", "yes" if _keeps_state(cls) else "no"))
    return rows


def _keeps_state(cls: type) -> bool:
    """Whether the method keeps state: it builds a fresh one, or declares per-task state axes."""
    if cls.init_state not in (Component.init_state, Weighting.init_state):
        return True
    try:
        instance = cls()
    except TypeError:  # required arguments: judge by the class alone
        return False
    return bool(instance.task_axes())


# ----------------------------------------------------------------------------- measured
@dataclass
class Measured:
    """One configuration of the quality benchmark that uses a method."""

    source: str
    suite: str
    label: str
    delta_m: str
    plain: str
    command: str


#: Each family's component when the options leave it out (``None``).
DEFAULTS = {"surgery": "sum", "weighting": "equal", "precondition": ""}


def _components(options: Dict[str, Any]) -> Dict[str, str]:
    return {
        "surgery": options.get("surgery") or "sum",
        "weighting": options.get("weighting") or "equal",
        "precondition": options.get("precondition") or "",
    }


def _fmt(delta: Optional[Dict[str, float]]) -> str:
    if not delta:
        return "—"
    return f"{delta['mean']:.2f} ± {delta['std']:.2f} (n={delta['n']})"


def measured(kind: Kind, name: str, results: Path = RESULTS) -> List[Measured]:
    """Every quality-benchmark row whose configuration uses ``name`` as its ``kind``.

    Args:
        kind: the method's family.
        name: its registry name.
        results: the folder of ``quality*.json`` files.

    Returns:
        The rows, with the plain sum's Δm% of the same run, suite and variant beside
        each. A default component (the plain sum, equal weights) lists only the rows
        where the other components are at their defaults too.
    """
    out: List[Measured] = []
    for path in sorted(results.glob("quality*.json")):
        data = _load(path)
        for suite in data.get("suites", {}).values():
            rows = {k: v for k, v in suite.get("methods", {}).items() if isinstance(v.get("options"), dict)}
            for key, row in rows.items():
                parts = _components(row["options"])
                alone = all(parts[k] == v for k, v in DEFAULTS.items() if k != kind.arg)
                if parts[kind.arg] != name or not (alone or name != DEFAULTS[kind.arg]):
                    continue
                plain = _plain_row(rows, _variant(key))
                out.append(
                    Measured(
                        path.name,
                        suite.get("title", ""),
                        row.get("label", ""),
                        _fmt(row.get("delta_m")),
                        _fmt(plain.get("delta_m")) if plain else "—",
                        data.get("command", ""),
                    )
                )
    return out


@functools.cache
def _load(path: Path) -> Dict[str, Any]:
    """A results file, read once per build (every method page reads every file)."""
    return json.loads(path.read_text())


def _variant(key: str) -> str:
    """The run variant a row key names after ``@`` (``"pcgrad@zero"``: ``"zero"``)."""
    return key.split("@", 1)[1] if "@" in key else ""


def _plain_row(rows: Dict[str, Dict[str, Any]], variant: str) -> Optional[Dict[str, Any]]:
    """The plain sum's row of the same variant (no surgery, weighting or preconditioning)."""
    for key, row in rows.items():
        if _components(row["options"]) == DEFAULTS and not row["options"].get("representation"):
            if _variant(key) == variant:
                return row
    return None


def measured_section(kind: Kind, name: str) -> str:
    """The "Measured" part of a page: a table, or a sentence saying nothing was run."""
    rows = measured(kind, name)
    if not rows:
        return (
            "The quality benchmark has not run this method yet: "
            "see [Benchmarks](../../benchmarks.md) for how to run it on the suites.\n"
        )
    lines = [
        "Δm% against single-task models (lower is better; mean ± std over seeds), from the "
        "[quality benchmark](../../benchmarks.md), next to the plain sum of the same run:",
        "",
        "| suite | configuration | Δm% | plain sum, same run | results file |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(f"| {r.suite} | {r.label} | {r.delta_m} | {r.plain} | `benchmarks/results/{r.source}` |")
    commands = sorted({r.command for r in rows if r.command})
    if commands:
        lines += [
            "",
            "The runs' commands, as recorded in the results files (run from the repository root):",
            "",
        ]
        lines += [f"```bash\n{c}\n```" for c in commands]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- example
def _literal_kwargs(cls: type) -> Dict[str, Any]:
    """The constructor's defaults that are plain literals (shown in the generated example)."""
    out = {}
    for param in inspect.signature(cls).parameters.values():
        default = param.default
        if param.kind == param.KEYWORD_ONLY or param.kind == param.POSITIONAL_OR_KEYWORD:
            if default is not param.empty and isinstance(default, (int, float, str, bool, tuple, type(None))):
                out[param.name] = default
    return out


def _py(value: Any) -> str:
    """A literal as Python source, strings in double quotes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def default_example(kind: Kind, name: str, cls: type) -> str:
    """A short training loop with the method at its defaults (spelled out)."""
    num_tasks = 3
    if kind.arg == "surgery":
        num_tasks = max(num_tasks, cls().min_tasks())
    kwargs = _literal_kwargs(cls)
    option = f'    {kind.arg}="{name}",\n'
    if kwargs:
        spelled = ", ".join(f"{json.dumps(k)}: {_py(v)}" for k, v in kwargs.items())
        option += f"    {kind.arg}_kwargs={{{spelled}}},\n"
    if kind.arg != "surgery":
        option += "    surgery=None,  # the plain sum on the shared trunk: this page's method alone\n"
    epochs = kind.arg == "weighting" and cls.epoch_end is not Weighting.epoch_end
    read = {"surgery": "coefficients", "weighting": "weights", "precondition": "grad_norms"}[kind.arg]
    loop = (
        "for epoch in range(2):\n"
        "    for step in range(2):\n"
        "        z = trunk(x)\n"
        "        losses = {name: nn.functional.mse_loss(heads[name](z).squeeze(-1), y[:, i])\n"
        "                  for i, name in enumerate(names)}\n"
        "        opt.zero_grad()\n"
        "        opt.step(losses)\n"
        + ("    opt.epoch_end()  # this method counts epochs\n" if epochs else "")
    )
    return (
        "import torch\n"
        "from torch import nn\n"
        "from multitask_optim import MultiTaskOptimizer\n\n"
        "torch.manual_seed(0)\n"
        f'names = [f"task{{i}}" for i in range({num_tasks})]\n'
        "trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())\n"
        "heads = nn.ModuleDict({name: nn.Linear(16, 1) for name in names})\n"
        "x, y = torch.randn(32, 8), torch.randn(32, len(names))\n\n"
        "opt = MultiTaskOptimizer(\n"
        "    torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-2),\n"
        "    task_names=names,\n"
        f"{option}"
        ")\n"
        f"{loop}"
        f'print(opt.last_stats["{read}"])\n'
    )


def example(kind: Kind, name: str, cls: type) -> str:
    """The page's runnable example: the ``Example:`` section's code, else :func:`default_example`."""
    text = parse(cls.__doc__).sections.get("Example")
    if text:
        blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
        if blocks:
            return "\n".join(textwrap.dedent(b) for b in blocks)
        return textwrap.dedent(text).strip() + "\n"
    return default_example(kind, name, cls)


# ----------------------------------------------------------------------------- pages
def page_path(kind: Kind, name: str) -> str:
    """The page of method ``name``, relative to ``docs/``."""
    return f"methods/{kind.folder}/{name}.md"


def _own_file(cls: type) -> bool:
    """Whether ``cls``'s module is its own file: the only component class it defines."""
    module = sys.modules[cls.__module__]
    components = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Component) and obj.__module__ == cls.__module__
    ]
    return components == [cls]


def api_block(cls: type) -> str:
    """The page's API part: the method's module rendered by mkdocstrings when the module is
    the method's own file, else a link to the module's reference (rendered there once)."""
    if not _own_file(cls):
        path = f"{cls.__module__}.{cls.__qualname__}"
        return f"Documented with its module: [`{path}`][{path}].\n"
    lines = [
        f"::: {cls.__module__}.{cls.__qualname__}",
        "    options:",
        "      show_docstring_description: false",
        "      show_docstring_examples: false",
        "      show_root_full_path: true",
        "      heading_level: 3",
        "",
    ]
    for name in module_public(cls.__module__):
        if name != cls.__qualname__:
            lines += [f"::: {cls.__module__}.{name}", "    options:", "      heading_level: 3", ""]
    return "\n".join(lines)


def method_page(kind: Kind, name: str, cls: type) -> str:
    """The Markdown of one method's page.

    Args:
        kind: the method's family.
        name: its registry name.
        cls: its class.

    Returns:
        The page text.

    Raises:
        ValueError: listing what the docstring lacks (see :func:`problems`).
    """
    missing = problems(kind, name, cls)
    if missing:
        raise ValueError("; ".join(missing))
    doc = parse(plain_roles(inspect.getdoc(cls) or ""))
    out = [f'# {cls.__qualname__}: `{kind.arg}="{name}"`', "", doc.summary, ""]
    if doc.body:
        out += [doc.body, ""]
    out += ["| | |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in facts(kind, cls)] + [""]
    out += ["## " + HEADINGS["Paper"], "", doc.sections["Paper"], ""]
    out += ["## Hyper-parameters", ""]
    params = hyper_parameters(cls)
    if params:
        out += ["| argument | default | meaning |", "| --- | --- | --- |"]
        out += [f"| `{p}` | {d} | {plain_roles(t)} |" for p, d, t in params]
        out += [
            "",
            f"Pass them by name as `{kind.arg}_kwargs={{...}}`, or pass an instance as `{kind.arg}=`.",
            "",
        ]
    else:
        out += ["None.", ""]
    for title in REQUIRED[1:]:
        out += ["## " + HEADINGS[title], "", doc.sections[title], ""]
        if title == "When to use":
            out += ["### Measured", "", measured_section(kind, name)]
    out += ["## Example", "", "```python", example(kind, name, cls).rstrip(), "```", ""]
    out += ["## API", "", api_block(cls)]
    return "\n".join(out)


def index_page() -> str:
    """The methods index: one table per family, every registered method linked to its page."""
    out = [
        "# Methods",
        "",
        "Every method is chosen by name: `surgery=` combines the shared parameters' task gradients,",
        "`weighting=` sets per-task loss weights, `precondition=` gives each task its own adaptive scale",
        "on the shared parameters. They compose in one step (weighting, per-task gradients,",
        "preconditioning, Gram matrix, surgery; see [Concepts](../concepts.md)). Each page below is",
        "generated from the method's class, so it says exactly what the code does.",
        "",
    ]
    for kind in KINDS:
        out += [
            f"## {kind.title} (`{kind.arg}=`)",
            "",
            "| name | class | what it does |",
            "| --- | --- | --- |",
        ]
        for name in sorted(kind.registry):
            cls = kind.registry[name]
            summary = plain_roles(parse(cls.__doc__).summary).replace("|", "\\|")
            link = page_path(kind, name)[len("methods/") :]
            out.append(f"| [`{name}`]({link}) | `{cls.__qualname__}` | {summary} |")
        out.append("")
    return "\n".join(out)


def pages() -> Dict[str, str]:
    """Every generated method page and the index, by path relative to ``docs/``."""
    out = {"methods/index.md": index_page()}
    for kind, name, cls in methods():
        out[page_path(kind, name)] = method_page(kind, name, cls)
    return out


def nav() -> List[Any]:
    """The "Methods" section of the navigation: the index, then one entry per method."""
    entries: List[Any] = ["methods/index.md"]
    for kind in KINDS:
        entries.append({kind.title: [{name: page_path(kind, name)} for name in sorted(kind.registry)]})
    return entries


def examples() -> Dict[str, str]:
    """Each method page's example code, by page path (for the tests)."""
    return {page_path(kind, name): example(kind, name, cls) for kind, name, cls in methods()}


__all__: Sequence[str] = ("REQUIRED", "examples", "index_page", "method_page", "nav", "pages", "problems")
