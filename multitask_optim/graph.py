"""Walking the autograd graph of the task losses.

One pass collects every node reachable from the losses, orders them topologically
(parents before children) and propagates, per node, the bit mask of the losses that
reach it. A parameter reached by two or more losses is shared; by exactly one, that
task's. Sharing is never inferred from which parameters happen to have a ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

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

    def reached_by(self, param: Tensor) -> int:
        """Bit mask of the losses whose graph reaches ``param`` (0 if none)."""
        return self.param_mask.get(id(param), 0)

    def passes_through(self, tensor: Tensor) -> int:
        """Bit mask of the losses computed from ``tensor`` (an intermediate or a leaf)."""
        if tensor.grad_fn is None:
            return self.reached_by(tensor)
        return self.mask.get(tensor.grad_fn, 0)


def analyse(losses: Sequence[Tensor]) -> LossGraph:
    """Walk the graphs of ``losses`` once and return reachability masks."""
    roots = [loss.grad_fn for loss in losses]
    children: Dict[Node, Tuple[Tuple[Node, int], ...]] = {}
    postorder: List[Node] = []
    for root in roots:
        if root is None or root in children:
            continue
        children[root] = tuple(root.next_functions)
        stack: List[Tuple[Node, int]] = [(root, 0)]
        while stack:
            node, pos = stack[-1]
            nexts = children[node]
            while pos < len(nexts) and (nexts[pos][0] is None or nexts[pos][0] in children):
                pos += 1
            if pos == len(nexts):
                stack.pop()
                postorder.append(node)
                continue
            stack[-1] = (node, pos + 1)
            child = nexts[pos][0]
            children[child] = tuple(child.next_functions)
            stack.append((child, 0))
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
        for child, _ in children[node]:
            if child is not None:
                mask[child] |= m
                parents[child] += 1
        variable = getattr(node, "variable", None)
        if variable is not None:
            param_mask[id(variable)] = m
            leaves[id(variable)] = node
    opaque = any("CompiledFunction" in type(node).__name__ for node in order)
    return LossGraph(roots, mask, children, order, param_mask, leaves, parents, opaque)


def popcount(mask: int) -> int:
    return bin(mask).count("1")
