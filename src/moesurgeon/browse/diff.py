"""The diff track: which tensors changed against another checkpoint (`compare_to`), and by how much, per expert.

Pairing (`plan_diff`): a tensor outside the experts is compared with the tensor of the same name,
dtype and shape; an expert's part with the same part of its counterpart expert (expert_map.py),
per-expert with per-expert and fused slice with fused slice. Router rows are experts too: they are
compared row by row through the same map (router_row_changes), which is what a pruning or a router
LoRA export changes. Everything that cannot be compared is listed with the reason (another family,
other shapes, a layer only one side has, fused on one side and per expert on the other).

The numbers (`diff_tracks`): relative change |A - B| / |B| (Frobenius, B = the compared checkpoint),
max |A - B|, and whether the bytes are identical, per tensor, per expert and per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .chunks import Span, read_whole, readable, split_tensor
from .inventory import Inventory, TensorMeta
from .layout import ModelLayout


@dataclass
class DiffPlan:
    other: Path
    partners: dict[str, dict[tuple[str, int], Span]] = field(default_factory=dict)  # tensor of A -> its pieces
    pairs: dict[str, str] = field(default_factory=dict)  # tensor of A -> tensor of B
    maps: dict[int, list[int | None]] = field(default_factory=dict)
    map_source: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    uncompared: dict[str, str] = field(default_factory=dict)  # tensor of A -> why not

    def key(self, inv_b: Inventory) -> dict:
        """What a cached diff depends on besides this checkpoint's shard: the other shards and the map."""
        return {"other": {s.name: s.key() for s in inv_b.shards.values()},
                "maps": {str(k): v for k, v in sorted(self.maps.items())}}


def plan_diff(inv_a: Inventory, lay_a: ModelLayout, inv_b: Inventory, lay_b: ModelLayout,
              maps: dict[int, list[int | None]], map_source: dict[int, str], max_bytes: int) -> DiffPlan:
    plan = DiffPlan(inv_b.root, maps=maps, map_source=map_source)
    if lay_a.model_type != lay_b.model_type:
        plan.notes.append(f"compare_to is a {lay_b.model_type} checkpoint, this one {lay_a.model_type}: only tensors "
                          "with the same name, dtype and shape are compared")
    expert_tensors = set()
    for index, la in lay_a.layers.items():
        lb = lay_b.layers.get(index)
        names_a = {p.tensor for parts in la.parts.values() for p in parts}
        expert_tensors |= names_a
        if lb is None:
            for name in names_a:
                plan.uncompared[name] = f"layer {index} has no MoE block in compare_to"
            continue
        if la.storage != lb.storage:
            plan.notes.append(f"layer {index}: experts are {la.storage} here and {lb.storage} in compare_to; "
                              "their tensors are not compared")
            for name in names_a:
                plan.uncompared[name] = "experts stored differently (fused / per expert) in compare_to"
            continue
        _pair_experts(plan, inv_a, la, inv_b, lb, maps.get(index, []), max_bytes)
    for name, meta in inv_a.tensors.items():
        if name in expert_tensors or name in plan.pairs or name in plan.uncompared:
            continue
        other = inv_b.tensors.get(name)
        why = _why_not(meta, other)
        if why:
            plan.uncompared[name] = why
            continue
        plan.pairs[name] = name
        plan.partners[name] = _pieces(inv_a, meta, inv_b, other, max_bytes, fused=False)
    only_b = [n for n in inv_b.tensors if n not in inv_a.tensors and lay_b.tensor_role.get(n) != "expert"]
    if only_b:
        plan.notes.append(f"{len(only_b)} tensors exist only in compare_to (e.g. {only_b[0]})")
    return plan


def _why_not(a: TensorMeta, b: TensorMeta | None) -> str | None:
    if b is None:
        return "not in compare_to"
    if a.shape is None or b.shape is None or a.begin is None or b.begin is None:
        return "unreadable on one side"
    if not readable(a.dtype) or not readable(b.dtype):
        return f"dtype {a.dtype}/{b.dtype} is not compared"
    if a.shape != b.shape:
        return f"shape {list(a.shape)} here, {list(b.shape)} in compare_to"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} here, {b.dtype} in compare_to"
    return None


