"""Walking the autograd graph of the task losses.

One pass collects every node reachable from the losses, orders them topologically
(parents before children) and propagates, per node, the bit mask of the losses that
reach it. A parameter reached by two or more losses is shared; by exactly one, that
task's. Sharing is never inferred from which parameters happen to have a ``.grad``.

Losses held in one tensor (``torch.stack``, ``torch.cat``, ``t[i] = loss`` into a
preallocated tensor, then indexed or unbound) reach every head through that tensor.
The walk sees through such pure data movement: from each loss it calls the
data-movement nodes on a one-hot gradient and follows only the inputs that receive
it, so each loss's bit goes only to the loss that feeds its element. Where that
cannot be told (the element is computed from several losses), it raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

Node = Any  # torch.autograd.graph.Node (C++ nodes have no common Python base class)


@dataclass
class LossGraph:
    """Reachability facts about one step's losses.

    Attributes:
        roots: ``grad_fn`` of every loss, in task order.
        mask: bit mask of the losses reaching each node.
        children: the ``next_functions`` of each node (``(node or None, input_nr)``).
        param_mask: bit mask of the losses reaching each leaf tensor, keyed by ``id``.
        leaves: the ``AccumulateGrad`` node of each reached leaf, keyed by ``id``.
        parents: how many edges point at each node.
        opaque: the graph passes through a compiled region (``torch.compile``), one node
            whose internals are hidden: reachability through it over-approximates.
    """

    roots: List[Node]
    mask: Dict[Node, int]
    children: Dict[Node, Tuple[Tuple[Node, int], ...]]
    order: List[Node]
    param_mask: Dict[int, int] = field(default_factory=dict)
    leaves: Dict[int, Node] = field(default_factory=dict)
    parents: Dict[Node, int] = field(default_factory=dict)
    opaque: bool = False
    routes: Dict[Node, Dict[int, Set[int]]] = field(default_factory=dict)
    ambiguous: Optional[str] = None

    def reached_by(self, param: Tensor) -> int:
        """Bit mask of the losses whose graph reaches ``param`` (0 if none)."""
        return self.param_mask.get(id(param), 0)

    def passes_through(self, tensor: Tensor) -> int:
        """Bit mask of the losses computed from ``tensor`` (an intermediate or a leaf)."""
        if tensor.grad_fn is None:
            return self.reached_by(tensor)
        return self.mask.get(tensor.grad_fn, 0)


#: Autograd nodes that only move or copy data: an element of their output comes from
#: identifiable elements of their inputs, found by calling the node on a one-hot gradient.
DATA_MOVEMENT = frozenset(
    {
        "StackBackward0",
        "CatBackward0",
        "UnbindBackward0",
        "SelectBackward0",
        "IndexBackward0",
        "SliceBackward0",
        "AsStridedBackward0",
        "CopySlices",
        "CloneBackward0",
        "ViewBackward0",
        "ReshapeAliasBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "ToCopyBackward0",
        "AliasBackward0",
    }
)


def _moves(node: Node) -> bool:
    return node is not None and type(node).__name__ in DATA_MOVEMENT


def _route(losses: Sequence[Tensor]) -> Tuple[Dict[Node, Dict[int, Set[int]]], Optional[str]]:
    """For losses that start with data movement: which inputs of each such node carry them.

    Returns ``routes[node][i]`` (the ``next_functions`` positions of ``node`` that loss
    ``i``'s element flows through) and, when two losses' elements come out of the same
    computation (so which loss feeds which head cannot be told from the graph), a
    message saying so; the automatic partition then refuses to guess.
    """
    routes: Dict[Node, Dict[int, Set[int]]] = {}
    entries: Dict[Node, int] = {}
    ambiguous: Optional[str] = None
    for i, loss in enumerate(losses):
        root = loss.grad_fn
        if not _moves(root):
            continue
        pending: List[Tuple[Node, Tuple[Tensor, ...]]] = [
            (root, _one_hot_outputs(root, loss.output_nr, None))
        ]
        while pending:
            node, grads = pending.pop()
            with torch.no_grad():
                out = node(*grads)
            ins = out if isinstance(out, tuple) else (out,)
            for pos, ((child, nr), g) in enumerate(zip(node.next_functions, ins)):
                if child is None or g is None or not bool((g != 0).any()):
                    continue
                routes.setdefault(node, {}).setdefault(i, set()).add(pos)
                if _moves(child):
                    pending.append((child, _one_hot_outputs(child, nr, g)))
                elif entries.setdefault(child, i) != i and ambiguous is None:
                    ambiguous = (
                        f"losses {entries[child]} and {i} are elements of one tensor computed from the same "
                        "values, so which loss trains which head cannot be told: pass separate losses "
                        "(a list or a mapping of scalars), or partition explicitly with shared= and tasks="
                    )
    return routes, ambiguous


def _one_hot_outputs(node: Node, output_nr: int, grad: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """Gradients for every output of ``node``: ``grad`` (or ones) on ``output_nr``, zeros elsewhere."""
    out = []
    for n, meta in enumerate(node._input_metadata):
        if n == output_nr:
            out.append(torch.ones(meta.shape, dtype=meta.dtype, device=meta.device) if grad is None else grad)
        else:
            out.append(torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device))
    return tuple(out)


def analyse(losses: Sequence[Tensor]) -> LossGraph:
    """Walk the graphs of ``losses`` once and return reachability masks."""
    routes, ambiguous = _route(losses)
    roots = [loss.grad_fn for loss in losses]
    children: Dict[Node, Tuple[Tuple[Node, int], ...]] = {}
    postorder: List[Node] = []
    for root in roots:
        if root is None or root in children:
            continue
        children[root] = tuple(root.next_functions)
        stack: List[Tuple[Node, Iterator[Tuple[Node, int]]]] = [(root, iter(children[root]))]
        while stack:
            node, edges = stack[-1]
            for child, _ in edges:  # the next unvisited child, if any
                if child is not None and child not in children:
                    children[child] = tuple(child.next_functions)
                    stack.append((child, iter(children[child])))
                    break
            else:  # every child visited: the node is finished
                stack.pop()
                postorder.append(node)
    order = postorder[::-1]
    mask: Dict[Node, int] = dict.fromkeys(order, 0)
    for i, root in enumerate(roots):
        if root is not None:
            mask[root] |= 1 << i
    param_mask: Dict[int, int] = {}
    leaves: Dict[int, Node] = {}
    parents: Dict[Node, int] = dict.fromkeys(order, 0)
    for node in order:
        m = mask[node]
        routed = routes.get(node)
        free = m & ~sum(1 << i for i in routed) if routed else m  # unrouted bits flow to every input
        for pos, (child, _) in enumerate(children[node]):
            if child is not None:
                mask[child] |= (
                    free | sum(1 << i for i, where in routed.items() if pos in where) if routed else free
                )
                parents[child] += 1
        variable = getattr(node, "variable", None)
        if variable is not None:
            param_mask[id(variable)] = m
            leaves[id(variable)] = node
    opaque = any("CompiledFunction" in type(node).__name__ for node in order)
    return LossGraph(roots, mask, children, order, param_mask, leaves, parents, opaque, routes, ambiguous)


def popcount(mask: int) -> int:
    return bin(mask).count("1")
