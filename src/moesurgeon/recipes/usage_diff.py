"""experiment=usage_diff — compare two saved router-usage profiles without loading any model.

setup (read both profiles, check they are comparable) -> difference heatmap and per-layer divergence.
Writes usage_diff_heatmap.png (b minus a, per label when both have the same labels),
shift_per_layer.png and metrics.json with the per-layer Jensen-Shannon divergence between them.
Settings: `usage_diff.*` (UsageDiffSettings, recipes/settings.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..probe import UsageStats, shift_metrics, usage_shift
from ..probe.compare import check_comparable
from ..run_context import RunContext
from ..viz import plot_layer_bars, plot_usage
from .common import layer_short_names
from .settings import UsageDiffSettings

log = logging.getLogger("moesurgeon")


def run_name(stats_file: str) -> str:
    """The run a usage_stats.safetensors comes from: its last two directories (experiment/timestamp, or
    run/before for a router_lora profile)."""
    parent = Path(stats_file).resolve().parent
    return "/".join(p for p in (parent.parent.name, parent.name) if p)


def run(ctx: RunContext, settings: UsageDiffSettings) -> dict:
    # ---- setup
    for key in ("a", "b"):
        if not Path(getattr(settings, key)).is_file():
            raise FileNotFoundError(f"usage_diff.{key}={getattr(settings, key)!r} does not exist: expected a "
                                    "usage_stats.safetensors from experiment=router_usage")
    a, b = UsageStats.load(settings.a), UsageStats.load(settings.b)
    check_comparable(a, b)
    name_a, name_b = settings.name_a or run_name(settings.a), settings.name_b or run_name(settings.b)
    if name_a == name_b:
        name_a, name_b = f"{name_a} (a)", f"{name_b} (b)"

    # ---- measure and report
    short = layer_short_names(a.layer_names)
    ma, mb = a.merged().usage_share()[:, 0], b.merged().usage_share()[:, 0]
    plot_usage(torch.stack([ma, mb]).numpy(), [name_a, name_b], short,
               ctx.out_dir / "usage_diff_heatmap.png", title=f"router usage: {name_b} vs {name_a}",
               diff_of=(1, 0))
    shift = usage_shift(a, b)
    plot_layer_bars({g: v.tolist() for g, v in shift.items()}, short, ctx.out_dir / "shift_per_layer.png",
                    ylabel="JSD (bits)", title=f"routing shift {name_a} -> {name_b}")
    metrics = shift_metrics(a, b)
    overall = shift["all"]
    worst = int(overall.argmax())
    log.info("routing shift %s -> %s: mean JSD %.4f bits over %d layers, largest %.4f bits at %s", name_a, name_b,
             float(overall.mean()), len(overall), float(overall[worst]), a.layer_names[worst])
    for group, per_layer in shift.items():
        if group != "all":
            log.info("  %-12s mean JSD %.4f bits", group, float(per_layer.mean()))
    metrics.update({"name_a": name_a, "name_b": name_b})
    return metrics
