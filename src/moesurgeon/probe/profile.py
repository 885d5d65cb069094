"""Run a model over token blocks under a RouterUsageProbe: the one loop every experiment uses."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import ArchAdapter
from ..data import TokenBlocks
from ..models import input_device
from .stats import UsageStats
from .usage_probe import RouterUsageProbe


@torch.no_grad()
def profile_usage(
    model,
    adapter: ArchAdapter,
    blocks: TokenBlocks,
    batch_size: int = 8,
    trace_path: str | Path | None = None,
    trace_max_tokens: int = 100_000,
    progress: bool = True,
    desc: str = "profile",
) -> tuple[UsageStats, float]:
    """Return (usage statistics grouped by the blocks' labels, tokens/s of the probed forward)."""
    if len(blocks) == 0:
        raise ValueError("no token blocks to profile: the dataset produced no blocks")
    device = input_device(model)
    groups = blocks.label_names or ["all"]
    tokens = 0
    elapsed = 0.0
    with RouterUsageProbe(model, adapter, group_names=groups, trace_path=trace_path, trace_max_tokens=trace_max_tokens) as probe:
        bar = tqdm(total=blocks.num_tokens(), desc=desc, unit="tok", unit_scale=True, disable=not progress, leave=False)
        for batch in blocks.batches(batch_size):
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            labels = batch["label_ids"].clamp_min(0).to(device)
            t0 = time.perf_counter()
            with probe.batch(attention_mask=mask, label_ids=labels, input_ids=ids):
                model(input_ids=ids, attention_mask=mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - t0
            n = int(mask.sum())
            tokens += n
            bar.update(n)
        bar.close()
        stats = probe.stats
    return stats, tokens / max(elapsed, 1e-9)
