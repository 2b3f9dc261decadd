"""DB-MTL: dual balancing of loss scales and gradient magnitudes (Lin et al., 2023).

Reference: B. Lin, W. Jiang, F. Ye, Y. Zhang, P. Chen, Y.-C. Chen, S. Liu, J. T. Kwok,
"Dual-Balancing for Multi-Task Learning", arXiv:2308.12029, 2023 (Algorithm 1);
LibMTL's ``DB_MTL`` is the authors' code.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .._host import host_stage
from ._rows import block_buffer, calls, check_number, combine, counter, whole_norms
from .base import AGGREGATORS, AggregationContext, RowAggregator, State

#: Added to each loss under the log, as in the authors' code.
EPS = 1e-8


@AGGREGATORS.register
class DBMTL(RowAggregator):
    """DB-MTL: log losses, EMA of the gradients, every task scaled to the largest norm.

    Loss-scale balancing differentiates ``log(L_i + eps)`` (``eps = 1e-8``, as in the
    authors' code) instead of ``L_i``, so a task's
    gradient is ``g_i / (L_i + eps)``: multiplying a loss by a constant no longer changes
    its gradient. Gradient-magnitude balancing keeps an exponential moving average of
    those gradients per block and rescales each task's average to the largest norm::

        beta_t = beta / t^beta_sigma                           (t = 1, 2, ... this method's steps)
        m_i    <- beta_t m_i + (1 - beta_t) g_i / (L_i + eps)   (m_i = 0 before the first step)
        d      = sum_i (max_j ||m_j|| / ||m_i||) m_i              (0 for a zero m_i)

    so every scaled non-zero ``m_i`` has the norm ``max_j ||m_j||``. The losses are the
    ones the surgery sees (``ctx.losses``: weighted when a weighting is on, in which case
    the rows carry the same weights and ``g_i / L_i`` does not depend on them). The EMA
    has no bias correction, as in the paper and LibMTL, whose update ours equals on the
    same Jacobians over several steps. One departure from LibMTL's code: it divides by
    ``||m_i|| + 1e-8``, an absolute floor that shrinks every task whose EMA norm is not
    far above 1e-8 (so the balance depends on the parameters' scale, and fails for small
    per-tensor blocks); we follow the paper's exact ratio, which changes nothing
    measurable when the norms are large (relative ``1e-8 / ||m_i||``).

    **Under an Adam-like inner optimizer (Adam, AdamW: measured with Adam) set ``beta=0``**
    (``surgery_kwargs={"beta": 0}``): each step then rescales the current log-loss
    gradients, with no EMA. The default ``beta=0.9`` is the authors' (LibMTL's
    ``DB_beta``; LibMTL's default optimizer is Adam), but its average sits in front of
    the inner optimizer's own moving average of the gradients, so the update follows
    gradients averaged twice and lags the current ones. Measured on the quality benchmark (3 seeds,
    its default budget, inner Adam; rows ``db_mtl`` and ``db_mtl-b0`` of ``python -m
    benchmarks.quality --suites multidigits,scale --methods db_mtl,db_mtl-b0``): Delta_m%
    on MultiDigits 30.0 +- 6.7 with ``beta=0.9``, 0.46 +- 1.7 with ``beta=0``; on the
    scale suite 613 +- 9 and 71 +- 4 (the plain sum: 2.7 and 391). With plain SGD the EMA
    is the only average of the gradients, and the default stays the authors' setting.

    The update is a combination of the EMAs, not of the current rows, so no
    coefficients are reported. Needs the Jacobian's rows: parameter mode only
    (representation mode refuses it).

    State: ``steps``; per block ``b`` ``ema.{b}`` (``(K, P_b)``, the rows' dtype, created
    at first use). On a model sharded with FSDP2 the EMAs stay sharded like the rows
    (element-wise) and only the norms need every rank: each rank's ``(B, K)`` squared
    shard norms are summed over the ranks.

    Paper:
        B. Lin, W. Jiang, F. Ye, Y. Zhang, P. Chen, Y.-C. Chen, S. Liu, J. T. Kwok,
        "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029, 2023 (Algorithm 1).

    Departures:
        Equals LibMTL's ``DB_MTL`` (the authors' code) over several steps to 1e-5 relative
        (``tests/test_anchor_rows.py``), except for LibMTL's ``+ 1e-8`` floor on the EMA
        norms, which we leave out (the paper's exact ratio). In LibMTL the heads receive the
        gradient of ``log L_i``; here every head gets its own loss's gradient.

    Cost:
        Reads the Jacobian's rows: the K x P per-task gradients of every block are built (no
        factored fast path) and a K x P moving average per block is kept in the state.
        Measured: 19-21 ms at K = 4, 69-77 ms at K = 16 per call on K x 100,000 rows (median
        of 30 ``aggregate_rows`` calls, one thread), against well under a millisecond for
        the Gram methods.

    When to use:
        Loss scales and gradient magnitudes that both differ. Under an Adam-like inner
        optimizer set ``beta=0``: it then ranks with the best rows on both suites
        (MultiDigits 0.46 ± 1.7, scale 71 ± 4, 3 seeds). With the defaults and inner Adam
        its moving average stacks with Adam's and it is among the worst rows (MultiDigits
        24.5, scale 633). Under plain SGD the defaults are the authors' setting.

    Args:
        beta: EMA rate of the gradients, in ``[0, 1)`` (default 0.9, LibMTL's ``DB_beta``;
            0 under an Adam-like inner optimizer, see above).
        beta_sigma: decay exponent of the rate, ``>= 0`` (default 0, ``DB_beta_sigma``).

    Raises:
        ValueError: naming the argument when it is out of range, or at a call naming the
            task whose loss is negative (its log is undefined).
    """

    name = "db_mtl"

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        self.beta = check_number("beta", beta, 0.0, 1.0)
        if self.beta == 1.0:
            raise ValueError("beta must be in [0, 1), got 1.0 (the EMA would never move)")
        self.beta_sigma = check_number("beta_sigma", beta_sigma, 0.0)

    def init_state(self, num_tasks: int, num_blocks: int) -> State:
        return {"steps": counter(0)}

    def aggregate_rows(
        self, rows: List[Tensor], gram: Tensor, state: State, ctx: AggregationContext
    ) -> Tuple[List[Tensor], Optional[Tensor], State]:
        """The update from the log-loss gradients' moving averages (see the class).

        Raises:
            ValueError: a negative loss (its log is undefined), naming its position.
        """
        losses = ctx.losses.to(torch.float64)
        with host_stage():  # the losses are host values (the step read them first)
            negative = (losses < 0).nonzero().flatten().tolist()
            if negative:
                raise ValueError(
                    f"db_mtl takes the log of every loss: task(s) at position(s) {negative} have a negative "
                    f"loss {losses[negative].tolist()}"
                )
        step = calls(state) + 1
        rate = self.beta / step**self.beta_sigma
        inverse = 1.0 / (losses + EPS)
        new_state: State = {"steps": counter(step)}
        emas = []
        for b, r in enumerate(rows):
            g = r * inverse.to(device=r.device, dtype=r.dtype).unsqueeze(1)
            ema = g + rate * (block_buffer(state, f"ema.{b}", r) - g)
            new_state[f"ema.{b}"] = ema
            emas.append(ema)
        updates = []
        for ema, norms in zip(emas, whole_norms(emas, ctx.shards)):
            scale = torch.where(norms > 0, norms.max() / norms.where(norms > 0, 1.0), 0.0)
            updates.append(combine(scale, ema))
        return updates, None, new_state

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        """Steps lacking some tasks: the EMA rows of the present tasks move; an absent task's EMA is kept as it was."""
        return {"ema.*": (0,), "steps": ()}

    def settings(self) -> Dict[str, Any]:
        return {"beta": self.beta, "beta_sigma": self.beta_sigma}
