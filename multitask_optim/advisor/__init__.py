"""Which method for my model? Measure it (``diagnose``), then try the shortlist (``compare``).

Published comparisons (Kurin et al. 2022; Xin et al. 2022) found that a tuned plain sum
often matches the specialised methods, and on real tabular data the spread between
configurations runs from better than single-task models to far worse than the plain
sum. So the choice is a measurement on the user's model and data::

    from multitask_optim.advisor import compare, diagnose

    report = diagnose(model, loss_fn, batches, steps=100)   # loss_fn(model, batch) -> losses
    print(report)                                           # measurements, shortlist, warnings
    result = compare(model, loss_fn, batches, evaluate, configs=report.recommended, steps=200)
    print(result)
    opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters()), **result.best)

``diagnose`` trains a copy of the model with the plain sum and measures the loss scales
and their ratio, the shared-gradient norm ratio, how often and how strongly the task
gradients conflict, whether a loss approaches 0, absent labels and loss trends; its
rules (:mod:`multitask_optim.advisor._rules`, R1-R8, each backed by a benchmark run)
turn them into a shortlist and warnings. In short:

- losses or gradients 10x or more apart (R1): methods blind to the scales first
  (IMTL-G, ConFIG, Nash-MTL, FairGrad, DB-MTL with ``beta=0``, ...);
- a loss approaching 0 (R2): no weighting that divides by a loss (GLS, FAMO, STCH, IMTL-L);
- one gradient much larger (R3): no minimum-norm method (MGDA, PE-LTR, Krum);
- learned weights (uncertainty, GradNorm) move too slowly for a large ratio (R4);
- an Adam-like inner optimizer: no moving average of gradients in front of it (DB-MTL's
  default, MoCo; R5); per-task preconditioning is first only under SGD (R8);
- absent labels: no FAMO, STCH, IMTL-L (R6);
- similar scales (R7): the plain sum, or conflict-aware methods when conflicts are frequent.

``compare`` runs short pilots of each candidate from the same initial weights and ranks
them by ``evaluate`` relative to the plain sum. Both leave the caller's model and every
random number generator (torch, ``random``, NumPy) as they were. Runtime needs: torch;
a progress bar uses tqdm when installed; ``plot()`` needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

from ._compare import DEFAULT_CONFIGS, Comparison, Entry, compare
from ._diagnose import Diagnosis, Recommendation, diagnose
from ._isolation import describe, is_adaptive
from ._measure import Measurements
from ._rules import CONFLICTS, IMBALANCE, NEEDS, Needs

__all__ = [
    "CONFLICTS",
    "Comparison",
    "DEFAULT_CONFIGS",
    "Diagnosis",
    "Entry",
    "IMBALANCE",
    "Measurements",
    "NEEDS",
    "Needs",
    "Recommendation",
    "compare",
    "describe",
    "diagnose",
    "is_adaptive",
]
