"""Real multi-task tabular datasets for the quality benchmark and the advisor's validation.

Every label is a real measurement shipped inside an installed package (no download):

- **penguins** (``palmerpenguins``, the CSV inside its wheel, read without pandas): 342
  penguins of the Palmer archipelago (Gorman, Williams & Fraser 2014). Inputs: bill
  length, bill depth, flipper length, island. Tasks: species (3 classes), sex (2 classes;
  9 birds unsexed, their label absent) and body mass in grams (regression, raw units).
- **wine** (scikit-learn's bundled UCI wine data): 178 wines of three cultivars.
  Inputs: ten chemical measurements. Tasks: cultivar (3 classes), proline (mg/L,
  regression, raw units) and colour intensity (regression, raw units).
- **diabetes** (scikit-learn's bundled raw diabetes data, Efron et al. 2004): 442
  patients. Inputs: age, BMI, blood pressure and five blood serum measurements
  (s1-s4, s6). Tasks: disease progression after one year (regression, raw units), sex
  (2 classes) and s5, the log serum triglycerides (regression, raw units).

Regression targets stay in their raw units (losses differ by orders of magnitude, as
they do when a practitioner writes the losses down); inputs are standardised with the
training split's statistics. Each dataset is split per seed into a training and a test
part; the advisor sees the training part only.
"""

from __future__ import annotations

import csv
import functools
import io
import math
from dataclasses import dataclass
from importlib import resources
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .trunks import last_linear, mlp_trunk

#: the label of an absent classification target
MISSING = -1


@dataclass(frozen=True)
class Task:
    """One task: its name, kind and number of classes (0 for a regression)."""

    name: str
    classes: int = 0

    @property
    def regression(self) -> bool:
        return self.classes == 0

    @property
    def metric(self) -> str:
        """The primary test metric: RMSE (raw units, lower is better) or accuracy (higher)."""
        return "rmse" if self.regression else "accuracy"


@dataclass(frozen=True)
class Table:
    """A dataset: inputs ``x (n, d)``, one target tensor per task (NaN / -1 where absent)."""

    name: str
    title: str
    x: Tensor
    targets: Tuple[Tensor, ...]
    tasks: Tuple[Task, ...]


def _penguin_rows() -> List[Dict[str, str]]:
    text = resources.files("palmerpenguins").joinpath("data/penguins.csv").read_text()
    return list(csv.DictReader(io.StringIO(text)))


@functools.lru_cache(maxsize=1)
def penguins() -> Table:
    """The Palmer penguins: species, sex (absent for unsexed birds) and body mass."""
    rows = [r for r in _penguin_rows() if "NA" not in (r["bill_length_mm"], r["body_mass_g"])]
    islands = sorted({r["island"] for r in rows})
    species = sorted({r["species"] for r in rows})
    num = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
    x = torch.tensor(
        [[float(r[c]) for c in num] + [float(r["island"] == i) for i in islands] for r in rows],
        dtype=torch.float32,
    )
    sex = {"female": 0, "male": 1}
    return Table(
        name="penguins",
        title="Palmer penguins (species, sex with absent labels, body mass in g)",
        x=x,
        targets=(
            torch.tensor([species.index(r["species"]) for r in rows]),
            torch.tensor([sex.get(r["sex"], MISSING) for r in rows]),
            torch.tensor([float(r["body_mass_g"]) for r in rows]),
        ),
        tasks=(Task("species", 3), Task("sex", 2), Task("body_mass_g")),
    )


@functools.lru_cache(maxsize=1)
def wine() -> Table:
    """UCI wine: cultivar, proline and colour intensity from the other measurements."""
    from sklearn.datasets import load_wine

    bunch = load_wine()
    names = list(bunch.feature_names)
    data = torch.tensor(bunch.data, dtype=torch.float32)
    targets = ("proline", "color_intensity")
    keep = [i for i, n in enumerate(names) if n not in targets]
    return Table(
        name="wine",
        title="Wine (cultivar, proline mg/L, colour intensity)",
        x=data[:, keep],
        targets=(
            torch.tensor(bunch.target, dtype=torch.long),
            data[:, names.index("proline")],
            data[:, names.index("color_intensity")],
        ),
        tasks=(Task("cultivar", 3), Task("proline"), Task("color_intensity")),
    )