def _pieces(inv_a: Inventory, a: TensorMeta, inv_b: Inventory, b: TensorMeta, max_bytes: int, *, fused: bool,
            slice_map: list[int | None] | None = None) -> dict[tuple[str, int], Span]:
    mine = split_tensor(inv_a.shards[a.shard].path, a.begin, a.dtype, a.shape, fused=fused, max_bytes=max_bytes)
    theirs = split_tensor(inv_b.shards[b.shard].path, b.begin, b.dtype, b.shape, fused=fused, max_bytes=max_bytes)
    by_key = {(k, i): s for k, i, s in theirs}
    out = {}
    for kind, index, span in mine:
        j = index if slice_map is None or kind != "slice" else (slice_map[index] if index < len(slice_map) else None)
        other = by_key.get((kind, j)) if j is not None else None
        if other is not None and other.shape == span.shape and other.dtype == span.dtype:
            out[(kind, index)] = other
    return out


def _pair_experts(plan: DiffPlan, inv_a, la, inv_b, lb, emap: list[int | None], max_bytes: int) -> None:
    for e, parts in la.parts.items():
        j = emap[e] if e < len(emap) else None
        for part in parts:
            if j is None:
                plan.uncompared.setdefault(part.tensor, f"expert {e} has no counterpart in compare_to")
                continue
            match = next((p for p in lb.parts.get(j, []) if p.part == part.part), None)
            a, b = inv_a.tensors.get(part.tensor), inv_b.tensors.get(match.tensor) if match else None
            if part.fused:
                if b is None or a is None or a.shape is None or b.shape is None or a.shape[1:] != b.shape[1:] \
                        or a.dtype != b.dtype:
                    plan.uncompared[part.tensor] = "fused tensor missing or shaped differently in compare_to"
                    continue
                if part.tensor not in plan.partners:
                    plan.pairs[part.tensor] = b.name
                    plan.partners[part.tensor] = _pieces(inv_a, a, inv_b, b, max_bytes, fused=True, slice_map=emap)
                continue
            why = _why_not(a, b) if a is not None else "unreadable"
            if why:
                plan.uncompared[part.tensor] = why
                continue
            plan.pairs[part.tensor] = b.name
            plan.partners[part.tensor] = _pieces(inv_a, a, inv_b, b, max_bytes, fused=False)


def router_row_changes(inv_a: Inventory, lay_a: ModelLayout, inv_b: Inventory, lay_b: ModelLayout,
                       plan: DiffPlan) -> dict[int, dict]:
    """{L: {name: [relative change of each expert's router row (or value), None without counterpart]}}."""
    out: dict[int, dict] = {}
    for index, la in lay_a.layers.items():
        lb, emap = lay_b.layers.get(index), plan.maps.get(index)
        if lb is None or emap is None:
            continue
        for local, name in la.router.items():
            other = lb.router.get(local)
            a, b = inv_a.tensors.get(name), inv_b.tensors.get(other) if other else None
            if a is None or b is None or a.begin is None or b.begin is None or not readable(a.dtype) \
                    or not readable(b.dtype) or a.shape[1:] != b.shape[1:]:
                continue
            ta = read_whole(Span(inv_a.shards[a.shard].path, a.begin, a.end, a.dtype, a.shape))
            tb = read_whole(Span(inv_b.shards[b.shard].path, b.begin, b.end, b.dtype, b.shape))
            rows = []
            for e in range(ta.shape[0]):
                j = emap[e] if e < len(emap) else None
                if j is None or j >= tb.shape[0]:
                    rows.append(None)
                    continue
                ref = float(tb[j].norm())
                delta = float((ta[e] - tb[j]).norm())
                rows.append(delta / ref if ref > 0 else (0.0 if delta == 0 else math.inf))
            out.setdefault(index, {})[local] = rows
    return out
