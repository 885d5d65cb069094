"""experiment=topk_override — change how many experts each token uses, measure it, export it.

validate (k against the expert count, before any weight is read) -> load -> baseline held-out
perplexity per label and tokens/s -> set top-k -> the same measurements -> export a checkpoint
whose config carries the new top-k (routers and experts untouched, unchanged shards reused).

A per-layer top-k ({layer_index: k}) runs in memory; a standard config.json cannot express it,
so it is refused for export with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..arch import get_adapter
from ..config import export_options, model_spec
from ..evaluate import evaluate_perplexity, relative_change
from ..errors import ConfigError
from ..export import export_patched_model
from ..models import load_config_dict
from .common import export_dir, load_model_and_data, setup, source_dir

log = logging.getLogger("moesurgeon")


def parse_top_k(value) -> int | dict[int, int]:
    """`top_k=4` or `top_k={3: 1, 5: 4}` (per MoE layer index)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, dict):
        return {int(k): int(v) for k, v in value.items()}
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"top_k={value!r}: expected an integer k >= 1, or a mapping {{layer_index: k}}")
    return value


def validate_top_k(top_k, config: dict, adapter) -> None:
    experts = adapter.num_experts_from_config(config)
    values = top_k.values() if isinstance(top_k, dict) else [top_k]
    for k in values:
        if not 1 <= k <= experts:
            raise ConfigError(f"top_k={k}: expected 1 <= k <= {experts} (the model has {experts} experts per layer)")


def run(cfg: DictConfig, out_dir: Path) -> dict:
    setup(cfg)
    top_k = parse_top_k(cfg.top_k)
    config = load_config_dict(model_spec(cfg))
    adapter = get_adapter(config)
    validate_top_k(top_k, config, adapter)
    do_export = bool(cfg.topk.export)
    if do_export and isinstance(top_k, dict):
        raise ConfigError(
            f"top_k={top_k}: a per-layer top-k cannot be exported — config.json has one "
            f"`{adapter.top_k_key}` for all layers, so standard runtimes would ignore it. "
            "Run with topk.export=false to measure it in memory, or pass one integer top_k."
        )

    model, _, adapter, blocks = load_model_and_data(cfg, splits=("heldout",), exports="config" if do_export else None,
                                                    out_dir=out_dir)
    heldout, bs, progress = blocks["heldout"], int(cfg.data.batch_size), bool(cfg.progress)
    original_k = config.get(adapter.top_k_key)
    base = evaluate_perplexity(model, heldout, bs, progress, desc=f"baseline k={original_k}")
    previous = adapter.set_top_k(model, top_k)
    patched = evaluate_perplexity(model, heldout, bs, progress, desc=f"top_k={top_k}")

    metrics = {"top_k": str(top_k), "baseline_top_k": original_k, **base.flat("baseline"), **patched.flat("patched")}
    for group, change in relative_change(patched.ppl, base.ppl).items():
        metrics[f"rel_change/ppl/{group}"] = change
    metrics["speed_ratio"] = patched.tokens_per_s / base.tokens_per_s
    for group in base.ppl:
        log.info("%-10s ppl %8.3f -> %8.3f (%+.1f%%)", group, base.ppl[group], patched.ppl[group],
                 100 * metrics[f"rel_change/ppl/{group}"])
    log.info("tokens/s %.0f -> %.0f (x%.2f)", base.tokens_per_s, patched.tokens_per_s, metrics["speed_ratio"])

    if do_export:
        probe_ids = heldout.input_ids[:2]
        report = export_patched_model(
            model, adapter, source_dir(cfg), export_dir(cfg, out_dir), export_options(cfg),
            config_edits=adapter.top_k_config_edit(top_k), probe_input_ids=probe_ids,
        )
        metrics.update(report)
    adapter.set_top_k(model, previous)
    return metrics
