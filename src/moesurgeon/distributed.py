"""Many processes measuring one model: `torchrun --nproc_per_node N -m moesurgeon experiment=router_usage ...`.

Usage statistics and expert scores are sums over tokens, so N processes can each run a share of
the batches and add their sums. The share is by BATCH (batch i goes to process i mod N, see
`block_runner.run_blocks(shard=...)`), never by block: every batch is then exactly the batch a
single process would have run (same blocks, same padding), so the routing decisions, and with them
the counts and co-activation, are identical to a one-process run; float sums agree to the last bits
of float64 (the order of additions differs).

Before any batch runs, every process checks that the others were started with the same settings
and read the same data (`check_same`): a process with another config or another data file would
silently add the wrong sums.

Outside torchrun (no WORLD_SIZE > 1) everything here is a no-op: rank 0 of 1.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = ["DistributedMismatchError", "Shard", "check_batches", "check_same", "fingerprint", "join", "sum_into"]


class DistributedMismatchError(ConfigError):
    """The processes of one torchrun job were started with different settings or data."""


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank


def join(device: torch.device | str = "cpu") -> Shard:
    """This process's share of the job; joins torchrun's process group on first use (gloo on CPU, nccl on
    CUDA). Without torchrun: Shard(0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if not dist.is_initialized():
        # the sums live on the CPU (gloo); forwards on CUDA may use nccl for anything else
        backend = "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Shard(dist.get_rank(), dist.get_world_size())


def check_batches(shard: Shard, batches: int) -> None:
    """Every process needs at least one batch (a process without one would have nothing to add and
    the job would wait for it); checked by every process before any batch runs."""
    if shard.active and batches < shard.world:
        raise DistributedMismatchError(
            f"{batches} batches for {shard.world} processes: every process needs at least one; start at most "
            f"{batches} processes (torchrun --nproc_per_node {max(batches, 1)}) or use a smaller batch size")


def fingerprint(*parts: str | bytes | torch.Tensor) -> str:
    """A short hash of settings and data (tensors by their bytes)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return h.hexdigest()[:16]


def check_same(shard: Shard, what: str, value: str) -> None:
    """Refuse to go on when the processes disagree on `value` (e.g. the fingerprint of config + data)."""
    if not shard.active:
        return
    values: list[str | None] = [None] * shard.world
    dist.all_gather_object(values, value)
    if len(set(values)) != 1:
        ranks = {v: [r for r, x in enumerate(values) if x == v] for v in dict.fromkeys(values)}
        raise DistributedMismatchError(
            f"the {shard.world} processes of this torchrun job differ in {what}: {ranks} (value: ranks); start "
            "every process with the same command line and the same data files")


def sum_into(shard: Shard, tensors: list[torch.Tensor]) -> None:
    """Add every process's `tensors` in place (integer sums exact; float64 sums to rounding)."""
    if not shard.active:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
