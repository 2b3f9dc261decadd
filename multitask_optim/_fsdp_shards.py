"""Where a rank's shards of the rows sit in the whole rows, for row surgeries under FSDP2.

:class:`RowShards` is the ``ctx.shards`` a row surgery gets from
:class:`~multitask_optim.fsdp.FSDPRows` (see that module's docstring).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .aggregators.base import Shards


class RowShards(Shards):
    """This rank's shards of the rows of every block, for a row surgery (``ctx.shards``).

    Block ``b``'s rows on this rank are, for each parameter of the block in order, its
    local elements (the parameter's ``Shard(dim)`` chunk, flattened): :meth:`positions`
    maps them into the whole flattened block, and :meth:`sum` is one ``all_reduce`` (in
    float64) over the sharding group.
    """

    sharded = True

    def __init__(self, source: Any, blocks: Sequence[Sequence[int]], like: Sequence[Tensor]) -> None:
        self.source = source
        self.params = [[like[pos] for pos in block] for block in blocks]

    def sum(self, partial: Tensor) -> Tensor:
        return self.source.sum(partial)

    def size(self, block: int, rows: Tensor) -> int:
        return sum(p.numel() for p in self.params[block])

    def positions(self, block: int, rows: Tensor) -> Tensor:
        parts, offset = [], 0
        for p in self.params[block]:
            parts.append(self.source.positions(p) + offset)
            offset += p.numel()
        found = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return found.to(rows.device)

    def take(self, block: int, rows: Tensor, whole: Tensor) -> Tensor:
        return whole.index_select(-1, self.positions(block, rows).to(whole.device))
