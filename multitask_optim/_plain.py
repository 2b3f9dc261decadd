"""The plain path: one backward of the weighted sum of the present tasks' losses.

Used for the plain configuration (plain sum, equal weights, ...) and for every step the
schedule leaves out (:mod:`._schedule`). Under ``torch.distributed`` each task's loss
value and gradient are the average over the ranks that had it: the loss values travel
first (one small collective, so every rank computes the same weights), each rank scales
its task ``i`` loss by ``s_ir / S_i`` (its share of the task's samples), and one more
collective sums the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._amp import current_scale
from ._distributed import all_sum, reduce_presence, world_size
from ._gradients import all_finite
from ._graph import analyse
from ._host import Transfer, by_device, host_stage, peak_magnitudes, to_host
from ._losses import (
    Losses,
    Parsed,
    Samples,
    check_passes,
    check_tensor,
    explained_errors,
    loss_values,
    named_features,
    parse_losses,
    task_samples,
)
from ._pipeline import Outcome, Structure, non_finite_losses, write_grad
from .fsdp import local


def ranked_values(
    parsed: Parsed, values: Tensor, samples: Samples
) -> Tuple[Tuple[int, ...], Tensor, List[float]]:
    """Loss values averaged over the ranks that had each task (one collective).

    Returns:
        ``(present, values, shares)``: the tasks some rank had, their averaged values,
        and for each of this rank's tasks its share ``s_ir / S_i`` of the task's total.
    """
    k = len(parsed.names)
    mine = torch.zeros(k, dtype=torch.float64)
    counts = task_samples(samples, parsed) or [1.0] * len(parsed.present)
    mine[list(parsed.present)] = torch.tensor(counts, dtype=torch.float64)
    spread = torch.zeros(k, dtype=torch.float64)
    spread[list(parsed.present)] = values
    mean, totals = reduce_presence(spread, mine)
    present = tuple(i for i in range(k) if totals[i] > 0)
    return present, mean[list(present)], [float(mine[i] / totals[i]) for i in parsed.present]


def loss_factors(
    mine: Sequence[int], present: Sequence[int], weights: Optional[Tensor], shares: Optional[List[float]]
) -> Optional[List[float]]:
    """Each of this rank's losses' factor in the backward: its weight times its rank share."""
    if weights is None and shares is None:
        return None
    by_task = dict(zip(present, weights.tolist())) if weights is not None else {}
    out = []
    for n, i in enumerate(mine):
        f = by_task.get(i, 1.0)
        out.append(f if shares is None else f * shares[n])
    return out


def summed(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """Rank-weighted gradients summed across ranks (one collective); a parameter no rank
    reached keeps no gradient."""
    flags = torch.tensor([0.0 if g is None else 1.0 for g in grads], dtype=torch.float64)
    filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    like = filled[0] if filled else flags
    reduced = all_sum([flags.to(like.device, like.dtype), *filled])
    reached = (reduced[0] > 0).tolist()
    return [g if r else None for g, r in zip(reduced[1:], reached)]


def weighted_sum(losses: Sequence[Tensor], factors: Optional[Sequence[float]]) -> Tensor:
    """``sum_i f_i L_i``; a factor of exactly 1 is not multiplied (bitwise the plain sum)."""
    terms = list(losses) if factors is None else [x if f == 1.0 else x * f for x, f in zip(losses, factors)]
    return sum(terms)  # type: ignore[return-value]


def gradients(
    losses: Sequence[Tensor], factors: Optional[Sequence[float]], params: Sequence[Tensor], scale: float
) -> Tuple[Optional[Tensor], ...]:
    """Gradients of ``sum_i f_i L_i`` (one backward), unscaled from the loss scale.

    A factor of exactly 1 is not multiplied, so with no factors and no loss scale this is
    bitwise ``torch.autograd.grad(sum(losses), params)``.
    """
    total = weighted_sum(losses, factors)
    if scale != 1.0:
        total = total * scale
    grads = torch.autograd.grad(total, params, allow_unused=True)  # type: ignore[arg-type]
    if scale != 1.0:
        grads = tuple(None if g is None else g * (1.0 / scale) for g in grads)
    return grads


@dataclass
class PlainPlan:
    """What a plain step computed before its backward (see :meth:`PlainPath._plain_plan`)."""

    parsed: Parsed
    present: Tuple[int, ...]
    values: Tensor
    weights: Optional[Tensor]
    states: Dict[str, Any]
    structure: Optional[Structure]
    factors: Optional[List[float]]
    generator_state: Tensor
    #: whether the losses were read and checked before the backward (else with its gradients)
    checked: bool = True


class PlainPath:
    """The optimizer's plain step (a mixin of :class:`~multitask_optim.optimizer.MultiTaskOptimizer`)."""

    def _sharded_gradients(
        self, losses: Sequence[Tensor], factors: Optional[Sequence[float]], params: Sequence[Tensor]
    ) -> List[Optional[Tensor]]:
        """FSDP2: gradients of ``sum_i f_i L_i`` summed over the ranks, as sharded ``DTensor`` s.

        One ``backward`` through FSDP's own hooks, at the loss scaler's scale; FSDP's
        reduce-scatter averages over the ``W`` ranks of its mesh, so the result is
        multiplied by ``W`` (``f_i`` already holds each rank's share of the task). The
        parameters' ``.grad`` are set aside during it and put back, so nothing has
        changed until the caller writes the returned gradients.
        """
        scale = current_scale(self.grad_scaler)
        total = weighted_sum(losses, factors)
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            (total * scale if scale != 1.0 else total).backward()  # type: ignore[union-attr]
            grads = [p.grad for p in params]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        unscale = self._rows.world / scale  # FSDP averaged over its mesh: the sum, unscaled
        return [g if g is None or unscale == 1.0 else g * unscale for g in grads]

    def _plain(self) -> bool:
        """Nothing to do per task: plain sum, equal weights, no preconditioning, one process,
        and ``gradient_mode="auto"`` (an explicit mode asks for the per-task gradients, and
        with them the per-task statistics in ``last_stats``)."""
        return (
            self.engine.requested == "auto"
            and self.aggregator.is_plain_sum()
            and self.weighting.is_constant_one()
            and self.preconditioner is None
            and self._task_lr is None
            and current_scale(self.grad_scaler) == 1.0
            and world_size() == 1
            and not self._sharded
        )

    def _plain_plan(
        self, losses: Losses, features: Any, representation: Optional[Tensor], samples: Samples
    ) -> Optional[PlainPlan]:
        """Check the losses, find the structure if the partition is still unknown, and compute
        the weights and each loss's factor: everything a plain step needs before its backward
        (no state change). None: the step was skipped (a non-finite loss or weight)."""
        parsed = parse_losses(losses, self._names)
        self._note_task_count(parsed.names)
        named = [("representation", representation)] if representation is not None else []
        named += named_features(features)
        for name, tensor in named:
            check_tensor(tensor, name)
        values, present, shares = loss_values(parsed.losses), parsed.present, None
        if world_size() > 1:  # each task's value and gradient: the average over the ranks that had it
            present, values, shares = ranked_values(parsed, values, samples)
        early = world_size() > 1 or not self.weighting.is_constant_one()  # weights multiply the losses
        if early:  # the losses are read before the backward (else with its gradients, once)
            values = to_host(values)
            with host_stage():
                bad = non_finite_losses([parsed.names[i] for i in present], values)
            if bad is not None:
                return self._skip(bad, values)
        if self._sharded:  # FSDP2: every rank must run the same backwards (same tasks)
            self._rows.agree_on_tasks(parsed.names, parsed.present, first=True)
        need_graph = named or (self._partition is None and not self._plain())
        graph = self._rows.map_graph(analyse(parsed.losses), self._params, None) if need_graph else None
        for name, tensor in named:
            check_passes(tensor, graph, name)  # type: ignore[arg-type]
        structure = None
        if self._partition is None and not self._plain():
            structure = self._structure(parsed, graph, None)  # type: ignore[arg-type]
        generator_state = self._generator.get_state()
        weights, states = None, {}
        with host_stage():  # the losses were read above: the weights are host work
            if not self.weighting.is_constant_one():
                current = self._current_states(len(parsed.names), 1)
                weights, states, why = self._weigh(parsed.names, present, values, {}, current)
                if why is not None:
                    self._generator.set_state(generator_state)
                    return self._skip(why, values)
            factors = loss_factors(parsed.present, present, weights, shares)
        return PlainPlan(parsed, present, values, weights, states, structure, factors, generator_state, early)

    def _plain_check(self, plan: PlainPlan, grads: Sequence[Optional[Tensor]]) -> Optional[str]:
        """Why the plain step must be skipped (None: it can go on), from one host read of the
        gradients' largest entries (and the losses, when they were not read before)."""
        if self._sharded:
            finite = all_finite([local(g) for g in grads if g is not None])
            return None if self._rows.agree(finite) else "non-finite gradient"
        transfer = Transfer()
        if plan.values.device.type != "cpu" or not plan.checked:
            transfer.add("values", plan.values)
        present = [g for g in grads if g is not None and g.numel()]
        for n, group in enumerate(by_device(present).values()):
            transfer.add(f"peaks{n}", peak_magnitudes(group))
        host = transfer.fetch()  # the plain step's one host read
        with host_stage():
            if "values" in host:
                plan.values = host["values"]
                names = [plan.parsed.names[i] for i in plan.present]
                bad = non_finite_losses(names, plan.values)
                if bad is not None:
                    return bad
            peaks = [v for name, t in host.items() if name != "values" for v in t.tolist()]
            return None if all(math.isfinite(v) for v in peaks) else "non-finite gradient"

    def _plain_commit(self, plan: PlainPlan) -> Outcome:
        """Commit a plain step's structure and weighting state; its Outcome (no gradients)."""
        if plan.structure is not None:
            self._adopt_partition(plan.structure.partition, warn=True, blocks=plan.structure.blocks)
        if not self._weighting_ready and (plan.weights is not None or plan.structure is not None):
            self._adopt_weighting(plan.parsed.names)
        self._states.update(plan.states)
        if self._names is None:
            self._names = plan.parsed.names
        ones = torch.ones(len(plan.present), dtype=torch.float64)
        return Outcome(ones if plan.weights is None else plan.weights, None, None, [], [], plan.states)

    def _plain_step(
        self, losses: Losses, features: Any, representation: Optional[Tensor], samples: Samples
    ) -> None:
        """One backward of ``sum_i w_i L_i`` over the present tasks, and the inner step.

        The plain configuration's step, and every step the schedule leaves out: bitwise
        ``sum(losses).backward(); inner.step()`` when every weight is 1. Only the
        weighting runs (its state committed only when the step is taken).
        """
        plan = self._plain_plan(losses, features, representation, samples)
        if plan is None:
            return None
        params = [p for p in self._params if p.requires_grad]
        try:
            with explained_errors():  # e.g. losses whose graph the caller's own backward() freed
                if self._sharded:
                    grads = self._sharded_gradients(plan.parsed.losses, plan.factors, params)
                else:
                    grads = gradients(
                        plan.parsed.losses, plan.factors, params, current_scale(self.grad_scaler)
                    )
                    if world_size() > 1:
                        grads = summed(params, grads)
        except BaseException:
            self._generator.set_state(plan.generator_state)  # the weights' draws, undone
            raise
        why = self._plain_check(plan, grads)
        if why is not None:
            self._generator.set_state(plan.generator_state)
            return self._skip(why, plan.values)
        outcome = self._plain_commit(plan)
        for p, g in zip(params, grads):
            write_grad(p, g)
        self._drop_absent([plan.parsed.names[i] for i in plan.present])
        self._take(plan.parsed.names, plan.present, plan.values, outcome, None)
        return None
