"""Fold the scan's diff numbers into the page's diff track: per tensor, per expert, per layer, and a summary.

Relative change = |A - B| / |B| (Frobenius norms; B = the compared checkpoint). An expert's change
combines all its parts: sqrt(sum |dA|^2) / sqrt(sum |B|^2). A layer's change combines every compared
tensor of that layer.
"""

from __future__ import annotations

import math

from .diff import DiffPlan
from .layout import ModelLayout


def _rel(delta_sumsq: float, partner_sumsq: float) -> float:
    if partner_sumsq > 0:
        return math.sqrt(delta_sumsq / partner_sumsq)
    return 0.0 if delta_sumsq == 0 else math.inf


def diff_tracks(plan: DiffPlan, layout: ModelLayout, diffs: dict[str, dict], slice_diffs: dict[str, list],
                router_rows: dict[int, dict], other_counts: dict[int, int]) -> dict:
    """`other_counts`: experts per MoE layer of the compared checkpoint (to name the ones nothing maps to)."""
    tensors = {}
    for name, d in diffs.items():
        tensors[name] = {"other": plan.pairs.get(name), "equal": bool(d.get("equal")),
                         "rel": _rel(d.get("delta_sumsq", 0.0), d.get("partner_sumsq", 0.0)),
                         "maxabs": d.get("delta_maxabs", 0.0)}
        if d.get("partial"):
            tensors[name]["partial"] = d["partial"]
    layers: dict[int, dict] = {}
    for index, lay in layout.layers.items():
        count = max(lay.parts) + 1 if lay.parts else 0
        rel: list[float | None] = [None] * count
        equal: list[bool | None] = [None] * count
        for e, parts in lay.parts.items():
            delta = ref = 0.0
            seen, same = 0, True
            for part in parts:
                d = _part_diff(part, e, diffs, slice_diffs)
                if d is None:
                    continue
                seen += 1
                delta += d.get("delta_sumsq", 0.0)
                ref += d.get("partner_sumsq", 0.0)
                same = same and bool(d.get("equal"))
            if seen:
                rel[e], equal[e] = _rel(delta, ref), same and seen == len(parts)
        emap = plan.maps.get(index, [])
        other = other_counts.get(index, 0)
        layers[index] = {"expert_rel": rel, "expert_equal": equal, "expert_map": emap,
                         "map_source": plan.map_source.get(index), "router_rows": router_rows.get(index, {}),
                         "other_unmatched": sorted(set(range(other)) - {k for k in emap if k is not None})}
    by_layer: dict[int, list[float]] = {}
    for name, d in diffs.items():
        index = layout.tensor_layer.get(name)
        if index is not None:
            acc = by_layer.setdefault(index, [0.0, 0.0])
            acc[0] += d.get("delta_sumsq", 0.0)
            acc[1] += d.get("partner_sumsq", 0.0)
    layer_rel = {i: _rel(a, b) for i, (a, b) in by_layer.items()}
    changed = sorted((n for n, t in tensors.items() if not t["equal"]), key=lambda n: -tensors[n]["rel"])
    unmatched = {i: d["other_unmatched"] for i, d in layers.items() if d["other_unmatched"]}
    summary = {"compared": len(tensors), "identical": len(tensors) - len(changed), "changed": len(changed),
               "other_experts_unmatched": unmatched,
               "not_compared": len(plan.uncompared), "largest_changes": [[n, tensors[n]["rel"]] for n in changed[:10]]}
    return {"other": str(plan.other), "notes": plan.notes, "tensors": tensors, "layers": layers,
            "layer_rel": layer_rel, "uncompared": plan.uncompared, "summary": summary}


def _part_diff(part, expert: int, diffs: dict[str, dict], slice_diffs: dict[str, list]) -> dict | None:
    if part.fused:
        row = slice_diffs.get(part.tensor) or []
        return row[expert] if expert < len(row) else None
    return diffs.get(part.tensor)
