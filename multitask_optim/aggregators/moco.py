"""MoCo: multi-objective gradient correction with tracked gradients (Fernando et al., ICLR 2023).

Reference: H. D. Fernando, H. Shen, M. Liu, S. Chaudhury, K. Murugesan, T. Chen,
"Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
ICLR 2023 (Algorithm 1); the practical form follows LibMTL's ``MoCo`` (from the
authors' code).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._rows import block_buffer, block_vector, calls, check_number, combine, counter, whole_norms
from .base import AGGREGATORS, AggregationContext, RowAggregator, State

#: Added to each gradient norm before normalising, as in LibMTL.
EPS = 1e-8


@AGGREGATORS.register
class MoCo(RowAggregator):
    """MoCo: track each task's gradient, then a regularised min-norm weight step.

    Per block, each task's gradient is normalised and scaled by its loss, tracked by a
    moving average ``y_i`` (which removes the bias of stochastic MGDA), and the weights
    ``lambda`` (start ``1/K``) take one step on the min-norm objective of the tracked
    gradients::

        t        = 1, 2, ...  (this method's steps)
        g_i      = g_i / (||g_i|| + 1e-8) * L_i
        y_i      <- y_i - beta / t^beta_sigma * (y_i - g_i)                 (y_i = 0 at the start)
        lambda   <- softmax(lambda - gamma / t^gamma_sigma * (Y Y^T + rho I) lambda)
        d        = Y^T lambda = sum_i lambda_i y_i

    This is LibMTL's ``MoCo``, whose update ours equals on the same Jacobians over
    several steps, hyper-parameters and defaults included. Departures of that code from
    the paper, kept for agreement: the paper projects ``lambda`` onto the simplex
    (``Pi_Delta``), LibMTL takes a softmax of the stepped ``lambda`` (also on the simplex,
    but it pulls ``lambda`` towards uniform even when the step is zero); the paper tracks
    raw gradients, LibMTL tracks them normalised and scaled by the loss value. The losses
    are the ones the surgery sees (``ctx.losses``, weighted when a weighting is on, as
    the rows are). ``Y Y^T`` is recomputed in float64 when the rows' dtype overflows.

    **Under an Adam-like inner optimizer (Adam, AdamW: measured with Adam) set
    ``beta=1, beta_sigma=0``** (``surgery_kwargs={"beta": 1.0, "beta_sigma": 0.0}``): then
    ``y_i`` is the current normalised gradient, with no tracking. The default tracking
    rate ``0.5 / sqrt(t)`` averages over a window that grows with ``t``, in front of the
    inner optimizer's own moving average, so the update follows ever older gradients.
    Measured on the quality benchmark (3 seeds, its default budget, inner Adam; rows
    ``moco`` and ``moco-b1`` of ``python -m benchmarks.quality --suites
    multidigits,scale --methods moco,moco-b1``): Delta_m% on MultiDigits 27.8 +- 3.5 with
    the defaults, 5.7 +- 2.3 without tracking (the plain sum: 2.7). **Neither setting
    suits losses of very different sizes** (scale suite: 851 +- 49 and 855 +- 64, the
    plain sum 391): the tracked ``y_i`` carry the loss values, so ``Y Y^T`` spans the
    square of the losses' spread and the ``lambda`` softmax saturates at once (one task
    gets all the weight on the first step).

    The update combines the tracked ``y``, not the current rows, so no coefficients are
    reported. Needs the Jacobian's rows: parameter mode only (representation mode
    refuses it).

    State: ``steps``; ``lambda`` (``(B, K)`` float64); per block ``b`` ``y.{b}``
    (``(K, P_b)``, the rows' dtype, created at first use). On a model sharded with
    FSDP2 the tracked ``y`` stay sharded like the rows; the gradient norms (``(B, K)``
    squared shard norms) and ``Y Y^T`` (``(B, K, K)`` shard Grams) are summed over the
    ranks, so every rank takes the same ``lambda`` step.

    Paper:
        H. D. Fernando, H. Shen, M. Liu, S. Chaudhury, K. Murugesan, T. Chen, "Mitigating
        Gradient Bias in Multi-objective Learning: A Provably Convergent Approach", ICLR
        2023 (Algorithm 1); the practical form follows LibMTL's ``MoCo`` (the authors'
        code).

    Departures:
        LibMTL's form, which equals ours over several steps to 1e-5 relative
        (``tests/test_anchor_rows.py``): a softmax of the stepped weights instead of the
        paper's projection onto the simplex, and tracked gradients normalised and scaled by
        the loss instead of raw ones.

    Cost:
        Reads the Jacobian's rows: the K x P per-task gradients of every block are built (no
        factored fast path) and K x P tracked gradients per block are kept in the state.
        Measured: 11-18 ms at K = 4, 40-57 ms at K = 16 per call on K x 100,000 rows (median
        of 30 ``aggregate_rows`` calls, one thread), against well under a millisecond for
        the Gram methods.

    When to use:
        Stochastic gradients whose bias hurts MGDA-like methods, under an inner SGD. Under
        an Adam-like inner optimizer set ``beta=1, beta_sigma=0``: that helps on MultiDigits
        (5.7 ± 2.3 instead of 27.8 ± 3.5) but not with losses of very different sizes (scale
        suite near 850 either way). With the defaults and inner Adam it is the worst row on
        both suites (MultiDigits 27.4, scale 912): its tracking stacks with Adam's moments.

    Args:
        beta: step size of the tracking, in ``(0, 1]`` (default 0.5, ``MoCo_beta``; 1
            under an Adam-like inner optimizer, see above).
        beta_sigma: its decay exponent, ``>= 0`` (default 0.5, ``MoCo_beta_sigma``; 0
            under an Adam-like inner optimizer).
        gamma: step size of ``lambda``, ``> 0`` (default 0.1, ``MoCo_gamma``).
        gamma_sigma: its decay exponent, ``>= 0`` (default 0.5, ``MoCo_gamma_sigma``).
        rho: l2 regularisation of the ``lambda`` step, ``>= 0`` (default 0, ``MoCo_rho``).

    Raises:
        ValueError: naming the argument when it is out of range.
    """

    name = "moco"
    #: Not positively homogeneous: its tracked gradients and lambda step depend on the gradients' scale.
    homogeneous = False

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        self.beta = check_number("beta", beta, 0.0, 1.0, open_low=True)
        self.beta_sigma = check_number("beta_sigma", beta_sigma, 0.0)
        self.gamma = check_number("gamma", gamma, 0.0, open_low=True)
        self.gamma_sigma = check_number("gamma_sigma", gamma_sigma, 0.0)
        self.rho = check_number("rho", rho, 0.0)

    def init_state(self, num_tasks: int, num_blocks: int) -> State:
        return {
            "steps": counter(0),
            "lambda": torch.full((num_blocks, num_tasks), 1.0 / max(num_tasks, 1), dtype=torch.float64),
        }

    def aggregate_rows(
        self, rows: List[Tensor], gram: Tensor, state: State, ctx: AggregationContext
    ) -> Tuple[List[Tensor], Optional[Tensor], State]:
        num_blocks, k = gram.shape[0], gram.shape[1]
        step = calls(state) + 1
        beta = self.beta / step**self.beta_sigma
        gamma = self.gamma / step**self.gamma_sigma
        device = rows[0].device if rows else torch.device("cpu")  # the work stays there: no host read
        weights = block_vector(state, "lambda", num_blocks, k, 1.0 / k, device)
        losses = ctx.losses.to(device=device, dtype=torch.float64)
        new_state: State = {"steps": counter(step)}
        updates = []
        new_weights = torch.empty_like(weights)
        ridge = self.rho * torch.eye(k, dtype=torch.float64, device=device)
        ys, grams = [], []
        for b, (r, norms) in enumerate(zip(rows, whole_norms(rows, ctx.shards))):
            scale = losses / (norms + EPS)
            g = r * scale.to(device=r.device, dtype=r.dtype).unsqueeze(1)
            y = block_buffer(state, f"y.{b}", r)
            y = y - beta * (y - g)
            new_state[f"y.{b}"] = y
            ys.append(y)
            wide = y.to(torch.float64)  # float64: no over- or underflow to check for on the host
            grams.append(wide @ wide.T)
        tracked = ctx.shards.sum(torch.stack(grams))  # Y Y^T per block (FSDP2: the ranks' shard Grams summed)
        for b, y in enumerate(ys):
            new_weights[b] = torch.softmax(weights[b] - gamma * ((tracked[b] + ridge) @ weights[b]), dim=0)
            updates.append(combine(new_weights[b], y))
        new_state["lambda"] = new_weights
        return updates, None, new_state

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        """Steps lacking some tasks: the present tasks' tracked gradients and lambda move (lambda renormalised over them); an absent task's are kept."""
        return {"y.*": (0,), "lambda": (1,), "steps": ()}

    def settings(self) -> Dict[str, Any]:
        return {
            "beta": self.beta,
            "beta_sigma": self.beta_sigma,
            "gamma": self.gamma,
            "gamma_sigma": self.gamma_sigma,
            "rho": self.rho,
        }