@functools.lru_cache(maxsize=1)
def diabetes() -> Table:
    """Diabetes (raw units): progression, sex and s5 (log triglycerides) from the rest."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    names = list(bunch.feature_names)
    data = torch.tensor(bunch.data, dtype=torch.float32)
    keep = [i for i, n in enumerate(names) if n not in ("sex", "s5")]
    return Table(
        name="diabetes",
        title="Diabetes (progression, sex, s5 = log triglycerides; raw units)",
        x=data[:, keep],
        targets=(
            torch.tensor(bunch.target, dtype=torch.float32),
            (data[:, names.index("sex")] - 1).round().long(),
            data[:, names.index("s5")],
        ),
        tasks=(Task("progression"), Task("sex", 2), Task("s5")),
    )


TABLES = {"penguins": penguins, "wine": wine, "diabetes": diabetes}


# ---------------------------------------------------------------------- splits and model


@dataclass(frozen=True)
class Split:
    """Standardised inputs and targets of one part of a dataset."""

    x: Tensor
    targets: Tuple[Tensor, ...]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx: Tensor) -> Split:
        return Split(self.x[idx], tuple(t[idx] for t in self.targets))


def split(table: Table, seed: int, test_fraction: float = 0.25) -> Tuple[Split, Split]:
    """A seeded ``(train, test)`` split; inputs standardised with the training statistics."""
    gen = torch.Generator().manual_seed(3_000_017 * (seed + 1))
    perm = torch.randperm(table.x.shape[0], generator=gen)
    cut = int(round((1.0 - test_fraction) * len(perm)))
    tr, te = perm[:cut], perm[cut:]
    mean, std = table.x[tr].mean(0), table.x[tr].std(0).clamp_min(1e-6)
    x = (table.x - mean) / std
    full = Split(x, table.targets)
    return full.take(tr), full.take(te)


class TabularNet(nn.Module):
    """An MLP trunk (``depth`` x Linear+ReLU) and one linear head per task."""

    def __init__(self, in_dim: int, tasks: Sequence[Task], width: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.trunk = mlp_trunk(in_dim, [width] * depth)
        self.heads = nn.ModuleList(nn.Linear(width, max(t.classes, 1)) for t in tasks)

    def last_shared(self) -> List[nn.Parameter]:
        return list(last_linear(self.trunk).parameters())

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


def task_losses(
    outs: Sequence[Tensor], targets: Sequence[Tensor], tasks: Sequence[Task]
) -> Dict[str, Optional[Tensor]]:
    """Per-task losses on the labelled rows (MSE raw units / cross-entropy); None when a
    task has no label in the batch."""
    losses: Dict[str, Optional[Tensor]] = {}
    for out, y, task in zip(outs, targets, tasks):
        seen = ~torch.isnan(y) if task.regression else y != MISSING
        if not bool(seen.any()):
            losses[task.name] = None
        elif task.regression:
            losses[task.name] = F.mse_loss(out.squeeze(-1)[seen], y[seen])
        else:
            losses[task.name] = F.cross_entropy(out[seen], y[seen])
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, tasks: Sequence[Task]) -> Dict[str, float]:
    """The primary metric of every task on ``data`` (RMSE in raw units, or accuracy)."""
    was = model.training
    model.eval()
    _, outs = model(data.x)
    model.train(was)
    out: Dict[str, float] = {}
    for o, y, task in zip(outs, data.targets, tasks):
        seen = ~torch.isnan(y) if task.regression else y != MISSING
        if task.regression:
            err = (o.squeeze(-1)[seen].double() - y[seen].double()).pow(2).mean()
            out[task.name] = math.sqrt(float(err)) if bool(torch.isfinite(err)) else math.inf
        else:
            out[task.name] = float((o[seen].argmax(-1) == y[seen]).double().mean())
    return out


def trivial(train: Split, test: Split, tasks: Sequence[Task]) -> Dict[str, float]:
    """The trivial predictors' test metrics: the training mean, or the majority class."""
    out: Dict[str, float] = {}
    for y_tr, y_te, task in zip(train.targets, test.targets, tasks):
        if task.regression:
            mean = float(y_tr[~torch.isnan(y_tr)].double().mean())
            seen = ~torch.isnan(y_te)
            out[task.name] = math.sqrt(float((y_te[seen].double() - mean).pow(2).mean()))
        else:
            labels = y_tr[y_tr != MISSING]
            major = int(torch.bincount(labels, minlength=task.classes).argmax())
            seen = y_te != MISSING
            out[task.name] = float((y_te[seen] == major).double().mean())
    return out


def better(task: Task, value: float, reference: float) -> bool:
    """Whether ``value`` is strictly better than ``reference`` on ``task``'s metric."""
    return value < reference if task.regression else value > reference


def signed(task: Task, value: float) -> float:
    """The metric with higher = better (RMSE negated), as ``advisor.compare`` expects."""
    return -value if task.regression else value


def batches(data: Split, batch: int, seed: int) -> List[Tuple[Tensor, Tuple[Tensor, ...]]]:
    """One epoch of shuffled mini-batches ``(x, targets)`` (a list: re-iterable)."""
    gen = torch.Generator().manual_seed(5_000_011 * (seed + 1))
    perm = torch.randperm(len(data), generator=gen)
    return [(data.x[i], tuple(t[i] for t in data.targets)) for i in perm.split(batch)]


def loss_fn(tasks: Sequence[Task]):  # type: ignore[no-untyped-def]
    """``loss_fn(model, batch)`` in the advisor's form, for a ``(x, targets)`` batch."""

    def fn(model: nn.Module, batch: Tuple[Tensor, Tuple[Tensor, ...]]) -> Dict[str, Optional[Tensor]]:
        x, targets = batch
        _, outs = model(x)
        return task_losses(outs, targets, tasks)

    return fn


def metric_direction(tasks: Sequence[Task]) -> Mapping[str, bool]:
    """``{task: higher_is_better}``."""
    return {t.name: not t.regression for t in tasks}
