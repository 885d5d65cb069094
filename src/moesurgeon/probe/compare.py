"""Compare two router-usage profiles: the routing shift a surgery causes, layer by layer."""

from __future__ import annotations

import torch

from .stats import UsageStats, js_divergence_bits


def check_comparable(a: UsageStats, b: UsageStats) -> None:
    if a.layer_names != b.layer_names or a.num_experts != b.num_experts:
        raise ValueError(
            f"profiles are not comparable: {len(a.layer_names)} layers x {a.num_experts} experts vs "
            f"{len(b.layer_names)} layers x {b.num_experts} experts (first layers {a.layer_names[:2]} vs "
            f"{b.layer_names[:2]}); compare profiles of the same architecture"
        )


def usage_shift(a: UsageStats, b: UsageStats) -> dict[str, torch.Tensor]:
    """Per-layer Jensen-Shannon divergence (bits) between a's and b's usage, overall and per shared group.

    Returns {"all": [L], group: [L] ...}.
    """
    check_comparable(a, b)
    out = {}
    pair = torch.stack([a.merged().usage_share()[:, 0], b.merged().usage_share()[:, 0]], dim=1)  # [L, 2, E]
    out["all"] = js_divergence_bits(pair)
    share_a, share_b = a.usage_share(), b.usage_share()
    for g, name in enumerate(a.group_names):
        if name in b.group_names and name != "all":
            gb = b.group_names.index(name)
            out[name] = js_divergence_bits(torch.stack([share_a[:, g], share_b[:, gb]], dim=1))
    return out


def shift_metrics(a: UsageStats, b: UsageStats, prefix: str = "shift_jsd_bits") -> dict[str, float]:
    shift = usage_shift(a, b)
    out = {}
    for group, per_layer in shift.items():
        out[f"{prefix}/{group}/mean"] = float(per_layer.mean())
        if group == "all":
            for name, v in zip(a.layer_names, per_layer.tolist()):
                out[f"{prefix}/all/{name}"] = v
    return out
