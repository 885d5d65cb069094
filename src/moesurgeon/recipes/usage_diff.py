"""experiment=usage_diff — compare two saved router-usage profiles without loading any model.

Writes usage_diff_heatmap.png (b minus a, per label when both have the same labels),
shift_per_layer.png and metrics.json with the per-layer Jensen-Shannon divergence between them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ..probe import UsageStats, shift_metrics, usage_shift
from ..probe.compare import check_comparable
from ..viz import plot_layer_bars, plot_usage
from .common import layer_short_names


def run(cfg: DictConfig, out_dir: Path) -> dict:
    d = cfg.diff
    for key in ("a", "b"):
        if not Path(str(d[key])).is_file():
            raise FileNotFoundError(f"diff.{key}={d[key]!r} does not exist: expected a usage_stats.safetensors from experiment=router_usage")
    a, b = UsageStats.load(d.a), UsageStats.load(d.b)
    check_comparable(a, b)
    short = layer_short_names(a.layer_names)
    ma, mb = a.merged().usage_share()[:, 0], b.merged().usage_share()[:, 0]
    panels = torch.stack([ma, mb]).numpy()
    plot_usage(panels, [str(d.name_a), str(d.name_b)], short, out_dir / "usage_diff_heatmap.png",
               title=f"router usage: {d.name_b} vs {d.name_a}", diff_of=(1, 0))
    shift = usage_shift(a, b)
    plot_layer_bars({g: v.tolist() for g, v in shift.items()}, short, out_dir / "shift_per_layer.png",
                    ylabel="JSD (bits)", title=f"routing shift {d.name_a} -> {d.name_b}")
    return shift_metrics(a, b)
