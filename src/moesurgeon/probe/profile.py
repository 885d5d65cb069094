"""profile_usage: router-usage statistics of a model over token blocks (a RouterUsageProbe under run_blocks)."""

from __future__ import annotations

from pathlib import Path

from ..arch import ArchAdapter
from ..block_runner import Scope, run_blocks
from ..data import TokenBlocks
from ..distributed import Shard, sum_into
from .stats import TENSORS, UsageStats
from .usage_probe import RouterUsageProbe


def profile_usage(
    model,
    adapter: ArchAdapter,
    blocks: TokenBlocks,
    batch_size: int = 8,
    trace_path: str | Path | None = None,
    trace_max_tokens: int = 100_000,
    progress: bool = True,
    desc: str = "profile",
    *,
    by_label: bool = False,
    scope: Scope | None = None,
    shard: Shard | None = None,
) -> tuple[UsageStats, float]:
    """Return (usage statistics grouped by the blocks' labels, tokens/s of the probed forward).

    `by_label` / `scope`: batch one label group at a time, inside `scope(label)` (see `run_blocks`).
    `shard` (torchrun): this process runs its share of the batches and the statistics are summed over
    every process, so each returns the statistics of all the blocks (moesurgeon/distributed.py)."""
    if shard is not None and shard.active and trace_path is not None:
        raise ValueError("a per-token trace is written by one process: run router_usage.trace=true without torchrun")
    if len(blocks) == 0:
        raise ValueError("no token blocks to profile: the dataset produced no blocks")
    probe = RouterUsageProbe(model, adapter, group_names=blocks.label_names or ["all"], trace_path=trace_path,
                             trace_max_tokens=trace_max_tokens)
    with probe.tracing():
        done = run_blocks(model, blocks, batch_size, hooks=probe.hooks(), by_label=by_label, scope=scope,
                          progress=progress, desc=desc, shard=shard)
    stats = probe.stats
    if shard is not None:
        sum_into(shard, [getattr(stats, name) for name in TENSORS])
    return stats, done.tokens_per_s
