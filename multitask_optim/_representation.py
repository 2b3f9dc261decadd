"""Representation mode's rows: per-task gradients with respect to a shared representation ``z``.

``step(losses, representation=z)`` (an approximation of the parameter-level method, as
MGDA-UB) needs, per task, the gradient of its loss w.r.t. ``z`` and w.r.t. its own
parameters; only the heads are traversed, never the trunk. Two paths give the same rows:

- **Factored** (:func:`factored_rows`, :class:`~._factors.HeadFactor`), when every
  head reads ``z`` (2-D) only through linear maps of its own (``nn.Linear``,
  ``F.linear``, ``z @ W``): ONE backward of all losses gives each map's output gradient
  ``delta_a`` and every task's own-parameter gradients (each map and each own parameter
  is reached by one loss only, so the sum's gradient there is that loss's). Autograd
  never forms the ``N x D`` gradient of ``z`` per task; the Gram and the combined
  feature gradient come from the ``delta_a`` and the maps (see ``HeadFactor``).
- **Dense** (:func:`dense_rows`), always available: one backward per task to ``z`` and
  its own parameters, giving the ``(K, *z.shape)`` rows.

Which one is faster depends on the sizes *and* the hardware (the factored Gram costs
``(N + D) O^2`` for ``O`` head outputs in all, the dense one ``K^2 N D`` plus K backward
calls and a ``K x N x D`` buffer), so ``gradient_mode="auto"`` measures them
(:class:`~._engine.HeadPaths`); :func:`factored_is_cheaper` is the rule used where
nothing is measured.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ._factors import HEAD_BLOCK, HeadFactor
from ._gradients import TaskGradients
from ._graph import LossGraph, Node

#: A linear map of a head: ``(task, its autograd node, M)`` with the map ``z @ M``.
HeadMap = Tuple[int, Node, Tensor]


def feature_rows(
    losses: Sequence[Tensor], features: Tensor, tasks: Sequence[Sequence[Tensor]], graph: LossGraph
) -> TaskGradients:
    """Per-task rows w.r.t. ``features``, by the rule: factored where possible and cheaper."""
    maps = head_maps(losses, features, graph)
    if maps is not None and factored_is_cheaper(len(losses), features, maps):
        return factored_rows(losses, features, tasks, graph, maps)
    return dense_rows(losses, features, tasks, graph)


def dense_rows(
    losses: Sequence[Tensor], features: Tensor, tasks: Sequence[Sequence[Tensor]], graph: LossGraph
) -> TaskGradients:
    """The dense path: the ``(K, *features.shape)`` rows, K head backwards."""
    rows, task_grads = feature_gradients(losses, features, tasks, graph)
    return TaskGradients([rows], task_grads)


def feature_gradients(
    losses: Sequence[Tensor], features: Tensor, tasks: Sequence[Sequence[Tensor]], graph: LossGraph
) -> Tuple[Tensor, List[List[Optional[Tensor]]]]:
    """Dense: ``(Z, task_grads)`` with ``Z`` of shape ``(K, *features.shape)``, K head backwards."""
    rows: List[Tensor] = []
    task_grads: List[List[Optional[Tensor]]] = []
    for i, loss in enumerate(losses):
        own = [p for p in tasks[i] if graph.reached_by(p) & (1 << i)]
        grads = torch.autograd.grad(loss, [features, *own], retain_graph=True, allow_unused=True)
        rows.append(grads[0] if grads[0] is not None else torch.zeros_like(features))
        got = {id(p): g for p, g in zip(own, grads[1:])}
        task_grads.append([got.get(id(p)) for p in tasks[i]])
    return torch.stack(rows), task_grads


def head_maps(losses: Sequence[Tensor], features: Tensor, graph: LossGraph) -> Optional[List[HeadMap]]:
    """``(task, node, M)`` for every graph node that reads ``features``, when all are linear
    maps ``features @ M`` private to one task (the factored path applies); else None."""
    if features.dim() != 2:
        return None
    source = features.grad_fn
    nr = features.output_nr
    if source is None:  # a leaf: its AccumulateGrad node
        source, nr = graph.leaves.get(id(features)), 0
        if source is None:
            return None
    found: List[HeadMap] = []
    for node in graph.order:
        edges = graph.children[node]
        positions = [pos for pos, (child, n) in enumerate(edges) if child is source and n == nr]
        if not positions:
            continue
        mask = graph.mask[node]
        if mask == 0 or mask & (mask - 1):  # reached by several losses: a shared consumer of z
            return None
        m = _map_of(node, positions)
        if m is None or m.dim() != 2:
            return None
        found.append((mask.bit_length() - 1, node, m.detach()))
    return found or None


def _map_of(node: Node, positions: List[int]) -> Optional[Tensor]:
    """``M`` of a node computing ``z @ M`` (+ a bias) from ``z`` at ``positions``; else None."""
    name = type(node).__name__
    try:
        if name == "AddmmBackward0" and positions == [1] and node._saved_alpha == 1 and node._saved_beta == 1:
            return node._saved_mat2
        if name == "MmBackward0" and positions == [0]:
            return node._saved_mat2
    except (AttributeError, RuntimeError):
        pass
    return None


def head_columns(maps: Sequence[HeadMap]) -> int:
    """``O``: the heads' output columns in all (the factored Gram is ``O x O``)."""
    return sum(int(m.shape[1]) for _, _, m in maps)


