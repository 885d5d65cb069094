"""experiment=topk_override — change how many experts each token uses, measure it, export it.

setup (k checked against the expert count in config.json, before any weight is read; held-out blocks;
model) -> baseline held-out perplexity per label and tokens/s -> set top-k -> the same measurements
-> export a checkpoint whose config carries the new top-k (routers and experts untouched, unchanged
shards reused). Settings: `topk_override.*` (TopkOverrideSettings, recipes/settings.py).

A per-layer top-k ({layer_index: k}) runs in memory; a standard config.json cannot express it,
so it is refused for export with the reason.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError
from ..evaluate import evaluate_perplexity, relative_change
from ..export import export_patched_model
from ..run_context import RunContext
from .settings import TopkOverrideSettings

log = logging.getLogger("moesurgeon")


def validate_top_k(top_k: int | dict[int, int], config: dict, adapter) -> None:
    experts = adapter.num_experts_from_config(config)
    values = top_k.values() if isinstance(top_k, dict) else [top_k]
    for k in values:
        if not 1 <= k <= experts:
            raise ConfigError(f"topk_override.top_k={k}: expected 1 <= k <= {experts} (the model has {experts} "
                              "experts per layer)")


def run(ctx: RunContext, settings: TopkOverrideSettings) -> dict:
    # ---- setup
    top_k, adapter = settings.top_k, ctx.adapter
    validate_top_k(top_k, ctx.model_config, adapter)
    if ctx.export.enabled and isinstance(top_k, dict):
        raise ConfigError(
            f"topk_override.top_k={top_k}: a per-layer top-k cannot be exported — config.json has one "
            f"`{adapter.top_k_key}` for all layers, so standard runtimes would ignore it. "
            "Run with export.enabled=false to measure it in memory, or pass one integer top_k."
        )
    model, _, blocks = ctx.load(splits=("heldout",), export_rewrites_shards=False)  # the export edits config.json
    heldout, bs = blocks["heldout"], ctx.batch_size

    # ---- baseline
    original_k = ctx.model_config.get(adapter.top_k_key)
    base = evaluate_perplexity(model, heldout, bs, ctx.progress, desc=f"baseline k={original_k}")

    # ---- apply, measure
    previous = adapter.set_top_k(model, top_k)
    patched = evaluate_perplexity(model, heldout, bs, ctx.progress, desc=f"top_k={top_k}")
    metrics = {"top_k": str(top_k), "baseline_top_k": original_k, **base.flat("baseline"), **patched.flat("patched")}
    for group, change in relative_change(patched.ppl, base.ppl).items():
        metrics[f"rel_change/ppl/{group}"] = change
    metrics["speed_ratio"] = patched.tokens_per_s / base.tokens_per_s
    for group in base.ppl:
        log.info("%-10s ppl %8.3f -> %8.3f (%+.1f%%)", group, base.ppl[group], patched.ppl[group],
                 100 * metrics[f"rel_change/ppl/{group}"])
    log.info("tokens/s %.0f -> %.0f (x%.2f)", base.tokens_per_s, patched.tokens_per_s, metrics["speed_ratio"])

    # ---- export
    if ctx.export.enabled:
        metrics.update(export_patched_model(
            model, adapter, ctx.source_dir, ctx.export.dir, ctx.export.options,
            config_edits=adapter.top_k_config_edit(top_k), probe_input_ids=heldout.input_ids[:2]))
    adapter.set_top_k(model, previous)
    return metrics
