"""Weights-only mode: the method as a scalar loss for an engine that owns the backward.

For a Gram-based surgery the shared update is ``d = J^T (c * w)``, with the coefficients
``c`` a function of the Gram (and the weights ``w``, the losses, the method's state).
For fixed ``c`` and ``w``, ``J^T (c * w) = grad(sum_i c_i w_i L_i)``: so once the Gram
is known, the scalar ``sum_i c_i w_i L_i`` with ``c`` and ``w`` detached carries the
whole method, and any engine that runs the backward itself (``accelerator.backward``,
DeepSpeed, Lightning's automatic optimization, a ``GradScaler``) applies it by
backpropagating that scalar. :func:`weighted_loss` runs the stages of a step up to
the coefficients (:meth:`MultiTaskOptimizer._run` with ``combine=False``: the same
gather, reduce, weigh, Gram and aggregate stages, the graph kept for the caller),
commits their state as a taken step does and returns the scalar; :func:`inner_step`
is the ``step()`` that follows.

What differs from ``step(losses)``:

- a task's own parameters receive ``c_i w_i grad L_i`` instead of ``w_i grad L_i``
  (the shared parameters receive exactly the method's update);
- a learnable weighting's objective rides along in the scalar as a term whose value
  is 0 and whose gradient is exactly what the full step writes to its parameters;
- the method's state (and the step counter) advance when the scalar is formed; the
  following ``step()`` only clips (``max_grad_norm``), checks the gradients and runs
  the inner optimizer. With several calls before one ``step()`` (gradient
  accumulation) each call is one application of the method, on its own micro-batch:
  the update is the sum of the micro-batches' updates, not the method on the big
  batch (use ``accumulate()`` + ``step()`` for that);
- a non-finite loss (or weight, gradient, coefficient) records a skip as the full step
  does (counted, warned once, no state change) and returns the plain sum of the
  present losses: its backward is that of ``sum(losses)``, so a ``GradScaler`` (or
  DeepSpeed's loss scaler) sees the overflow, skips and lowers its scale, and the next
  ``step()`` of this optimizer does not run the inner optimizer;
- under ``torch.distributed`` the per-task gradients are averaged across ranks before
  the Gram (one collective, as in the full step), and each rank's scalar is scaled so
  that an engine that *averages* the gradients over the ranks (DDP, DeepSpeed,
  Accelerate) produces the full step's update.

Row methods (``needs_jacobian``), per-task preconditioning, representation mode, a
Gram per block (``granularity`` with several blocks: one scalar carries one set of
coefficients) and FSDP2-sharded models need the rows or more than one backward: they
are refused with a ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._clipping import clip_
from ._distributed import world_size
from ._gradients import all_finite
from ._host import host_stage
from ._losses import Losses, Parsed, Samples, parse_losses
from ._pipeline import Outcome
from ._plain import loss_factors, ranked_values, weighted_sum

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import MultiTaskOptimizer


@dataclass
class Pending:
    """What :func:`weighted_loss` calls since the last ``step()`` leave for it.

    Attributes:
        skipped: one of them skipped (a non-finite loss, weight or coefficient): the
            next ``step()`` does not run the inner optimizer.
        taken: one of them took a step of the method (the weighting's ``after_step``
            runs after the inner step).
    """

    skipped: bool = False
    taken: bool = False


def check_supported(opt: MultiTaskOptimizer, representation: Optional[Tensor]) -> None:
    """Refuse, before anything changes, what a single scalar loss cannot carry."""
    if representation is not None:
        raise ValueError(
            "weighted_loss() does not run in representation mode (representation=): use "
            "step(losses, representation=z)"
        )
    if opt.aggregator.needs_jacobian:
        raise ValueError(
            f"surgery {opt.aggregator.name!r} reads the rows of the Jacobian (needs_jacobian), not only their "
            "Gram: its update is not the gradient of a weighted sum of the losses; use step(losses)"
        )
    if opt.preconditioner is not None:
        raise ValueError(
            "weighted_loss() cannot apply per-task preconditioning (precondition=): it rescales each task's "
            "gradient element by element; use step(losses)"
        )
    blocks = opt._blocks
    several = len(blocks) > 1 if blocks is not None else opt._granularity != "global"
    if isinstance(opt._granularity, list) and blocks is None:
        several = len(opt._granularity) > 1
    if several:
        raise ValueError(
            "weighted_loss() needs one Gram (granularity='global' or a single block): with several blocks "
            "each has its own coefficients, which one scalar loss cannot carry; use step(losses)"
        )
    if opt._sharded:
        raise ValueError("weighted_loss() does not support models sharded with FSDP2; use step(losses)")
    if opt._accumulated is not None:
        raise ValueError(
            "accumulate() was called before: finish those micro-batches with step(), or use weighted_loss() "
            "for every micro-batch"
        )


def check_not_pending(opt: MultiTaskOptimizer) -> None:
    """``step(losses)`` and ``accumulate()`` write ``.grad`` themselves: not on top of a
    weighted_loss() backward whose step has not run."""
    if opt._pending is not None:
        raise ValueError(
            "weighted_loss() was called since the last step(): call step() without losses to apply "
            "its update first"
        )


def weighted_loss(
    opt: MultiTaskOptimizer,
    losses: Losses,
    features: Optional[Union[Tensor, Sequence[Tensor]]] = None,
    representation: Optional[Tensor] = None,
    samples: Samples = None,
) -> Tensor:
    """``sum_i c_i w_i L_i`` (coefficients and weights detached), the step's state committed.

    See :meth:`MultiTaskOptimizer.weighted_loss`.
    """
    check_supported(opt, representation)
    parsed = parse_losses(losses, opt._names)
    pending = opt._pending or Pending()
    opt._engine_owns_scaler = True
    try:
        if opt._plain() or not opt.schedule.runs(opt._steps):
            loss = _plain(opt, losses, features, samples, parsed)
        else:
            loss = _full(opt, losses, features, samples, parsed)
    finally:
        opt._engine_owns_scaler = False
    if loss is None:
        pending.skipped = True
        loss = weighted_sum(parsed.losses, None)
    else:
        pending.taken = True
    opt._pending = pending
    return loss


def _plain(
    opt: MultiTaskOptimizer, losses: Losses, features: Any, samples: Samples, parsed: Parsed
) -> Optional[Tensor]:
    """A step the schedule leaves out (or the plain configuration): ``sum_i w_i L_i``."""
    plan = opt._plain_plan(losses, features, None, samples)
    if plan is None:
        return None
    outcome = opt._plain_commit(plan)
    extra = _book(opt, plan.parsed.names, plan.present, plan.values, outcome, None)
    return _scalar(plan.parsed.losses, plan.factors, extra)


def _full(
    opt: MultiTaskOptimizer, losses: Losses, features: Any, samples: Samples, parsed: Parsed
) -> Optional[Tensor]:
    """The full method: Gram, weights and coefficients; ``sum_i c_i w_i L_i``."""
    gathered, source = opt._gather(losses, None, features, None, samples, once=True, keep=True)
    ran = opt._run(gathered, source, combine=False)
    if ran is None:
        return None
    outcome, values, present = ran
    assert outcome.coefficients is not None
    mix = outcome.coefficients[0] * outcome.weights
    shares = None
    if world_size() > 1:  # this rank's share of each task (the rows were averaged over the ranks)
        shares = ranked_values(parsed, torch.zeros(len(parsed.losses), dtype=torch.float64), samples)[2]
    factors = loss_factors(parsed.present, present, mix, shares)
    extra = _book(opt, gathered.names, present, values, outcome, source)
    return _scalar(parsed.losses, factors, extra)


def _scalar(losses: Sequence[Tensor], factors: Optional[List[float]], extra: Optional[Tensor]) -> Tensor:
    """``sum_i f_i L_i`` (times the world size: the engine averages over the ranks), plus
    the weighting's term."""
    size = world_size()
    if size > 1:
        factors = [size * f for f in (factors or [1.0] * len(losses))]
    total = weighted_sum(losses, factors)
    return total if extra is None else total + extra.to(total.device, total.dtype)


