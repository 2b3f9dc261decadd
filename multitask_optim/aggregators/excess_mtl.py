"""ExcessMTL: task weights driven by excess risks (He et al., ICML 2024).

Reference: Y. He, S. Zhou, G. Zhang, H. Yun, Y. Xu, B. Zeng, T. Chilimbi, H. Zhao,
"Robust Multi-Task Learning with Excess Risks", ICML 2024 (Equations 6, 7 and 9,
Section 3.2 and Appendix C.1); the authors' code is ``LibMTL/weighting/ExcessMTL.py``
in their repository (uiuctml/ExcessMTL), which LibMTL's ``ExcessMTL`` repeats.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._rows import block_buffer, block_vector, calls, check_count, check_number, combine, counter
from .base import AGGREGATORS, AggregationContext, RowAggregator, State

#: Added to the accumulated squares under the root (Eq. 7), as in the authors' code.
EPS = 1e-7


@AGGREGATORS.register
class ExcessMTL(RowAggregator):
    """ExcessMTL: exponentiated-gradient task weights from per-task excess risks.

    Per block, with ``S_i = sum_{s <= t} g_i(s)^2`` the running sum of squared gradients
    (a diagonal AdaGrad estimate of the Hessian, Eq. 7) and ``h_i = sqrt(S_i + 1e-7)``,
    the excess risk of task ``i`` is estimated by the second-order Taylor expansion
    (Eq. 6) ``E_i = sum_p g_i[p]^2 / h_i[p]``. The first steps only measure: the weights
    stay 1 and the mean of their ``E`` becomes the baseline ``E_i^0`` (scale processing,
    Sec. 3.2). Every later step divides by it and takes an exponentiated-gradient step
    on the weights (Eq. 9), kept summing to ``K``::

        alpha_i <- K alpha_i exp(eta E_i / E_i^0) / sum_j alpha_j exp(eta E_j / E_j^0)
        d = sum_i alpha_i g_i = J^T alpha

    With the defaults this is the authors' code (which LibMTL repeats) step by step: the
    weights start at 1 and sum to ``K`` (so before they move the update is the plain
    sum), the first step stores its ``E`` as the baseline and leaves the weights at 1,
    and ``eta = 1e-2`` (their configuration's ``robust_step_size``; their README's
    Office-Home example passes 1). The update is done in log space (a softmax), so a
    large ``E / E^0`` saturates a weight instead of overflowing; ``S`` is kept as its
    square root ``sqrt(S_i)`` (updated with ``hypot``), so squares of large gradients
    never overflow the rows' dtype.

    Where it departs from the authors' code:

    - **Task-specific parameters (heads) get their own loss's gradient** (times the
      weighting's weight), as with every surgery here: the surgery acts on the shared
      parameters only. The authors' code backpropagates ``sum_i alpha_i L_i``, so its
      heads get ``alpha_i`` times their gradient. Under an Adam-like inner optimizer a
      per-parameter constant factor makes no difference; under SGD the heads' step is
      ``1 / alpha_i`` times theirs.
    - **A task whose baseline is still 0** (its gradient was exactly 0 on every
      baseline step, e.g. a zero-initialised head, or it was absent) takes its first
      non-zero ``E`` as its baseline and its weight is not pushed on that step. The
      authors' code divides by the zero baseline and turns every weight into NaN for
      good; a small floor instead (TorchJD's ``+ 1e-7``) makes ``E / E^0`` huge and the
      weights one-hot for the rest of the run.
    - **``n_warmup_steps`` (Appendix C.1, which recommends three epochs) averages the
      baseline over that many steps**; the authors' code has no warm-up and takes the
      first step's ``E``: ``n_warmup_steps`` 0 (the default) and 1 both do exactly that.
    - **The weights are kept per block** (``granularity=``); with the default single
      block they are the authors' weights.

    TorchJD 0.18's ``ExcessMTL`` keeps its weights on the simplex (ours are ``K`` times
    them) and, with ``n_warmup_steps=0``, updates the weights on the first call with the
    raw ``E`` (not divided by any baseline): on losses of different scales that makes
    the weights one-hot at once (``exp`` of ``eta E`` underflows), and, kept as
    log-weights, they stay one-hot. Ours equals ``K`` times TorchJD's with
    ``n_warmup_steps >= 1``.

    State: ``steps``; per block ``b`` ``root.{b}`` (``(K, P_b)``, rows' dtype, created at
    first use); ``weights``, ``baseline`` and ``warmup`` (``(B, K)`` float64). The update
    is ``J_b^T alpha_b``, so ``alpha`` is reported as the coefficients. Needs the
    Jacobian's rows: parameter mode only (representation mode refuses it). On a model
    sharded with FSDP2, ``root`` stays sharded like the rows and each rank's partial
    ``E`` (a ``(B, K)`` sum over its elements) is summed over the ranks, so every rank
    computes the same weights.

    Paper:
        Y. He, S. Zhou, G. Zhang, H. Yun, Y. Xu, B. Zeng, T. Chilimbi, H. Zhao, "Robust
        Multi-Task Learning with Excess Risks", ICML 2024 (Equations 6, 7 and 9, Section
        3.2, Appendix C.1).

    Departures:
        Follows the authors' code, which LibMTL repeats: equals LibMTL's ``ExcessMTL`` over
        ten steps (step sizes 1e-2 and 1) and ``K`` times TorchJD 0.18's over several steps
        (TorchJD's weights sum to 1; its warm-up 0 updates with the raw excess risk on the
        first call, so ours matches its warm-up 1 there), both to 1e-5 relative
        (``tests/test_anchor_rows.py``), and a plain-loop reference of the authors'
        algorithm to 1e-9 (``tests/test_excess_mtl_reference.py``). Departures from that
        code: the heads get their own loss's gradient (theirs ``alpha_i`` times it), a zero
        baseline is replaced by the task's first non-zero ``E`` (theirs turns every weight
        into NaN), and the optional warm-up averages the baseline over several steps.

    Cost:
        Reads the Jacobian's rows: the K x P per-task gradients of every block are built (no
        factored fast path) and a K x P accumulator per block is kept in the state.
        Measured: 13-28 ms at K = 4, 51-91 ms at K = 16 per call on K x 100,000 rows (median
        of 30 ``aggregate_rows`` calls, one thread), against well under a millisecond for
        the Gram methods.

    When to use:
        Tasks with label noise of different levels (it down-weights the tasks whose excess
        risk stays high). On the quality suites, which have no label noise, it is close to
        the plain sum (MultiDigits 4.34 ± 5.79, scale 405.7 ± 13.0, 2 seeds; the plain sum
        1.95 and 407.9 in the same run): no gain to expect without noisy tasks.

    Args:
        robust_step_size: ``eta > 0``, the step size of the weight update (default
            ``1e-2``, the authors' and LibMTL's ``robust_step_size``).
        n_warmup_steps: steps with weights 1 whose mean ``E`` is the baseline (default
            0, which, like 1, takes the first step's ``E``: the authors' code).

    Raises:
        ValueError: naming the argument if ``robust_step_size <= 0`` or
            ``n_warmup_steps`` is not a non-negative integer.
    """

    name = "excess_mtl"
    #: Not positively homogeneous: h = sqrt(S + 1e-7) has an absolute floor, so E / E^0 (and the
    #: weights) change with the gradients' scale where the gradients are small.
    homogeneous = False

    def __init__(self, robust_step_size: float = 1e-2, n_warmup_steps: int = 0) -> None:
        self.robust_step_size = check_number("robust_step_size", robust_step_size, 0.0, open_low=True)
        self.n_warmup_steps = check_count("n_warmup_steps", n_warmup_steps)

    def init_state(self, num_tasks: int, num_blocks: int) -> State:
        return {
            "steps": counter(0),
            "weights": torch.ones(num_blocks, num_tasks, dtype=torch.float64),
            "baseline": torch.zeros(num_blocks, num_tasks, dtype=torch.float64),
            "warmup": torch.zeros(num_blocks, num_tasks, dtype=torch.float64),
        }

    def aggregate_rows(
        self, rows: List[Tensor], gram: Tensor, state: State, ctx: AggregationContext
    ) -> Tuple[List[Tensor], Optional[Tensor], State]:
        num_blocks, k = gram.shape[0], gram.shape[1]
        step = calls(state)
        device = rows[0].device if rows else torch.device("cpu")  # the work stays there: no host read
        weights = _present_weights(block_vector(state, "weights", num_blocks, k, 1.0, device))
        baseline = block_vector(state, "baseline", num_blocks, k, 0.0, device)
        warmup = block_vector(state, "warmup", num_blocks, k, 0.0, device)
        roots, excess = self._excess_risks(rows, state, ctx)
        measuring = max(self.n_warmup_steps, 1)  # the baseline needs at least one step's E
        if step < measuring:
            warmup = warmup + excess
            if step == measuring - 1:
                baseline = warmup / measuring
        else:
            # A task with no baseline yet takes this E as its baseline and is not pushed.
            unset = baseline <= 0
            ratio = torch.where(unset, 0.0, excess / baseline.where(~unset, 1.0))
            baseline = torch.where(unset, excess, baseline)
            weights = k * torch.softmax(weights.log() + self.robust_step_size * ratio, dim=1)
        new_state: State = {f"root.{b}": root for b, root in enumerate(roots)}
        new_state.update(
            {"steps": counter(step + 1), "weights": weights, "baseline": baseline, "warmup": warmup}
        )
        updates = [combine(weights[b], r) for b, r in enumerate(rows)]
        return updates, weights, new_state

    @staticmethod
    def _excess_risks(
        rows: List[Tensor], state: State, ctx: AggregationContext
    ) -> Tuple[List[Tensor], Tensor]:
        """The new ``sqrt(S)`` per block and the ``(B, K)`` float64 excess risks ``E`` (Eq. 6, 7)."""
        device = rows[0].device if rows else torch.device("cpu")
        excess = torch.zeros(len(rows), rows[0].shape[0] if rows else 0, dtype=torch.float64, device=device)
        roots = []
        for b, r in enumerate(rows):
            root = torch.hypot(block_buffer(state, f"root.{b}", r), r)  # sqrt(S_i), S_i including g_i
            roots.append(root)
            if r.shape[1]:
                size = r.abs()
                ratio = size / torch.hypot(root, root.new_tensor(EPS**0.5))  # |g| / h <= 1
                excess[b] = (size * ratio).sum(dim=1, dtype=torch.float64)
        return roots, ctx.shards.sum(excess)  # FSDP2: the ranks' shards add up to the whole rows' E

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        """Steps lacking some tasks: the present tasks' accumulators and weights move (weights renormalised over them); an absent task's are kept."""
        return {"root.*": (0,), "weights": (1,), "baseline": (1,), "warmup": (1,), "steps": ()}

    def settings(self) -> Dict[str, Any]:
        return {"robust_step_size": self.robust_step_size, "n_warmup_steps": self.n_warmup_steps}


def _present_weights(weights: Tensor) -> Tensor:
    """The ``(B, k)`` weights put back to sum ``k`` (a step lacking some tasks hands the
    present tasks' slice); a slice whose weights all underflowed restarts from 1."""
    k = weights.shape[1]
    total = weights.sum(dim=1, keepdim=True)
    off = (total - k).abs() > 1e-9 * k
    return torch.where(off, torch.where(total > 0, k * weights / total.clamp_min(1e-300), 1.0), weights)