def factored_is_cheaper(k: int, features: Tensor, maps: Sequence[HeadMap]) -> bool:
    """The rule where nothing is measured: compare the work in which the two paths differ.

    Both paths form one ``N x O x D`` product (the dense one in its K backwards, the
    factored one in its update). The factored Gram then costs ``(N + D) O^2``, less with
    its symmetric blocks (:func:`~._factors.head_gram`); the dense one forms, reduces
    and combines ``K`` rows of ``N x D``: ``K N D (K + 2)``.
    """
    n, d = features.shape
    o = head_columns(maps)
    blocks = max(1, o // HEAD_BLOCK)
    factored = (n + d) * o * o * (blocks + 1) / (2 * blocks)
    return factored <= k * n * d * (k + 2)


def factored_rows(
    losses: Sequence[Tensor],
    features: Tensor,
    tasks: Sequence[Sequence[Tensor]],
    graph: LossGraph,
    maps: List[HeadMap],
) -> TaskGradients:
    """The factored path (:class:`~._factors.HeadFactor`): one backward of all losses."""
    k = len(losses)
    own = [[p for p in tasks[i] if graph.reached_by(p) & (1 << i)] for i in range(k)]
    inputs = [GradientEdge(node, 0) for _, node, _ in maps] + [p for params in own for p in params]
    grads = torch.autograd.grad(
        list(losses), inputs, [torch.ones_like(loss) for loss in losses], retain_graph=True, allow_unused=True
    )
    deltas: List[Tensor] = []
    for (_, _node, m), delta in zip(maps, grads):
        if delta is None:  # no gradient reaches the map's output (a non-differentiable step after it)
            delta = torch.zeros((features.shape[0], m.shape[1]), dtype=m.dtype, device=m.device)
        deltas.append(delta)
    rest = iter(grads[len(maps) :])
    task_grads: List[List[Optional[Tensor]]] = []
    for i in range(k):
        got = {id(p): next(rest) for p in own[i]}
        task_grads.append([got.get(id(p)) for p in tasks[i]])
    owner = torch.cat(
        [torch.full((int(m.shape[1]),), t, dtype=torch.long, device=m.device) for t, _, m in maps]
    )
    factor = HeadFactor(torch.cat(deltas, dim=1), torch.cat([m.T for _, _, m in maps]), owner, k)
    return TaskGradients([None], task_grads, [factor])
