"""experiment=router_usage — which experts does each layer's router use, on which data?

validate -> load model and held-out blocks -> profile under the probe -> write statistics,
heatmaps (PNG + one interactive HTML page) and metrics.

Files in the run dir:
- usage_stats.safetensors  the accumulated statistics (format: moesurgeon/probe/stats.py docstring)
- usage_heatmap.png        layer x expert share of routed tokens, one panel per label + difference
- coactivation_<layer>.png P(j selected | i selected) for one layer
- layer_divergence.png     per-layer JSD between labels and routing entropy
- router_usage.html        interactive page with all of the above
- trace.jsonl              per-token routing (usage.trace=true)
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ..probe import UsageStats, layer_metrics, profile_usage, shift_metrics
from ..probe.stats import js_divergence_bits
from ..viz import plot_coactivation, plot_layer_bars, plot_usage, write_usage_html
from ..errors import ConfigError
from .common import layer_short_names, load_model_and_data, setup

log = logging.getLogger("moesurgeon")


def pick_layer(stats: UsageStats, choice) -> int:
    if choice is None:
        return len(stats.layer_names) // 2
    if isinstance(choice, int) or str(choice).isdigit():
        pos = int(choice)
        if not 0 <= pos < len(stats.layer_names):
            raise ConfigError(f"usage.coact_layer={choice}: expected an MoE-layer position in [0, {len(stats.layer_names) - 1}] or a router name")
        return pos
    if choice not in stats.layer_names:
        raise ConfigError(f"usage.coact_layer={choice!r} is not a router name; routers: {stats.layer_names}")
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
        layer_names=stats.layer_names, coact=coact.numpy(), extra_tables=extra_tables))
    return files


def run(cfg: DictConfig, out_dir: Path) -> dict:
    opts = cfg.usage
    setup(cfg)
    compare_to = UsageStats.load(opts.compare_to) if opts.get("compare_to") else None  # fail before loading

    model, _, adapter, blocks = load_model_and_data(cfg, splits=("heldout",))
    heldout = blocks["heldout"]
    stats, tokens_per_s = profile_usage(
        model, adapter, heldout, batch_size=int(cfg.data.batch_size),
        trace_path=out_dir / "trace.jsonl" if opts.trace else None,
        trace_max_tokens=int(opts.trace_max_rows), progress=bool(cfg.progress),
    )
    stats.save(out_dir / "usage_stats.safetensors")

    metrics = layer_metrics(stats)
    metrics["probe_tokens_per_s"] = tokens_per_s
    table = [{"metric": k, "value": round(v, 4) if isinstance(v, float) else v} for k, v in metrics.items() if "/" not in k or k.endswith("/mean") or k.startswith("top2")]
    write_usage_report(stats, out_dir, title=f"router usage: {Path(str(cfg.model.path)).name}",
                       coact_layer=opts.get("coact_layer"), extra_tables={"summary": table})
    if compare_to is not None:
        metrics.update(shift_metrics(compare_to, stats))
    log.info("mean routing entropy %.3f bits, mean JSD between labels %s bits over %d tokens",
             metrics["entropy_bits/mean"], f"{metrics.get('jsd_bits/mean', float('nan')):.3f}", metrics["tokens"])
    return metrics
