"""experiment=router_usage — which experts does each layer's router use, on which data?

setup (the run context: model checked, config.json read; the held-out blocks; the model) ->
profile under the probe -> write statistics, heatmaps (PNG + one interactive HTML page) and metrics.
Settings: `router_usage.*` (RouterUsageSettings, recipes/settings.py).
Under `torchrun --nproc_per_node N` each process profiles every N-th batch and the sums are added,
equal to a one-process run (moesurgeon/distributed.py); rank 0 writes the files.

Files in the run dir:
- usage_stats.safetensors  the accumulated statistics (format: moesurgeon/probe/stats.py docstring)
- usage_heatmap.png        layer x expert share of routed tokens, one panel per label + difference
- coactivation_<layer>.png P(j selected | i selected) for one layer
- layer_divergence.png     per-layer JSD between labels and routing entropy
- router_usage.html        interactive page with all of the above
- trace.jsonl              per-token routing (router_usage.trace=true)
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..distributed import check_same, fingerprint, join
from ..errors import ConfigError
from ..models import input_device
from ..probe import UsageStats, layer_metrics, profile_usage, shift_metrics
from ..probe.stats import js_divergence_bits
from ..run_context import RunContext
from ..viz import plot_coactivation, plot_layer_bars, plot_usage, write_usage_html
from .common import layer_short_names
from .settings import RouterUsageSettings

log = logging.getLogger("moesurgeon")


def pick_layer(stats: UsageStats, choice) -> int:
    if choice is None:
        return len(stats.layer_names) // 2
    if isinstance(choice, int) or str(choice).isdigit():
        pos = int(choice)
        if not 0 <= pos < len(stats.layer_names):
            raise ConfigError(f"router_usage.coact_layer={choice}: expected an MoE-layer position in "
                              f"[0, {len(stats.layer_names) - 1}] or a router name")
        return pos
    if choice not in stats.layer_names:
        raise ConfigError(f"router_usage.coact_layer={choice!r} is not a router name; routers: {stats.layer_names}")
    return stats.layer_names.index(choice)


def write_usage_report(stats: UsageStats, out_dir: Path, title: str, coact_layer=None, extra_tables=None) -> dict[str, str]:
    """Heatmaps, co-activation, per-layer bars and the HTML page for one profile."""
    short = layer_short_names(stats.layer_names)
    share = stats.usage_share().permute(1, 0, 2).numpy()  # [G, L, E]
    files = {"heatmap": str(plot_usage(share, stats.group_names, short, out_dir / "usage_heatmap.png", title=title))}
    pos = pick_layer(stats, coact_layer)
    coact = stats.coact.sum(1).double()  # [L, E, E]
    files["coactivation"] = str(plot_coactivation(
        stats.coactivation_conditional(pos).numpy(), out_dir / f"coactivation_{short[pos]}.png",
        title=f"{title}: co-activation, {stats.layer_names[pos]}"))
    bars = {"routing entropy (bits)": stats.merged().mean_entropy_bits()[:, 0].tolist()}
    if len(stats.group_names) > 1:
        bars["JSD between labels (bits)"] = js_divergence_bits(stats.usage_share()).tolist()
    files["layers"] = str(plot_layer_bars(bars, short, out_dir / "layer_divergence.png", ylabel="bits", title=title))
    files["html"] = str(write_usage_html(
        out_dir / "router_usage.html", title=title, usage=share, group_names=stats.group_names,
        layer_names=stats.layer_names, coact=coact.numpy(), coact_layer=pos, extra_tables=extra_tables))
    return files


def run(ctx: RunContext, settings: RouterUsageSettings) -> dict:
    # ---- setup: a profile to compare with is read before the model loads
    compare_to = UsageStats.load(settings.compare_to) if settings.compare_to else None
    model, _, blocks = ctx.load(splits=("heldout",))
    heldout = blocks["heldout"]
    # under torchrun every process profiles its share of the batches and the sums are added (distributed.py)
    shard = join(input_device(model))
    if shard.active and settings.trace:
        raise ConfigError("router_usage.trace=true writes one per-token file from one process: run it without "
                          "torchrun, or set router_usage.trace=false")
    check_same(shard, "settings, model or held-out data", fingerprint(
        repr(settings), repr(ctx.data), str(ctx.model), str(ctx.batch_size), heldout.input_ids, heldout.attention_mask, heldout.labels))

    # ---- measure
    trace = ctx.out_dir / "trace.jsonl" if settings.trace else None
    stats, tokens_per_s = profile_usage(model, ctx.adapter, heldout, batch_size=ctx.batch_size, trace_path=trace,
                                        trace_max_tokens=settings.trace_max_rows, progress=ctx.progress, shard=shard)
    metrics = layer_metrics(stats)
    metrics.update({"probe_tokens_per_s": tokens_per_s, "processes": shard.world})
    if not ctx.main_process:  # the same sums in every process: one writes them
        return metrics
    stats.save(ctx.out_dir / "usage_stats.safetensors")

    # ---- report
    table = [{"metric": k, "value": round(v, 4) if isinstance(v, float) else v} for k, v in metrics.items()
             if "/" not in k or k.endswith("/mean") or k.startswith("top2")]
    write_usage_report(stats, ctx.out_dir, title=f"router usage: {Path(ctx.model.path).name}",
                       coact_layer=settings.coact_layer, extra_tables={"summary": table})
    if compare_to is not None:
        metrics.update(shift_metrics(compare_to, stats))
    log.info("mean routing entropy %.3f bits, mean JSD between labels %s bits over %d tokens",
             metrics["entropy_bits/mean"], f"{metrics.get('jsd_bits/mean', float('nan')):.3f}", metrics["tokens"])
    return metrics
