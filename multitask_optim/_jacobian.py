"""Per-task gradients: task parameters from their own loss, shared ones as a Jacobian.

Five exact paths; ``gradient_mode="auto"`` measures them (see :class:`~._engine.GradientEngine`):

- ``frontier``: find the edges where each task's private graph meets the shared graph,
  backpropagate each loss through its own head once to those edges (capturing only the
  head's own contribution with node hooks), then run one batched backward
  (``is_grads_batched=True``) from all frontier edges through the trunk. Head work is
  done once per task, trunk work once for all tasks (vectorised by vmap).
  A shared ``x @ W.T (+ b)`` (``nn.Linear``, ``F.linear``) whose weight feeds nothing
  else is kept *factored* where that is cheaper (rows ``N`` fewer than about the input
  width): the trunk backward stops at the layer's output and yields the per-task output
  gradients ``delta_i`` (K x N x out); with the saved input ``X`` (N x in) its Gram
  contribution is ``<delta_i, (X X^T) delta_j>`` and its update
  ``(sum_i c_i delta_i)^T X``, so no K x P weight-gradient buffer is built. Exact, but it
  needs no element-wise per-task access, so not with per-task preconditioning.
- ``lean``: the frontier path with *every* such linear layer factored (least memory).
- ``native``: the frontier's head pass, then the shared graph walked node by node with
  each node's own backward kernel per task (:mod:`._native`): convolutions and pooling
  without vmap (whose convolution and max-pool rules fall back to a per-sample loop
  and a ``cat``), factored linear layers in one product, ReLU + max-pool fused, tasks
  in chunks of bounded memory.
- ``batched``: one batched backward over the stacked losses (K x head work).
- ``looped``: K ordinary backward passes (works wherever autograd works).

All paths give the same Jacobian up to float rounding (their summation orders differ).
Representation mode differentiates the losses with respect to a feature tensor instead
(see :mod:`._representation`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from . import _native
from ._factors import GramFactor, LinearFactor
from ._gradients import TaskGradients
from ._graph import LossGraph, Node, popcount
from ._host import host_stage
from ._native import chunks, part_size, stash, trunk_backward
from ._native import defers as native_defers

MODES = ("lean", "frontier", "native", "batched", "looped")


def _empty(shared: Sequence[Tensor], tasks: Sequence[Sequence[Tensor]]) -> TaskGradients:
    return TaskGradients.empty(len(shared), [len(t) for t in tasks])


Edge = Tuple[Node, int]


def _useful_nodes(graph: LossGraph, shared_index: Dict[int, int]) -> Dict[Node, bool]:
    """Shared nodes (reached by >= 2 losses) and whether they lead to a shared parameter."""
    useful: Dict[Node, bool] = {}
    for node in reversed(graph.order):
        if popcount(graph.mask[node]) < 2:
            continue
        variable = getattr(node, "variable", None)
        hit = variable is not None and id(variable) in shared_index
        if not hit:
            hit = any(c is not None and useful.get(c, False) for c, _ in graph.children[node])
        useful[node] = hit
    return useful


def _head_backward(
    i: int,
    loss: Tensor,
    graph: LossGraph,
    private: Sequence[Node],
    useful: Dict[Node, bool],
    own: Sequence[Tensor],
    own_shared: Sequence[Tensor],
) -> Tuple[Dict[Edge, List[Tensor]], Tuple[Optional[Tensor], ...], Tuple[Optional[Tensor], ...]]:
    """Backpropagate loss ``i`` through its own head once.

    Returns the gradients arriving on the frontier edges (captured with node hooks, so
    only the head's own contribution), the gradients of the task's own parameters and
    those of shared parameters only this loss reaches.
    """
    captured: Dict[Edge, List[Tensor]] = {}
    handles = []
    edges: List[Edge] = []
    if popcount(graph.mask[graph.roots[i]]) >= 2:
        # the loss itself is an intermediate of another task's loss
        captured[(graph.roots[i], 0)] = [torch.ones_like(loss)]
    for node in private:
        slots = [
            (pos, (child, nr))
            for pos, (child, nr) in enumerate(graph.children[node])
            if child is not None and useful.get(child, False)
        ]
        if not slots:
            continue
        for _, edge in slots:
            if edge not in edges:
                edges.append(edge)
        handles.append(node.register_hook(_capture(slots, captured)))
    inputs = [GradientEdge(c, nr) for c, nr in edges] + list(own) + list(own_shared)
    try:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True) if inputs else ()
    finally:
        for handle in handles:
            handle.remove()
    n = len(edges)
    return captured, tuple(grads[n : n + len(own)]), tuple(grads[n + len(own) :])


def _frontier(
    losses: Sequence[Tensor],
    graph: LossGraph,
    shared: Sequence[Tensor],
    tasks: Sequence[Sequence[Tensor]],
    keep: bool,
    factor: str = "never",
    native: bool = False,
    defer: bool = False,
    above: Optional[int] = None,
) -> TaskGradients:
    k = len(losses)
    out = _empty(shared, tasks)
    shared_index = {id(p): n for n, p in enumerate(shared)}
    useful = _useful_nodes(graph, shared_index)
    private: List[List[Node]] = [[] for _ in range(k)]
    for node in graph.order:
        m = graph.mask[node]
        if popcount(m) == 1:
            private[m.bit_length() - 1].append(node)

    linear = _linear_nodes(graph, shared_index, k, factor) if native and factor != "never" else []
    grams: Optional[Dict[int, Tensor]] = (
        {} if native and defer and _gram_only(graph, useful, linear, k, above) else None
    )
    # seeds[(node, input_nr)] = per-task gradient arriving on that frontier edge; when the
    # walk keeps only Grams, copied into parts of tasks as they come (see _native.stash)
    seeds: Dict[Edge, List[Optional[Tensor]]] = {}
    slabs: Dict[Edge, Dict[int, Tensor]] = {}
    size = part_size(_walked(graph, useful)) if grams is not None else None
    for i, loss in enumerate(losses):
        own = _reached(graph, tasks[i], 1 << i)
        own_shared = [p for p in shared if graph.reached_by(p) == 1 << i]
        captured, own_grads, shared_grads = _head_backward(
            i, loss, graph, private[i], useful, own, own_shared
        )
        own_map = {id(p): g for p, g in zip(own, own_grads)}
        out.tasks[i] = [own_map.get(id(p)) for p in tasks[i]]
        for p, g in zip(own_shared, shared_grads):
            if g is not None:
                out.shared[shared_index[id(p)]] = _row(g, i, k)
        for edge, parts in captured.items():
            total = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            stash(seeds, slabs, edge, i, total, k, size)
        del captured
    del slabs
    if native:
        held = trunk_backward(seeds, graph, shared, shared_index, useful, linear, out, k, grams)
        if grams is not None:
            dtype = shared[min(grams)].dtype if grams else torch.float32
            out.factors.append(GramFactor(grams, _solver(losses, shared, sorted(grams), keep), None, dtype))
    else:
        held = _trunk_backward(seeds, graph, shared, shared_index, out, keep, factor, k)
    for n, p in enumerate(shared):
        if out.shared[n] is None and graph.reached_by(p) and n not in held:
            out.shared[n] = torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device)
    return out


def _trunk_backward(
    seeds: Dict[Edge, List[Optional[Tensor]]],
    graph: LossGraph,
    shared: Sequence[Tensor],
    shared_index: Dict[int, int],
    out: TaskGradients,
    keep: bool,
    factor: str,
    k: int,
) -> Set[int]:
    """One batched backward from the frontier edges through the trunk, into ``out``.

    Returns the positions of the shared parameters held by factored linear layers.
    """
    # Edges into a shared parameter's AccumulateGrad: the seed is that parameter's row.
    outputs: List[GradientEdge] = []
    grad_outputs: List[Tensor] = []
    for (node, nr), per_task in seeds.items():
        like = next(g for g in per_task if g is not None)
        stacked = torch.stack([g if g is not None else torch.zeros_like(like) for g in per_task])
        variable = getattr(node, "variable", None)
        if variable is not None:
            n = shared_index[id(variable)]
            prev = out.shared[n]
            out.shared[n] = stacked if prev is None else prev + stacked
            continue
        outputs.append(GradientEdge(node, nr))
        grad_outputs.append(stacked)
    trunk = [p for p in shared if popcount(graph.reached_by(p)) >= 2]
    linear = _linear_nodes(graph, shared_index, k, factor) if factor != "never" else []
    held = {n for node in linear for n in node[1:3] if n is not None}
    trunk = [p for p in trunk if shared_index[id(p)] not in held]
    if not outputs or not (trunk or linear):
        return held
    inputs: List[Union[Tensor, GradientEdge]] = [GradientEdge(node[0], 0) for node in linear]
    inputs += trunk
    grads = _batched_grad(outputs, inputs, grad_outputs, keep, task_chunks(graph, k))
    for (_node, w, b, x), delta in zip(linear, grads[: len(linear)]):
        if delta is None:
            delta = torch.zeros((k, x.shape[0], shared[w].shape[0]), dtype=x.dtype, device=x.device)
        out.factors.append(LinearFactor(w, b, x, delta))
    for p, g in zip(trunk, grads[len(linear) :]):
        if g is None:
            continue
        n = shared_index[id(p)]
        prev = out.shared[n]
        out.shared[n] = g if prev is None else prev + g
    return held


def _solver(
    losses: Sequence[Tensor], shared: Sequence[Tensor], positions: Sequence[int], keep: bool
) -> Callable[[Tensor], Dict[int, Tensor]]:
    """The update of the shared ``positions`` for coefficients ``c``: one backward of
    ``sum_i c_i L_i`` (the graph freed by it unless ``keep``)."""

    def solve(coefs: Tensor) -> Dict[int, Tensor]:
        params = [shared[p] for p in positions]
        with host_stage():  # the coefficients come from the host stage
            listed = coefs.tolist()
        with torch.enable_grad():
            terms = [loss * c for loss, c in zip(losses, listed) if c != 0.0 and loss.requires_grad]
            grads = (
                torch.autograd.grad(sum(terms), params, retain_graph=keep, allow_unused=True) if terms else ()
            )
        got = dict(zip(positions, grads))
        return {p: torch.zeros_like(shared[p]) if got.get(p) is None else got[p] for p in positions}

    return solve


def defers(graph: LossGraph, shared: Sequence[Tensor], k: int, above: Optional[int] = None) -> bool:
    """Whether the ``native`` path, allowed to, keeps only its factored layers' Gram
    (:func:`._native.defers`, ``above`` its threshold): it then holds far less than the
    paths that keep their deltas."""
    shared_index = {id(p): n for n, p in enumerate(shared)}
    linear = _linear_nodes(graph, shared_index, k, "cheaper")
    return _gram_only(graph, _useful_nodes(graph, shared_index), linear, k, above)


def _gram_only(
    graph: LossGraph,
    useful: Dict[Node, bool],
    linear: Sequence[_native.Linear],
    k: int,
    above: Optional[int] = None,
) -> bool:
    return bool(linear) and native_defers(_walked(graph, useful), linear, k, above)


def _walked(graph: LossGraph, useful: Dict[Node, bool]) -> List[Node]:
    """The nodes the native walk visits, in order (as :func:`._native.trunk_backward`)."""
    return [n for n in graph.order if useful.get(n, False)]


def task_chunks(graph: LossGraph, k: int) -> List[Tuple[int, int]]:
    """Task ranges whose batched backward holds at most :data:`._native.VMAP_CHUNK_BYTES` per activation."""
    return chunks([n for n in graph.order if popcount(graph.mask[n]) >= 2], k, _native.VMAP_CHUNK_BYTES)


def _batched_grad(
    outputs: Sequence[Union[Tensor, GradientEdge]],
    inputs: Sequence[Union[Tensor, GradientEdge]],
    grad_outputs: Sequence[Tensor],
    keep: bool,
    ranges: Sequence[Tuple[int, int]],
) -> Tuple[Optional[Tensor], ...]:
    """``autograd.grad(..., is_grads_batched=True)`` over the tasks in ``ranges``, concatenated.

    vmap holds every task's copy of each activation gradient at once: chunking the
    tasks bounds that memory as K grows (one chunk when it fits).
    """
    k = ranges[-1][1]
    out: List[Optional[Tensor]] = [None] * len(inputs)
    for a, b in ranges:
        retain = keep or b < k
        got = torch.autograd.grad(
            outputs,
            inputs,
            [g[a:b] for g in grad_outputs],
            retain_graph=retain,
            allow_unused=True,
            is_grads_batched=True,
        )
        if len(ranges) == 1:
            return got
        for n, g in enumerate(got):  # written into one buffer: no second copy of the results
            if g is None:
                continue
            if out[n] is None:
                out[n] = g.new_zeros((k, *g.shape[1:]))
            out[n][a:b] = g  # type: ignore[index]
        del got
    return tuple(out)


def _linear_nodes(
    graph: LossGraph, shared_index: Dict[int, int], k: int, policy: str
) -> List[Tuple[Node, int, Optional[int], Tensor]]:
    """Shared ``addmm(b, X, W.t())`` / ``mm(X, W.t())`` nodes whose ``W`` (and ``b``) feed nothing else.

    Returns ``(node, weight position, bias position or None, X)``. With policy
    ``"cheaper"`` a layer is kept factored only when that costs fewer multiply-adds
    than forming its weight Jacobian (``N <~ in``).
    """
    found = []
    for node in graph.order:
        name = type(node).__name__
        if name not in ("AddmmBackward0", "MmBackward0") or popcount(graph.mask[node]) < 2:
            continue
        nexts = graph.children[node]
        try:
            if name == "AddmmBackward0":
                if node._saved_alpha != 1 or node._saved_beta != 1:
                    continue
                x = node._saved_mat1
                bias_node, t_edge = nexts[0][0], nexts[2][0]
            else:
                x = node._saved_self
                bias_node, t_edge = None, nexts[1][0]
        except (AttributeError, RuntimeError, IndexError):
            continue
        if t_edge is None or type(t_edge).__name__ != "TBackward0" or graph.parents.get(t_edge) != 1:
            continue
        leaf = t_edge.next_functions[0][0]
        weight = getattr(leaf, "variable", None)
        if weight is None or id(weight) not in shared_index or graph.parents.get(leaf) != 1:
            continue
        if x is None or x.dim() != 2 or weight.dim() != 2:
            continue
        bias_pos: Optional[int] = None
        if bias_node is not None:
            bias = getattr(bias_node, "variable", None)
            if (
                bias is None
                or id(bias) not in shared_index
                or graph.parents.get(bias_node) != 1
                or tuple(bias.shape) != (weight.shape[0],)
            ):
                continue
            bias_pos = shared_index[id(bias)]
        n_rows, (n_out, n_in) = x.shape[0], weight.shape
        if policy == "cheaper":
            factored = k * n_rows * n_rows * n_out + n_rows * n_rows * n_in
            direct = k * n_rows * n_out * n_in + k * k * n_out * n_in
            if factored >= direct:
                continue
        found.append((node, shared_index[id(weight)], bias_pos, x.detach()))
    return found


def _capture(slots, captured):  # type: ignore[no-untyped-def]
    def hook(grad_inputs, grad_outputs):  # type: ignore[no-untyped-def]
        for pos, edge in slots:
            g = grad_inputs[pos]
            if g is not None:
                captured.setdefault(edge, []).append(g)

    return hook


def _row(grad: Tensor, i: int, k: int) -> Tensor:
    out = torch.zeros((k, *grad.shape), dtype=grad.dtype, device=grad.device)
    out[i] = grad
    return out


def _reached(graph: LossGraph, params: Sequence[Tensor], mask: int) -> List[Tensor]:
    return [p for p in params if graph.reached_by(p) & mask]


def _batched(
    losses: Sequence[Tensor],
    graph: LossGraph,
    shared: Sequence[Tensor],
    tasks: Sequence[Sequence[Tensor]],
    keep: bool,
) -> TaskGradients:
    k = len(losses)
    out = _empty(shared, tasks)
    shared_in = [p for p in shared if graph.reached_by(p)]
    task_in = [_reached(graph, params, 1 << i) for i, params in enumerate(tasks)]
    inputs = shared_in + [p for params in task_in for p in params]
    if not inputs:
        return out
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
    grads = _batched_grad([stacked], inputs, [eye], keep, task_chunks(graph, k))
    index = {id(p): n for n, p in enumerate(shared)}
    for p, g in zip(shared_in, grads):
        out.shared[index[id(p)]] = (
            g if g is not None else torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device)
        )
    rest = iter(grads[len(shared_in) :])
    for i, params in enumerate(task_in):
        got = {id(p): next(rest) for p in params}
        out.tasks[i] = [None if got.get(id(p)) is None else got[id(p)][i] for p in tasks[i]]
    return out


def _looped(
    losses: Sequence[Tensor],
    graph: LossGraph,
    shared: Sequence[Tensor],
    tasks: Sequence[Sequence[Tensor]],
    keep: bool,
) -> TaskGradients:
    k = len(losses)
    out = _empty(shared, tasks)
    reached = [(n, p) for n, p in enumerate(shared) if graph.reached_by(p)]
    rows: Dict[int, List[Optional[Tensor]]] = {n: [None] * k for n, _ in reached}
    for i, loss in enumerate(losses):
        bit = 1 << i
        shared_in = [(n, p) for n, p in reached if graph.reached_by(p) & bit]
        own = _reached(graph, tasks[i], bit)
        inputs = [p for _, p in shared_in] + own
        if not inputs:
            continue
        retain = keep or i < k - 1
        grads = torch.autograd.grad(loss, inputs, retain_graph=retain, allow_unused=True)
        for (n, _), g in zip(shared_in, grads):
            rows[n][i] = g
        got = {id(p): g for p, g in zip(own, grads[len(shared_in) :])}
        out.tasks[i] = [got.get(id(p)) for p in tasks[i]]
    for n, p in reached:  # one stack per parameter (zeros for the tasks that do not reach it)
        per_task = rows[n]
        if any(g is None for g in per_task):
            zero = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            per_task = [zero if g is None else g for g in per_task]
        out.shared[n] = torch.stack(per_task)  # type: ignore[arg-type]
    return out


_PATHS = {"frontier": _frontier, "batched": _batched, "looped": _looped}


def run_path(
    mode: str,
    losses: Sequence[Tensor],
    graph: LossGraph,
    shared: Sequence[Tensor],
    tasks: Sequence[Sequence[Tensor]],
    keep: bool,
    factored: bool = True,
    defer: bool = False,
    above: Optional[int] = None,
) -> TaskGradients:
    """The per-task gradients by path ``mode`` (one of :data:`MODES`); ``keep`` retains the graph.

    ``lean`` factors every shared linear layer; ``frontier`` and ``native`` only where
    that is cheaper, and none when ``factored`` is False. ``defer``: the caller combines
    every shared parameter with one set of coefficients, once, so ``native`` may keep
    only its factored layers' Gram (:class:`~._factors.GramFactor`, :func:`defers`,
    ``above`` the threshold of that choice).
    """
    if mode in ("lean", "frontier", "native"):
        policy = "always" if mode == "lean" else ("cheaper" if factored else "never")
        native = mode == "native"
        return _frontier(
            losses, graph, shared, tasks, keep, policy, native, defer and native and factored, above
        )
    return _PATHS[mode](losses, graph, shared, tasks, keep)
