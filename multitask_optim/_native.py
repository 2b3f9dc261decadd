"""The trunk's per-task backward on native kernels: node by node, tasks in chunks, no vmap.

``torch.autograd.grad(..., is_grads_batched=True)`` vectorises a backward with vmap. For
matrix products and element-wise operations vmap has batching rules, but for
convolution and max-pool backward it falls back to a per-sample loop followed by a
``cat`` of the K results (torch 2.13): on a convolutional trunk the batched path then
costs more than K plain backward passes. This module walks the shared part of the
graph itself, in topological order, and calls each node's own backward function
(``node(*grads)``: the native kernel, with the engine's output mask) once per task, so
a shared ``Conv1d``/``Conv2d``/``Conv3d`` (any stride, padding, dilation, groups,
transposed) produces each task's exact weight gradient and, only where a shared
parameter lies below it, its input gradient, with the same kernels a plain backward
uses. What batches is batched:

- a shared linear layer ``x W^T (+ b)`` kept factored (:class:`~._factors.LinearFactor`)
  takes the K output gradients at once: the input gradient is one ``(K, N, out) @ W``
  product and the weight is never differentiated per task;
- ``ReLU`` followed by max-pooling (``MaxPool2d(ReLU(h))``, the usual conv block) is
  fused: the ReLU mask is applied to the *pooled* gradient (``pool(relu(h)) =
  relu(pool(h))`` and the pool routes every output to its arg-max), a quarter of the
  elements for a 2x2 pool, and the full-size ReLU backward is skipped. Exact: the
  gradient is multiplied by the same 0/1 values at the same positions.

Tasks run in chunks so that at most ``CHUNK_BYTES`` of per-task activation gradients
are alive at once (many tasks: memory stays bounded as K grows). The factored layers'
output gradients (K x N x out each) are then held until the update; when they would
hold more than :data:`DEFER_ABOVE` (and more than one activation gradient of every
task), and the caller allows it, the walk goes node by node with every task at once
instead, forms each factored layer's Gram contribution as soon as its K output
gradients are complete and drops them (:class:`~._factors.GramFactor`: the update is
then one backward of the combined loss). Nothing here differentiates twice or frees
the graph (the graph stays usable for another path).
Tensor hooks registered on intermediate tensors are not run (the engine runs them);
:class:`~._engine.GradientEngine` compares every measured path's Gram with the
others' and drops a path that disagrees.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from ._factors import LinearFactor
from ._gradients import TaskGradients
from ._gram import scaled_factor_gram
from ._graph import LossGraph, Node

#: Per-task activation gradients alive at once (bytes); tasks are processed in chunks.
CHUNK_BYTES = 16 * 2**20
#: The same for the vmapped paths (their results are copied chunk by chunk into one
#: buffer). Measured at K = 40 on the MLP (peak extra RSS of ``lean``, fresh process,
#: same harness): one chunk 278 MB, two 309 MB, eight (16 MiB) 246 MB, forty 238 MB;
#: on the 3x32x32 CNN at K = 40 the default step peaks at 273 MB (TorchJD: 2084 MB).
#: Chunking costs a backward call per chunk and a copy (about 12% of the MLP step at
#: K = 8 with 16 MiB chunks), so it starts only where one activation's K copies pass
#: 128 MiB: memory stays bounded as K grows, ordinary steps run in one call.
VMAP_CHUNK_BYTES = 128 * 2**20

#: Bytes of factored output gradients above which the walk keeps only their Gram (when
#: allowed). On the benchmark MLP at K = 40 (three 1024-wide layers, batch 256: 126 MB of
#: output gradients) the step's peak extra RSS went from 242-283 MB to 177-210 MB, at
#: the same speed (the extra backward is about 5% of the step, the walk on parts of tasks
#: saves as much). At K = 16 (50 MB) the memory is not worth the extra backward.
DEFER_ABOVE = 64 * 2**20

#: The node-by-node walk stacks a factored layer's output gradients this many bytes at a time.
GRAM_PART_BYTES = 16 * 2**20

Edge = Tuple[Node, int]
PerTask = List[Optional[Tensor]]
Linear = Tuple[Node, int, Optional[int], Tensor]


def trunk_backward(
    seeds: Dict[Edge, List[Optional[Tensor]]],
    graph: LossGraph,
    shared: Sequence[Tensor],
    shared_index: Dict[int, int],
    useful: Dict[Node, bool],
    linear: Sequence[Linear],
    out: TaskGradients,
    k: int,
    grams: Optional[Dict[int, Tensor]] = None,
) -> Set[int]:
    """Per-task gradients from the frontier ``seeds`` down to the shared parameters, into ``out``.

    Args:
        seeds: per frontier edge, the K per-task gradients arriving on it (None: zero);
            emptied chunk by chunk as they are consumed.
        graph: the step's loss graph.
        shared: the shared parameters; ``shared_index`` maps ``id`` to position.
        useful: shared nodes, and whether a shared parameter lies below them.
        linear: the linear layers to keep factored (``(node, weight pos, bias pos, X)``).
        out: receives the ``(K, *shape)`` rows and the factors.
        k: number of tasks.
        grams: None, or a dict that receives each factored layer's weight and bias Gram
            contributions (float64 ``(K, K)`` by position) instead of factors in ``out``:
            the walk then goes node by node with every task at once (see :func:`defers`).

    Returns:
        The positions of the shared parameters held by factors.
    """
    factored = {node: (w, b, x) for node, w, b, x in linear}
    held = {n for _, w, b, _ in linear for n in (w, b) if n is not None}
    order = [n for n in graph.order if useful.get(n, False)]
    rows: Dict[int, Tensor] = {}
    deltas: Dict[Node, Tensor] = {}  # per factored layer, (K, N, out), filled chunk by chunk
    fused = _fusable_pools(order, graph, useful)
    masks: Dict[Node, Tensor] = {}  # per fused pool, computed once for every chunk
    if grams is not None:  # the node-by-node walk: tasks in parts of ``size``
        size = part_size(order)
        # seeded nodes no shared node feeds: their parts are the walk's own (stash), safe to overwrite
        fed = {c for n in order for c, _ in n.next_functions if c is not None}
        own_seeds = {node for node, _ in seeds if node not in fed}
    with torch.no_grad():
        for start, stop in chunks(order, k) if grams is None else [(0, k)]:
            buffers: Dict[Node, List[Optional[PerTask]]] = {}
            for (node, nr), per_task in seeds.items():
                part = per_task[start:stop]
                per_task[start:stop] = [None] * (stop - start)  # consumed: freed with this chunk
                variable = getattr(node, "variable", None)
                if variable is not None:
                    _write_rows(rows, shared_index[id(variable)], variable, part, start, k)
                else:
                    _add(buffers, node, nr, part)
                del part  # the buffers hold the seeds now: each is freed once its node used it
            for node in order:
                slots = buffers.pop(node, None)
                if slots is None:
                    continue
                variable = getattr(node, "variable", None)
                if variable is not None:
                    if id(variable) in shared_index and slots[0] is not None:
                        _write_rows(rows, shared_index[id(variable)], variable, slots[0], start, k)
                    continue
                if node in factored and grams is not None:
                    _linear_gram(node, factored[node], slots, shared, grams, buffers, useful, size, graph)
                elif grams is not None and type(node).__name__ == "ReluBackward0":
                    _relu_parts(node, slots, buffers, useful, size, node in own_seeds)
                elif node in factored:
                    _linear(node, factored[node], slots, shared, deltas, buffers, useful, start, k)
                elif node in fused:
                    _relu_pool(node, fused[node], slots, buffers, useful, masks)
                else:
                    _generic(node, slots, buffers, useful, stop - start)
    for pos, r in rows.items():
        prev = out.shared[pos]
        out.shared[pos] = r if prev is None else prev + r
    _factors_out(factored, deltas, grams, shared, out, k)
    return held


def _factors_out(factored, deltas, grams, shared, out: TaskGradients, k: int) -> None:  # type: ignore[no-untyped-def]
    """Every factored layer's result: a zero Gram for a layer no task reached (Gram-only
    walk), or its :class:`~._factors.LinearFactor` (zero deltas where none arrived)."""
    for node, (w, b, x) in factored.items():
        if grams is not None:
            for pos in (w, b):
                if pos is not None and pos not in grams:
                    grams[pos] = torch.zeros((k, k), dtype=torch.float64, device=x.device)
            continue
        delta = deltas.get(node)
        if delta is None:
            delta = x.new_zeros((k, x.shape[0], shared[w].shape[0]))
        out.factors.append(LinearFactor(w, b, x, delta))


def part_size(order: Sequence[Node]) -> int:
    """Tasks per part in the node-by-node walk: :data:`GRAM_PART_BYTES` of the largest activation gradient."""
    return max(1, GRAM_PART_BYTES // _largest(order))


def stash(
    seeds: Dict[Edge, List[Optional[Tensor]]],
    slabs: Dict[Edge, Dict[int, Tensor]],
    edge: Edge,
    i: int,
    grad: Tensor,
    k: int,
    size: Optional[int],
) -> None:
    """Keep task ``i``'s gradient arriving on frontier ``edge``. With ``size`` (the node-by-node
    walk) it is copied into the part of ``size`` tasks it belongs to and passed on as a
    row of it: one allocation per part, which the walk then uses as it is (:func:`_part`)."""
    per_task = seeds.setdefault(edge, [None] * k)
    if size is None:
        per_task[i] = grad
        return
    first = i - i % size
    parts = slabs.setdefault(edge, {})
    part = parts.get(first)
    if part is None:
        part = parts[first] = grad.new_zeros((min(size, k - first), *grad.shape))
    row = part[i - first]
    row.copy_(grad)
    per_task[i] = row


def defers(order: Sequence[Node], linear: Sequence[Linear], k: int, above: Optional[int] = None) -> bool:
    """Whether the walk should keep only the factored layers' Gram (:func:`trunk_backward`'s
    ``grams``): their K output gradients would hold more than ``above`` bytes (default
    :data:`DEFER_ABOVE`; 0 when the update's backward is the caller's anyway, as in
    weights-only mode), and more than the node-by-node walk holds (every task's gradient
    of the largest activation)."""
    held = 0
    for node, _, _, _ in linear:
        meta = node._input_metadata[0]  # the layer's output gradient, (N, out)
        held += k * _bytes(meta)
    limit = DEFER_ABOVE if above is None else above
    return held > limit and k * _largest(order) < held


def _bytes(meta) -> int:  # type: ignore[no-untyped-def]
    numel = 1
    for s in meta.shape:
        numel *= int(s)
    return numel * meta.dtype.itemsize if meta.dtype.is_floating_point else numel


def _largest(order: Sequence[Node]) -> int:
    """Bytes of the largest activation gradient of one task in ``order``."""
    largest = 1
    for node in order:
        if getattr(node, "variable", None) is not None or _to_parameters(node):
            continue  # a parameter's gradient (or its transpose), not an activation's
        for meta in getattr(node, "_input_metadata", ()):
            largest = max(largest, _bytes(meta))
    return largest


def chunks(order: Sequence[Node], k: int, budget: Optional[int] = None) -> List[Tuple[int, int]]:
    """Balanced task chunks holding at most ``budget`` (default :data:`CHUNK_BYTES`) of the
    largest activation gradient each."""
    budget = CHUNK_BYTES if budget is None else budget
    # a node holds its incoming gradients and produces its outgoing ones: about 3 at once
    size = max(1, min(k, budget // (3 * _largest(order))))
    count = -(-k // size)
    bounds = [round(i * k / count) for i in range(count + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _to_parameters(node: Node) -> bool:
    """Whether every input of ``node`` is a parameter (e.g. the ``W.t()`` of a linear layer)."""
    children = [c for c, _ in node.next_functions if c is not None]
    return bool(children) and all(getattr(c, "variable", None) is not None for c in children)


def _add(buffers: Dict[Node, List[Optional[PerTask]]], node: Node, nr: int, grads: PerTask) -> None:
    """Accumulate per-task gradients arriving on output ``nr`` of ``node`` (as the engine's input buffer)."""
    slots = buffers.get(node)
    if slots is None:
        slots = [None] * max(len(getattr(node, "_input_metadata", ())), nr + 1)
        buffers[node] = slots
    prev = slots[nr]
    if prev is None:
        slots[nr] = list(grads)
    else:
        slots[nr] = [a if b is None else (b if a is None else a + b) for a, b in zip(prev, grads)]


def _route(
    node: Node,
    per_task_results: List[Optional[Sequence[Optional[Tensor]]]],
    buffers,
    useful,  # type: ignore[no-untyped-def]
) -> None:
    """Send each task's gradients for ``node``'s inputs along its useful edges.

    As the engine's ``validate_outputs``: a gradient of a broadcast input is summed to
    the input's shape, and cast to its dtype.
    """
    for pos, (child, nr) in enumerate(node.next_functions):
        if child is None or not useful.get(child, False):
            continue
        grads = [None if r is None else r[pos] for r in per_task_results]
        metadata = getattr(child, "_input_metadata", None)
        if metadata:
            meta = metadata[nr]
            shape = tuple(meta.shape)
            grads = [None if g is None else _conform(g, shape, meta.dtype) for g in grads]
        if any(g is not None for g in grads):
            _add(buffers, child, nr, grads)


def _conform(grad: Tensor, shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if tuple(grad.shape) != shape:
        grad = grad.sum_to_size(shape)
    return grad if grad.dtype == dtype else grad.to(dtype)


def _generic(node: Node, slots: List[Optional[PerTask]], buffers, useful, size: int) -> None:  # type: ignore[no-untyped-def]
    """Call the node's own backward once per task (the engine's kernel and output mask)."""
    call = node if callable(node) else getattr(node, "apply", None)
    if call is None:
        raise RuntimeError(f"cannot run {type(node).__name__} outside the autograd engine")
    results: List[Optional[Sequence[Optional[Tensor]]]] = []
    for i in range(size):
        grads = [None if s is None else s[i] for s in slots]
        for s in slots:  # consumed: a task's input gradient is freed as soon as it is used
            if s is not None:
                s[i] = None
        if all(g is None for g in grads):
            results.append(None)
            continue
        if not callable(node):  # a Python Function: materialise missing gradients as zeros
            grads = [_zeros_for(node, j) if g is None else g for j, g in enumerate(grads)]
        got = call(*grads)
        results.append(got if isinstance(got, tuple) else (got,))
    _route(node, results, buffers, useful)


def _write_rows(rows: Dict[int, Tensor], pos: int, param: Tensor, grads: PerTask, start: int, k: int) -> None:
    """Add task ``start + i``'s gradient of shared parameter ``pos`` into its ``(K, *shape)`` rows."""
    r = rows.get(pos)
    if r is None:
        r = rows[pos] = torch.zeros((k, *param.shape), dtype=param.dtype, device=param.device)
    for i, g in enumerate(grads):
        if g is not None:
            r[start + i] += g


def _zeros_for(node: Node, j: int) -> Tensor:
    meta = node._input_metadata[j]
    return torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device)


def _input_edge(node: Node) -> Edge:
    """Where a factored ``addmm(b, X, W^T)`` / ``mm(X, W^T)`` node sends ``X``'s gradient."""
    return node.next_functions[1] if type(node).__name__ == "AddmmBackward0" else node.next_functions[0]


def _linear(node: Node, held, slots, shared, deltas, buffers, useful, start: int, k: int) -> None:  # type: ignore[no-untyped-def]
    """A factored linear layer: keep the K output gradients; the input gradient in one product."""
    w, _, x = held
    weight = shared[w]
    per_task = slots[0] or []
    like = next((g for g in per_task if g is not None), None)
    if like is None:
        return
    delta = deltas.get(node)
    if delta is None:
        delta = deltas[node] = like.new_zeros((k, *like.shape))
    chunk = delta[start : start + len(per_task)]
    for i, g in enumerate(per_task):
        if g is not None:
            chunk[i] = g
    child, nr = _input_edge(node)
    if child is None or not useful.get(child, False):
        return
    grad_x = torch.matmul(chunk, weight.to(chunk.dtype))  # (c, N, in): every task's input gradient
    _add(buffers, child, nr, list(grad_x.unbind(0)))


def _part(per_task: PerTask, a: int, b: int) -> Tuple[Optional[Tensor], bool]:
    """Tasks ``a:b`` of ``per_task`` as one ``(b - a, ...)`` tensor (None if all are None), and
    whether it is a fresh copy. When they are the consecutive rows of one tensor (a part
    this walk formed, passed on as views) that tensor is returned, uncopied. The entries
    are cleared: a copied task is freed at once."""
    chunk = per_task[a:b]
    per_task[a:b] = [None] * (b - a)
    like = next((g for g in chunk if g is not None), None)
    if like is None:
        return None, False
    base = like._base
    if (
        base is not None
        and base.dim() == like.dim() + 1
        and base.shape[0] == b - a
        and base.is_contiguous()
        and all(
            g is not None
            and g.shape == base.shape[1:]
            and g.stride() == base.stride()[1:]  # a transposed row of a square part is not a row
            and g.dtype == base.dtype
            and g.data_ptr() == base.data_ptr() + i * base.stride(0) * base.element_size()
            for i, g in enumerate(chunk)
        )
    ):
        return base, False
    return torch.stack([like.new_zeros(like.shape) if g is None else g for g in chunk]), True


def _relu_parts(node: Node, slots, buffers, useful, size: int, own: bool) -> None:  # type: ignore[no-untyped-def]
    """``ReLU`` backward a part of tasks at a time (node-by-node walk): one kernel per part,
    in place when the part is this walk's own (a copy, or ``own``: the seeds' parts). The engine's own kernel
    (``threshold_backward``, broadcast over the part's tasks): exact."""
    result = node._saved_result
    per_task = slots[0] or []
    results: List[Optional[Sequence[Optional[Tensor]]]] = []
    for a in range(0, len(per_task), size):
        b = min(a + size, len(per_task))
        part, fresh = _part(per_task, a, b)
        if part is None:
            results.extend([None] * (b - a))
            continue
        into = {"grad_input": part if fresh or own else torch.empty_like(part)}
        part = torch.ops.aten.threshold_backward.grad_input(part, result, 0, **into)
        results.extend((g,) for g in part.unbind(0))
        del part
    _route(node, results, buffers, useful)


def _linear_gram(node: Node, held, slots, shared, grams, buffers, useful, size: int, graph) -> None:  # type: ignore[no-untyped-def]
    """A factored linear layer with every task's output gradient at hand: its weight's and
    bias' Gram contributions now, from parts of ``size`` tasks (each task freed once
    copied, or the parts taken as they came); each part is dropped once its input
    gradient is formed."""
    w, b, x = held
    per_task = slots[0] or []
    like = next((g for g in per_task if g is not None), None)
    if like is None:
        return
    parts: List[Tensor] = []
    for a in range(0, len(per_task), size):
        part, _ = _part(per_task, a, min(a + size, len(per_task)))
        parts.append(
            like.new_zeros((min(a + size, len(per_task)) - a, *like.shape)) if part is None else part
        )
        del part
    del like
    dtype = torch.promote_types(x.dtype, torch.float32)
    grams[w] = scaled_factor_gram(x, parts, dtype)  # on the device: no host read during the walk
    if b is not None:
        sums = torch.cat([p.sum(dim=1) for p in parts]).to(torch.float64)
        grams[b] = sums @ sums.T
    child, nr = _input_edge(node)
    if child is None or not useful.get(child, False):
        return
    weight = shared[w]
    # a ReLU read by this layer only: its backward is applied in place on the fresh input
    # gradients (the same kernel), which go straight to the ReLU's input
    relu = child if type(child).__name__ == "ReluBackward0" and graph.parents.get(child) == 1 else None
    results: List[Optional[Sequence[Optional[Tensor]]]] = []
    parts.reverse()
    while parts:  # each part is freed as soon as its input gradient exists
        part_ = parts.pop()
        grad = torch.matmul(part_, weight.to(part_.dtype))
        del part_
        if relu is not None:
            torch.ops.aten.threshold_backward.grad_input(grad, relu._saved_result, 0, grad_input=grad)
        results.extend((g,) for g in grad.unbind(0))
        del grad
    if relu is not None:
        _route(relu, results, buffers, useful)
    else:
        _add(buffers, child, nr, [r[0] for r in results])  # type: ignore[index]


def _fusable_pools(order: Sequence[Node], graph: LossGraph, useful: Dict[Node, bool]) -> Dict[Node, Node]:
    """``MaxPool2d`` nodes whose input is a ``ReLU`` output read by nothing else: ``{pool: relu}``."""
    out: Dict[Node, Node] = {}
    for node in order:
        if type(node).__name__ != "MaxPool2DWithIndicesBackward0":
            continue
        child = node.next_functions[0][0]
        if child is None or type(child).__name__ != "ReluBackward0" or graph.parents.get(child) != 1:
            continue
        if not useful.get(child, False):
            continue
        try:
            same = child._saved_result.data_ptr() == node._saved_self.data_ptr()
        except (AttributeError, RuntimeError):
            continue
        if same:
            out[node] = child
    return out


def _relu_pool(pool: Node, relu: Node, slots, buffers, useful, masks) -> None:  # type: ignore[no-untyped-def]
    """``relu_backward(pool_backward(g)) = pool_backward(g * [pooled > 0])`` per task."""
    h = pool._saved_self  # the ReLU's output, the pool's input
    indices = pool._saved_result1
    mask = masks.get(pool)
    if mask is None:  # the pooled ReLU output, read at the arg-max positions
        pooled = h.flatten(-2).gather(-1, indices.flatten(-2)).view_as(indices)
        mask = masks[pool] = pooled > 0
    args = (
        pool._saved_kernel_size,
        pool._saved_stride,
        pool._saved_padding,
        pool._saved_dilation,
        pool._saved_ceil_mode,
    )
    results: List[Optional[Sequence[Optional[Tensor]]]] = []
    incoming = slots[0] or []
    for i, g in enumerate(incoming):
        incoming[i] = None  # consumed
        if g is None:
            results.append(None)
            continue
        masked = torch.where(mask, g, 0.0)  # exactly the ReLU backward's values
        grad = torch.ops.aten.max_pool2d_with_indices_backward(masked, h, *args, indices)
        results.append((grad,))
    _route(relu, results, buffers, useful)
