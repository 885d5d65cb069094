"""experiment=browse — a genome browser for the checkpoint: every layer and expert as tracks, from the files.

setup (the run context has checked model.path and read config.json; usage files, the compared
checkpoint and the expert map are checked from their headers, seconds) -> optional: the model and
held-out blocks for output similarity (browse.data=true) -> read every shard once (or take it from
the statistics cache) -> write the page -> optional: serve it on 127.0.0.1 (browse.serve=true).

Files in the run dir:
- browser/index.html   the page: one self-contained file, opens from file:// with no network
- browser/data.json    everything the page shows, as JSON
and, shared by the runs of this experiment, the per-shard statistics cache (browse.cache_dir; default
<run dir>/../browse_cache, i.e. outputs/browse/browse_cache): a second run on unchanged shards reads none.
Settings: `browse.*` (BrowseRecipeSettings, recipes/settings.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..browse import BrowseSettings, build_browser, preflight
from ..run_context import RunContext, resolve_threads
from .settings import BrowseRecipeSettings

log = logging.getLogger("moesurgeon")


def run(ctx: RunContext, settings: BrowseRecipeSettings) -> dict:
    # ---- setup: everything that needs no weights, before the model (browse.data) or the long read
    usage = [settings.usage] if isinstance(settings.usage, str) else list(settings.usage or [])
    compare_to = Path(settings.compare_to) if settings.compare_to else None
    expert_map = Path(settings.expert_map) if settings.expert_map else None
    # `threads` (auto: the cores free now) sets how many threads compute statistics while one reads
    workers = resolve_threads(ctx.threads, "cpu") or 1
    options = BrowseSettings(settings.sigma_steps, settings.sample_per_expert, settings.chunk_mb, min(4, workers))
    prepared = preflight(ctx.source_dir, usage=[Path(p) for p in usage], compare_to=compare_to,
                         expert_map=expert_map, settings=options)

    # ---- measure: outputs on calibration data (optional), then the files themselves
    output_similarity = None
    if settings.data:
        from ..browse.output_similarity import expert_output_similarity

        model, _, blocks = ctx.load(splits=("heldout",))
        output_similarity = expert_output_similarity(model, ctx.adapter, blocks["heldout"], batch_size=ctx.batch_size,
                                                     max_tokens=settings.data_tokens, progress=ctx.progress)
        del model
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else ctx.out_dir.parent / "browse_cache"
    out = ctx.out_dir / "browser"
    metrics = build_browser(ctx.source_dir, out, usage=[Path(p) for p in usage], compare_to=compare_to,
                            expert_map=expert_map, output_similarity=output_similarity, settings=options,
                            cache_dir=cache_dir, progress=ctx.progress, title=Path(str(ctx.model.path)).name,
                            prepared=prepared)

    # ---- report
    log.info("browse: %d tensors, %d MoE layers; %d shards read (%.2f GB/s), %d from the cache %s",
             metrics["browse/tensors"], metrics["browse/moe_layers"], metrics["browse/shards_read"],
             metrics["browse/read_gb_per_s"] or 0.0, metrics["browse/shards_cached"], cache_dir)
    log.info("wrote %s and %s (open the page in a browser, file:// works)", out / "index.html", out / "data.json")
    if settings.serve and ctx.main_process:
        from ..browse.serve import serve_until_interrupted

        serve_until_interrupted(out, settings.port)
    return metrics