def _book(
    opt: MultiTaskOptimizer,
    names: Tuple[str, ...],
    present: Tuple[int, ...],
    values: Tensor,
    outcome: Outcome,
    source: Any,
) -> Optional[Tensor]:
    """What a taken step records besides the update: the weighting's gradient (as a term
    of the scalar), the step counter and ``last_stats``."""
    with host_stage():  # a learnable weighting's parameters live on the host
        extra = _weighting_term(opt, names, present, values, outcome)
    weighting, weights = opt.weighting, outcome.weights
    opt._steps += 1
    opt._record(names, present, values, outcome, source)
    opt.last_stats.defer(lambda: {"objective": weighting.objective(values, weights)})
    opt.last_stats["weights_only"] = True
    return extra


def _weighting_term(
    opt: MultiTaskOptimizer,
    names: Tuple[str, ...],
    present: Tuple[int, ...],
    values: Tensor,
    outcome: Outcome,
) -> Optional[Tensor]:
    """``sum_p <p - p.detach(), g_p>``: value 0, gradient ``g_p``, the gradient the full step
    writes to the learnable weighting's parameter ``p`` (computed by the weighting's own
    ``backward``, their ``.grad`` set aside and put back)."""
    params = opt.weighting.parameters()
    if not params:
        return None
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        opt._weighting_backward(names, present, values, outcome)
        grads = [p.grad for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    terms = [((p - p.detach()) * g.detach()).sum() for p, g in zip(params, grads) if g is not None]
    return torch.stack(terms).sum() if terms else None


def inner_step(opt: MultiTaskOptimizer, closure: Optional[Callable[[], Any]]) -> Any:
    """``step()`` without losses: the inner optimizer's step, finishing weighted_loss calls.

    With nothing pending this is exactly ``inner.step(closure)``. After
    :func:`weighted_loss` (before the call, or inside the closure, as in Lightning's
    automatic optimization): skip the inner step when one of them skipped or a gradient
    is not finite, else clip to ``max_grad_norm``, step, and let the weighting finish
    its step (``after_step``).
    """
    if closure is None:
        if opt._pending is None:
            return opt.optimizer.step()
        if _prepare(opt):
            opt.optimizer.step()
            opt.weighting.after_step()
        return None
    stepped = [False]

    def wrapped() -> Any:
        result = closure()
        if opt._pending is not None:
            stepped[0] = _prepare(opt)
            if not stepped[0]:  # nothing to step on: torch optimizers leave a parameter without .grad alone
                for p in [*opt._params, *opt.weighting.parameters()]:
                    p.grad = None
        return result

    result = opt.optimizer.step(wrapped)
    if stepped[0]:
        opt.weighting.after_step()
    return result


def _prepare(opt: MultiTaskOptimizer) -> bool:
    """Consume the pending record; whether the inner step runs (clipped when asked)."""
    pending, opt._pending = opt._pending, None
    assert pending is not None
    if pending.skipped or not pending.taken:
        return False
    grads = [p.grad for p in [*opt._params, *opt.weighting.parameters()] if p.grad is not None]
    if not all_finite(grads):
        opt._engine_owns_scaler = True
        try:
            values = torch.tensor(opt.last_stats.get("losses", []), dtype=torch.float64)
            opt._skip("non-finite gradient after weighted_loss()", values)
        finally:
            opt._engine_owns_scaler = False
        return False
    if opt.max_grad_norm is not None:
        opt.last_stats["grad_norm"] = clip_(opt._params, opt.max_grad_norm)
    return True
