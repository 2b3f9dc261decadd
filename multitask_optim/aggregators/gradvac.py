"""Gradient Vaccine (Wang et al., 2021).

Reference: Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating
and Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021.

State: an EMA target cosine ``phi_hat[i, j]`` per ordered task pair and block, 0 at the
start. For every task ``i`` and the other tasks ``j`` in a random order, with
``phi = cos(g_i', g_j)`` measured before the correction::

    if phi < phi_hat[i, j]:
        g_i' <- g_i' + ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                       / (||g_j|| sqrt(1 - phi_hat^2)) * g_j
    phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi      (every visited pair)

With ``phi_hat == 0`` the correction is exactly PCGrad's projection. After a
correction ``cos(g_i', g_j) == phi_hat[i, j]``. A running ``g_i'`` whose norm fell
below ``1e-6 ||g_i||`` (a correction cancelled it) is treated as zero: its cosine is
rounding noise, so ``phi = 0`` and no correction is made. ``beta`` defaults to 0.5
(the value LibMTL and TorchJD use; the paper's experiments use 1e-2).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from .base import (
    AGGREGATORS,
    SCALAR_LIMIT,
    AggregationContext,
    Aggregator,
    State,
    check_reduction,
    np,
    project_rounds_setup,
    random_orders,
    scatter_sum,
)

#: A running gradient whose norm is below this fraction of its original norm is zero.
RELATIVE_ZERO = 1e-6
#: Lower bound on ``1 - phi_hat^2`` so a target of exactly +-1 stays finite.
_MIN_SIN2 = 1e-12


def _gradvac_scalar(gram: list, orders: list, targets: list, beta: float, coefs: list) -> None:
    """One block in plain Python floats; updates ``targets`` and ``coefs`` in place."""
    for i, order in enumerate(orders):
        inner = list(gram[i])
        sq = gram[i][i]
        floor = (RELATIVE_ZERO**2) * sq
        row_t = targets[i]
        for j in order:
            sq_j = gram[j][j]
            target = row_t[j]
            phi = 0.0
            if sq_j > 0.0 and sq > floor and sq > 0.0:
                n_j = math.sqrt(sq_j)
                a = math.sqrt(sq)
                u = inner[j] / n_j
                phi = min(1.0, max(-1.0, u / a))
                if phi < target:
                    perp = math.sqrt(max(sq - u * u, 0.0))
                    cot = target / math.sqrt(max(1.0 - target * target, _MIN_SIN2))
                    c = (cot * perp - u) / n_j
                    row = gram[j]
                    inner = [x + c * r for x, r in zip(inner, row)]
                    sq = sq + c * (2.0 * u * n_j + c * sq_j)
                    coefs[j] += c
            row_t[j] = target + beta * (phi - target)


def gradvac_coefficients(
    gram: Tensor, orders: Tensor, targets: Tensor, beta: float, reduction: str = "sum"
) -> tuple[Tensor, Tensor]:
    """GradVac coefficients and updated targets.

    Args:
        gram: ``(B, K, K)`` Gram matrices.
        orders: ``(B, K, K-1)`` visiting orders (see :func:`pcgrad_coefficients`).
        targets: ``(B, K, K)`` EMA targets ``phi_hat`` (the diagonal is unused).
        beta: EMA rate of the targets.
        reduction: ``"sum"`` or ``"mean"``.

    Returns:
        ``(coefficients (B, K), new_targets (B, K, K))``.
    """
    b, k, _ = gram.shape
    dtype = gram.dtype
    if b * k <= SCALAR_LIMIT:
        out, new = [], []
        for g_b, o_b, t_b in zip(gram.tolist(), orders.tolist(), targets.tolist()):
            c_b = [1.0] * k
            _gradvac_scalar(g_b, o_b, t_b, beta, c_b)
            out.append(c_b)
            new.append(t_b)
        coefs = torch.tensor(out, dtype=dtype).reshape(b, k)
        new_t = torch.tensor(new, dtype=dtype).reshape(b, k, k)
        return (coefs / k if reduction == "mean" else coefs), new_t
    if np is not None:
        c_np, t_np = _gradvac_numpy(
            gram.detach().cpu().double().numpy(), orders.cpu().numpy(), targets.cpu().double().numpy(), beta
        )
        coefs, new_t = torch.from_numpy(c_np).to(dtype), torch.from_numpy(t_np).to(dtype)
    else:
        coefs, new_t = _gradvac_torch(gram, orders, targets, beta)
    return (coefs / k if reduction == "mean" else coefs), new_t


def _gradvac_numpy(
    gram: np.ndarray, orders: np.ndarray, targets: np.ndarray, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """All blocks and tasks in lock-step rounds, in NumPy (see :func:`_pcgrad_numpy`)."""
    assert np is not None
    b, k, _ = gram.shape
    bi, ti = np.arange(b)[:, None], np.arange(k)[None, :]
    diag = np.diagonal(gram, axis1=1, axis2=2)
    partner_sq = diag[bi[:, :, None], orders]
    partner_norm = np.sqrt(np.maximum(partner_sq, 0.0))
    has_norm = partner_norm > 0
    inv_norm = np.where(has_norm, 1.0 / np.where(has_norm, partner_norm, 1.0), 0.0)
    inner = gram.copy()  # <g_i', g_k>
    sq_norm = diag.copy()  # ||g_i'||^2
    floor = (RELATIVE_ZERO**2) * diag
    new_targets = targets.copy()
    steps = np.zeros(orders.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in range(k - 1):
            j = orders[:, :, t]
            u = inner[bi, ti, j] * inv_norm[:, :, t]  # <g_i', g_j> / ||g_j||
            a2 = np.maximum(sq_norm, 0.0)
            valid = (a2 > floor) & has_norm[:, :, t]
            a = np.sqrt(a2)
            phi = np.clip(np.where(valid, u / np.where(valid, a, 1.0), 0.0), -1.0, 1.0)
            target = new_targets[bi, ti, j]
            # coef = (cot(phi_hat) * ||g_i' - proj_j g_i'|| - u) / ||g_j||
            perp = np.sqrt(np.maximum(a2 - u * u, 0.0))
            cot = target / np.sqrt(np.maximum(1.0 - target * target, _MIN_SIN2))
            coef = np.where(valid & (phi < target), (cot * perp - u) * inv_norm[:, :, t], 0.0)
            inner += coef[:, :, None] * gram[bi, j]
            sq_norm = sq_norm + coef * (2.0 * u * partner_norm[:, :, t] + coef * partner_sq[:, :, t])
            steps[:, :, t] = coef
            new_targets[bi, ti, j] = target + beta * (phi - target)
    return 1.0 + scatter_sum(steps, orders), new_targets


def _gradvac_torch(gram: Tensor, orders: Tensor, targets: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The same rounds in torch (used when NumPy is not installed)."""
    b, k, _ = gram.shape
    dtype = gram.dtype
    diag, partner_rows, partner_sq = project_rounds_setup(gram, orders)
    partner_norm = partner_sq.clamp_min(0.0).sqrt()
    inv_norm = torch.where(partner_norm > 0, 1.0 / partner_norm.where(partner_norm > 0, 1.0), 0.0)
    inner = gram.clone()  # <g_i', g_k>
    sq_norm = diag.clone()  # ||g_i'||^2
    floor = (RELATIVE_ZERO**2) * diag
    new_targets = targets.to(dtype).clone()
    index = orders.unsqueeze(-1)
    steps = []
    for t in range(k - 1):
        idx = index[:, :, t]
        u = inner.gather(2, idx).squeeze(-1).mul_(inv_norm[:, :, t])  # <g_i', g_j> / ||g_j||
        a2 = sq_norm.clamp_min(0.0)
        valid = (a2 > floor) & (inv_norm[:, :, t] > 0)
        a = a2.sqrt()
        phi = torch.where(valid, u / a.where(valid, 1.0), 0.0).clamp_(-1.0, 1.0)
        target = new_targets.gather(2, idx).squeeze(-1)
        # coef = ||g_i'|| (phi_hat sin(phi) - phi sin(phi_hat)) / (||g_j|| sin(phi_hat))
        #      = (cot(phi_hat) * ||g_i' - proj_j g_i'|| - u) / ||g_j||
        perp = (a2 - u * u).clamp_min_(0.0).sqrt_()
        cot = target / (1.0 - target * target).clamp_min_(_MIN_SIN2).sqrt_()
        coef = (cot * perp - u).mul_(inv_norm[:, :, t])
        coef = torch.where(valid & (phi < target), coef, 0.0)
        inner.addcmul_(coef.unsqueeze(-1), partner_rows[:, :, t])
        sq_norm = sq_norm + coef * (2.0 * u * partner_norm[:, :, t] + coef * partner_sq[:, :, t])
        steps.append(coef)
        new_targets.scatter_(2, idx, (target + beta * (phi - target)).unsqueeze(-1))
    coefs = torch.ones(b, k, dtype=dtype)
    if steps:
        coefs.scatter_add_(1, orders.reshape(b, -1), torch.stack(steps, -1).reshape(b, -1))
    return coefs, new_targets


