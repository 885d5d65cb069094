"""An endless, seeded, resumable stream of training blocks, split between processes.

Epoch e visits every block once in the order `randperm(N, seed + e)`. Every process computes the
same global order and takes its own slice of each global micro-batch, so the processes of a
data-parallel run see disjoint blocks and together exactly what a single process would see with a
micro-batch `num_processes` times larger. The position is two integers (epoch, offset): stored in
a checkpoint, it makes a resumed run read exactly the blocks the uninterrupted run would have read.
"""

from __future__ import annotations

import torch

from ..data import TokenBlocks


class BlockStream:
    def __init__(self, blocks: TokenBlocks, micro_batch: int, *, seed: int, rank: int = 0, world: int = 1):
        if len(blocks) == 0:
            raise ValueError("the training split has no token blocks; point data.train at a non-empty corpus")
        if micro_batch <= 0:
            raise ValueError(f"router_lora.train.batch_size={micro_batch!r}: expected a positive integer")
        self.blocks = blocks
        self.micro_batch = micro_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed + epoch))

    def _take(self, n: int) -> torch.Tensor:
        """The next n block indices of the global order, crossing epoch boundaries as needed."""
        out = []
        while n > 0:
            if self.offset == len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
            chunk = self._order[self.offset : self.offset + n]
            out.append(chunk)
            self.offset += len(chunk)
            n -= len(chunk)
        return torch.cat(out)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This process's share of the next global micro-batch (micro_batch blocks)."""
        idx = self._take(self.micro_batch * self.world)
        idx = idx[self.rank * self.micro_batch : (self.rank + 1) * self.micro_batch]
        return {"input_ids": self.blocks.input_ids[idx], "attention_mask": self.blocks.attention_mask[idx]}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "num_blocks": len(self.blocks)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["num_blocks"]) != len(self.blocks):
            raise ValueError(
                f"the checkpoint was written while training on {state['num_blocks']} blocks, but the training "
                f"data now has {len(self.blocks)}: the data changed since; resume with the same data, or start "
                "a new run without resume"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
