"""The rules behind ``diagnose``: from the measurements to a ranked shortlist and warnings.

What each method needs (:data:`NEEDS`) is written once, as data; the rules read the
measurements and these properties, never a method's name. Every threshold and every
order below is backed by a run (see ``docs/guides/choosing.md`` for the tables):

- **R1, magnitude** (``loss_ratio`` or ``grad_ratio`` >= :data:`IMBALANCE`): put the
  methods that do not see the loss scales first. Scale suite (losses 1 to 10^6 apart,
  ``benchmarks/results/quality_wave2.md``): IMTL-G, ConFIG, Nash-MTL, FairGrad,
  Aligned-MTL, STCH, FAMO, GLS and per-task preconditioning 79-95 Delta_m%; the plain sum,
  PCGrad, UPGrad, MGDA, uncertainty about 400. Penguins and wine
  (``benchmarks/results/advisor_check.md``) agree on the families; the order inside the
  scale-blind family is their mean rank over the three (:data:`MAGNITUDE_ORDER`).
- **R2, the 1/L hazard** (a loss approaches 0): rule out the weightings that divide by
  a loss (GLS, FAMO, STCH, IMTL-L): when a separable classification loss falls towards
  0, its weight grows without bound and a raw-scale regression task starves (issue 22's
  real data: ends worse than its mean predictor).
- **R3, one gradient much larger** (``grad_ratio`` >= :data:`IMBALANCE`): rule out the
  minimum-norm methods (MGDA, PE-LTR, Krum): they follow the smallest gradient and leave
  the large-gradient task untrained.
- **R4, slow learned weights**: uncertainty weighting and GradNorm move their weights
  about one learning rate per step; under a large ratio they stay near the plain sum.
- **R5, averaging in front of Adam**: DB-MTL's and MoCo's moving averages of gradients
  in front of an Adam-like inner optimizer's own made them the worst rows of both
  generated suites; with no average (DB-MTL ``beta=0``) DB-MTL is among the best.
- **R6, absent tasks**: FAMO, STCH and IMTL-L refuse a step with an absent task.
- **R7, similar scales**: with losses and gradients within :data:`IMBALANCE`, the plain
  sum is within the seed spread of the best on MultiDigits (and in the literature, Kurin
  et al. 2022, Xin et al. 2022); with frequent conflicts (>= :data:`CONFLICTS`) the
  conflict-aware ConFIG, UPGrad, CAGrad and PCGrad had the lowest means there.
- **R8, per-task preconditioning**: it is per-task Adam on the trunk under an SGD inner
  optimizer (best MultiDigits row, -1.7 Delta_m%); under Adam a second normalisation
  follows it (MultiDigits +5.0 against +3.0 for the sum), so it ranks lower there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ._measure import Measurements

#: loss-scale or gradient-norm ratio from which a task dominates the plain sum
IMBALANCE = 10.0
#: share of conflicting (step, pair) entries from which conflicts are "frequent"
CONFLICTS = 0.3


@dataclass(frozen=True)
class Needs:
    """What a method needs from the measurements and the inner optimizer.

    Attributes:
        config: the ``MultiTaskOptimizer`` keyword arguments.
        label: a short readable name.
        scale_free: the update does not depend on the tasks' loss or gradient scales.
        inverse_loss: weights each task by ``1 / L_i`` (or ``log L_i``): a loss near 0 takes over.
        min_norm: follows the minimum-norm point, i.e. the smallest gradient.
        slow_weights: learned weights that move about one learning rate per step.
        averages_gradients: a moving average of gradients that an Adam-like inner
            optimizer's own average doubles.
        needs_all_tasks: refuses a step on which a task is absent.
        min_tasks: the fewest tasks it is defined for.
        conflict_aware: changes the update only where gradients conflict.
        counts_epochs: a schedule in epochs (STCH's warm-up): the recommendation gets
            ``steps_per_epoch`` (else the caller must call ``opt.epoch_end()``; without
            either the warm-up never ends).
    """

    config: Dict[str, Any]
    label: str
    scale_free: bool = False
    inverse_loss: bool = False
    min_norm: bool = False
    slow_weights: bool = False
    averages_gradients: bool = False
    needs_all_tasks: bool = False
    min_tasks: int = 2
    conflict_aware: bool = False
    counts_epochs: bool = False


def _s(name: str, **kwargs: Any) -> Dict[str, Any]:
    return {"surgery": name, **({"surgery_kwargs": kwargs} if kwargs else {})}


def _w(name: str, **kwargs: Any) -> Dict[str, Any]:
    return {"surgery": None, "weighting": name, **({"weighting_kwargs": kwargs} if kwargs else {})}


#: the methods the rules know, with what they need (defaults unless said)
NEEDS: Tuple[Needs, ...] = (
    Needs({"surgery": None}, "plain sum"),
    Needs(_s("imtl_g"), "IMTL-G", scale_free=True),
    Needs(_s("config"), "ConFIG", scale_free=True, conflict_aware=True),
    Needs(_s("nash_mtl"), "Nash-MTL", scale_free=True),
    Needs(_s("fairgrad"), "FairGrad", scale_free=True),
    Needs(_s("aligned_mtl"), "Aligned-MTL", scale_free=True),
    Needs(_s("db_mtl", beta=0.0), "DB-MTL (beta=0)", scale_free=True),
    Needs(_s("db_mtl"), "DB-MTL", scale_free=True, averages_gradients=True),
    Needs(_s("moco"), "MoCo", averages_gradients=True),
    Needs(
        _w("stch", warmup_epochs=1),
        "STCH",
        scale_free=True,
        inverse_loss=True,
        needs_all_tasks=True,
        counts_epochs=True,
    ),
    Needs(_w("famo"), "FAMO", scale_free=True, inverse_loss=True, needs_all_tasks=True),
    Needs(_w("gls"), "GLS", scale_free=True, inverse_loss=True),
    Needs(_w("imtl_l"), "IMTL-L", inverse_loss=True, needs_all_tasks=True),
    Needs({"surgery": None, "precondition": "adam"}, "per-task Adam preconditioning", scale_free=True),
    Needs(_s("pcgrad"), "PCGrad", conflict_aware=True),
    Needs(_s("upgrad"), "UPGrad", conflict_aware=True),
    Needs(_s("cagrad"), "CAGrad", conflict_aware=True),
    Needs(_s("gradvac"), "GradVac", conflict_aware=True),
    Needs(_s("dualproj"), "DualProj", conflict_aware=True),
    Needs(_s("graddrop"), "GradDrop", conflict_aware=True),
    Needs(_s("mgda"), "MGDA", min_norm=True),
    Needs(_s("pareto"), "PE-LTR (pareto)", min_norm=True),
    Needs(_s("krum"), "Krum", min_norm=True, min_tasks=3),
    Needs(_w("uncertainty"), "uncertainty weighting", slow_weights=True),
    Needs(_w("gradnorm"), "GradNorm", slow_weights=True),
)

#: shortlist orders, best first, by regime (labels of :data:`NEEDS`)
#: R1's order: the scale-blind methods by their mean rank / N over the three magnitude-
#: imbalanced sets measured with the zero-loss fixes (scale suite of ``quality_wave2`` and
#: ``quality_rows``, N = 25; penguins and wine of ``advisor_check``, N = 35 each):
#: Nash-MTL 0.12 (5, 2, 4), ConFIG 0.17 (3, 4, 10), FairGrad 0.18 (6, 3, 7), DB-MTL beta=0
#: 0.19 (1, 7, 12), Aligned-MTL 0.22 (5, 5, 8), per-task Adam 0.25 (11, 8, 3), IMTL-G 0.30
#: (10, 6, 11); the 1/L weightings last (STCH 0.41, FAMO 0.70, GLS 0.74: first rows of the
#: scale suite, bottom rows wherever a loss approached 0, which R2 may miss). Diabetes was
#: held out of this order.
MAGNITUDE_ORDER = (
    "Nash-MTL",
    "ConFIG",
    "FairGrad",
    "DB-MTL (beta=0)",
    "Aligned-MTL",
    "per-task Adam preconditioning",
    "IMTL-G",
    "STCH",
    "FAMO",
    "GLS",
)
SIMILAR_ORDER = ("plain sum", "ConFIG", "IMTL-G", "UPGrad", "PCGrad", "CAGrad")
CONFLICT_ORDER = ("ConFIG", "UPGrad", "CAGrad", "IMTL-G", "PCGrad", "plain sum")
#: how many configurations ``recommended`` holds
SHORTLIST = 5

_BY_LABEL = {n.label: n for n in NEEDS}


def ruled_out(m: Measurements) -> Dict[str, str]:
    """``{label: why}`` for every known method the measurements rule out."""
    s = m.summary()
    k = len(m.tasks)
    zero = [t for t in m.tasks if s["tasks"][t]["approaches_zero"]]
    absent = [t for t in m.tasks if s["tasks"][t]["missing"] > 0]
    big = max(s["loss_ratio"], s["grad_ratio"]) >= IMBALANCE
    out: Dict[str, str] = {}
    for n in NEEDS:
        why = _why(n, m, s, k, zero, absent, big)
        if why:
            out[n.label] = why
    return out


def _why(
    n: Needs, m: Measurements, s: Dict[str, Any], k: int, zero: List[str], absent: List[str], big: bool
) -> str:
    if k < n.min_tasks:
        return f"needs at least {n.min_tasks} tasks, there are {k}"
    if n.needs_all_tasks and absent:
        return f"refuses a step with an absent task; {', '.join(absent)} had no labels on some steps (R6)"
    if n.inverse_loss and zero:
        return (
            f"divides by the loss and {', '.join(zero)} approaches 0: its weight grows without bound and "
            "the other tasks starve (R2)"
        )
    if n.min_norm and s["grad_ratio"] >= IMBALANCE:
        return (
            f"follows the smallest gradient; shared-gradient norms are {s['grad_ratio']:.3g}x apart, so the "
            "large-gradient task is left untrained (R3)"
        )
    if n.averages_gradients and m.adaptive:
        return (
            f"its moving average of gradients sits in front of {m.inner}'s own and slows every task; "
            "with an Adam-like inner optimizer use DB-MTL with beta=0 (R5)"
        )
    if n.slow_weights and big:
        return (
            f"learns its weights about one learning rate per step, too slowly for losses {s['loss_ratio']:.3g}x "
            "apart: it stays near the plain sum (R4)"
        )
    if big and not (n.scale_free or n.min_norm or n.slow_weights or n.averages_gradients):
        return f"keeps the largest task dominant (loss ratio {s['loss_ratio']:.3g}, gradient ratio {s['grad_ratio']:.3g}) (R1)"
    return ""


def recommend(m: Measurements) -> Tuple[List[Tuple[Dict[str, Any], str]], Dict[str, str]]:
    """The shortlist ``[(config, reason)]`` (best first) and the warnings ``{label: why}``."""
    s = m.summary()
    warnings = ruled_out(m)
    big = max(s["loss_ratio"], s["grad_ratio"]) >= IMBALANCE
    conflicts = s["conflict_fraction"] >= CONFLICTS
    if big:
        order, reason = (
            MAGNITUDE_ORDER,
            (
                f"losses {s['loss_ratio']:.3g}x and shared gradients {s['grad_ratio']:.3g}x apart: "
                "a method blind to the scales (R1)"
            ),
        )
    elif conflicts:
        order, reason = (
            CONFLICT_ORDER,
            (
                f"similar scales, gradients conflict on {100 * s['conflict_fraction']:.0f}% of steps x pairs: "
                "conflict-aware (R7)"
            ),
        )
    else:
        order, reason = (
            SIMILAR_ORDER,
            (
                f"similar scales (ratio {max(s['loss_ratio'], s['grad_ratio']):.3g}) and conflicts on only "
                f"{100 * s['conflict_fraction']:.0f}%: the plain sum is hard to beat (R7)"
            ),
        )
    order = _precondition_first(order, m.adaptive, big)
    picks: List[Tuple[Dict[str, Any], str]] = []
    for label in order:
        if label in warnings or len(picks) >= SHORTLIST:
            continue
        picks.append(_configured(_BY_LABEL[label], reason, m.steps_per_epoch))
    if not picks:
        picks.append(({"surgery": None}, "plain sum: every other candidate is ruled out"))
    return picks, warnings


def _configured(n: Needs, reason: str, steps_per_epoch: Optional[int]) -> Tuple[Dict[str, Any], str]:
    """``n``'s config and reason, with the epoch length where its schedule counts epochs."""
    config = copy.deepcopy(n.config)
    why = f"{n.label}: {reason}"
    if n.counts_epochs:
        key = "weighting_kwargs" if config.get("weighting") is not None else "surgery_kwargs"
        if steps_per_epoch is not None:
            config[key] = {**config.get(key, {}), "steps_per_epoch": steps_per_epoch}
        else:
            why += "; its schedule counts epochs: call opt.epoch_end() at the end of each epoch"
    return config, why


def _precondition_first(order: Tuple[str, ...], adaptive: bool, big: bool) -> Tuple[str, ...]:
    """Under a non-adaptive inner optimizer, per-task Adam preconditioning is per-task Adam on
    the trunk: the first magnitude pick (R8)."""
    label = "per-task Adam preconditioning"
    if adaptive or not big:
        return order
    return (label, *(o for o in order if o != label))


def needs_table() -> List[Dict[str, Any]]:
    """Every known method and what it needs, for the docs."""
    return [
        {
            "method": n.label,
            "config": n.config,
            "scale_free": n.scale_free,
            "inverse_loss": n.inverse_loss,
            "min_norm": n.min_norm,
            "averages_gradients": n.averages_gradients,
            "needs_all_tasks": n.needs_all_tasks,
        }
        for n in NEEDS
    ]