@AGGREGATORS.register
class GradVac(Aggregator):
    """Gradient Vaccine (Wang et al., 2021) in coefficient space.

    State: an EMA target cosine ``phi_hat[i, j]`` per ordered task pair and block, 0 at the
    start. For every task ``i`` and the other tasks ``j`` in a random order, with
    ``phi = cos(g_i', g_j)`` measured before the correction::

        if phi < phi_hat[i, j]:
            g_i' <- g_i' + ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                           / (||g_j|| sqrt(1 - phi_hat^2)) * g_j
        phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi      (every visited pair)

    With ``phi_hat == 0`` the correction is exactly PCGrad's projection; after a correction
    ``cos(g_i', g_j) == phi_hat[i, j]``. Computed in coefficient space, as PCGrad.

    Paper:
        Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and
        Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021
        (Algorithm 2).

    Departures:
        ``beta`` defaults to 0.5 (LibMTL's and TorchJD's value; the paper's experiments use
        1e-2), and every visited pair's target is updated, as in the paper and TorchJD.
        LibMTL updates a target only when it corrects the pair, so its later steps differ. A
        running gradient cancelled by a correction (norm below 1e-6 of the original) is
        treated as zero. Agreement (``tests/test_anchor_agreement.py``): TorchJD 0.18's
        ``GradVac`` with ``eps=0`` equals ours to 1e-12 relative over consecutive steps (K =
        2, and K = 3 with replayed orders); with its default ``eps=1e-8``, to 1e-6. LibMTL's
        agrees on the first step.

    Cost:
        One Gram matrix per block, shared by every Gram method (factored for ``Linear``
        layers, so no K x P buffer there), then K - 1 rounds of corrections on the host in
        float64. Measured: 0.1 ms at K = 4, 0.6-1 ms at K = 16 per call (median of 30
        aggregation calls, one thread; a one-off script timing ``aggregate`` on a Gram
        matrix of 100,000-element rows). State: a K x K target per block.

    When to use:
        Conflicting tasks whose gradients should keep a target alignment rather than just
        stop conflicting. It partly corrects a magnitude imbalance (scale suite: 266-278
        against ~400 for the plain sum) and matches PCGrad on MultiDigits.

    Args:
        beta: EMA rate of the per-pair cosine targets, in ``[0, 1]``.
        reduction: ``"sum"`` (the paper) or ``"mean"``.

    Raises:
        ValueError: naming ``beta`` or ``reduction`` when it is out of range.
    """

    name = "gradvac"

    def __init__(self, beta: float = 0.5, reduction: str = "sum") -> None:
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        self.beta = float(beta)
        self.reduction = check_reduction(reduction)

    def init_state(self, num_tasks: int, num_blocks: int) -> State:
        return {"targets": torch.zeros(num_blocks, num_tasks, num_tasks, dtype=torch.float64)}

    def task_axes(self) -> Dict[str, Tuple[int, ...]]:
        """``targets (B, K, K)``: both task axes; a step lacking a task runs on the present
        pairs and leaves every target of a pair with an absent task unchanged."""
        return {"targets": (1, 2)}

    def aggregate(self, gram: Tensor, state: State, ctx: AggregationContext) -> tuple[Tensor, State]:
        targets = state.get("targets")
        if targets is None or targets.shape != gram.shape:
            targets = torch.zeros_like(gram)
        orders = random_orders(gram.shape[0], gram.shape[1], ctx.generator)
        coefs, new_targets = gradvac_coefficients(gram, orders, targets, self.beta, self.reduction)
        return coefs, {"targets": new_targets}

    def settings(self) -> Dict[str, Any]:
        return {"beta": self.beta, "reduction": self.reduction}
