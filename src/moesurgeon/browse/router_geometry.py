"""Router geometry per MoE layer: the rows of the router weight (one per expert) and its per-expert biases.

For a router weight W [E, H] (logit_e = <x, W_e> (+ bias_e)): row norms |W_e| (how loud an expert's
logit can get), row-to-row cosine (experts whose rows point the same way compete for the same
tokens) and each expert's nearest neighbour. One-dimensional router tensors with one value per
expert (a logit bias, a choice-only correction bias) are shown as they are, named by their
on-disk suffix. Router tensors are small (E x H), so they are read whole, not through the scan.
"""

from __future__ import annotations

from .chunks import Span, read_whole, readable
from .inventory import Inventory
from .layout import ModelLayout
from .similarity import cosine_matrix, nearest, summary


def router_tracks(inv: Inventory, layout: ModelLayout) -> dict[int, dict]:
    """{L: {"row_norm": [E], "matrix": E x E cosine, "nearest", "summary", "vectors": {name: [E]}, "notes"}}."""
    out: dict[int, dict] = {}
    for index, lay in layout.layers.items():
        entry: dict = {"vectors": {}, "notes": [], "tensors": dict(lay.router)}
        experts = len(lay.parts) or layout.num_experts
        for local, name in sorted(lay.router.items()):
            meta = inv.tensors.get(name)
            if meta is None or meta.shape is None or meta.begin is None:
                entry["notes"].append(f"{name}: not readable (its shard could not be read)")
                continue
            if not readable(meta.dtype):
                entry["notes"].append(f"{name}: dtype {meta.dtype} is not a float type; not drawn")
                continue
            try:
                t = read_whole(Span(inv.shards[meta.shard].path, meta.begin, meta.end, meta.dtype, meta.shape))
            except OSError as exc:
                entry["notes"].append(f"{name}: {exc}")
                continue
            if t.dim() == 2 and "weight" not in entry:
                if t.shape[0] != experts:
                    entry["notes"].append(f"{name} has {t.shape[0]} rows for {experts} experts")
                sim = cosine_matrix(t)
                entry["weight"] = name
                entry["row_norm"] = t.norm(dim=1).tolist()
                entry["matrix"] = sim.tolist()
                entry["nearest"] = nearest(sim)
                entry["summary"] = summary(sim)
            elif t.dim() == 1:
                entry["vectors"][local] = t.tolist()
            else:
                entry["notes"].append(f"{name}: shape {list(t.shape)} is not drawn")
        if "weight" not in entry:
            entry["notes"].append("no two-dimensional router weight found")
        out[index] = entry
    return out
