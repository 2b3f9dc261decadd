"""Helpers shared by the multi-process tests (DDP, FSDP2, Accelerate, fresh interpreters)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

Labelled = Callable[[Dict[str, Any], int, int, int], int]

#: How long the worker processes of a multi-process test may run before the test calls
#: them hung: a guard against a deadlock, never a speed check, so generous enough for a
#: 2-core machine busy with other jobs (the workers take seconds alone; 120 s was
#: exceeded beside two CPU-bound processes and a second test run).
HANG_TIMEOUT_S = 900.0


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
