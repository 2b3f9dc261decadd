"""Helpers shared by the multi-process tests (DDP and FSDP2)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

Labelled = Callable[[Dict[str, Any], int, int, int], int]


def tasks_on_one_rank(
    cfg: Dict[str, Any], labelled: Labelled, steps: int, world: int
) -> List[Tuple[int, int]]:
    """``(step, task)`` pairs where exactly one rank has rows of the task."""
    return [
        (step, i)
        for step in range(steps)
        for i in range(cfg["k"])
        if sum(labelled(cfg, step, i, r) > 0 for r in range(world)) == 1
    ]
