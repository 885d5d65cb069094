"""`build_browser`: a checkpoint directory in, one self-contained `index.html` (plus its data) out.

Order of work, cheapest first, so bad input fails in seconds and the inventory is visible at once:
headers -> layout (adapter) -> usage files and the compared checkpoint checked -> the page written
with the inventory alone -> every shard read once (or taken from the cache) -> statistics, similarity,
router geometry, diff -> the page rewritten with everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..arch import InvalidConfigError, UnsupportedModelError
from .cache import StatsCache
from .diff import plan_diff, router_row_changes
from .diff_tracks import diff_tracks
from .errors import BrowseError
from .expert_map import expert_maps
from .expert_stats import expert_tracks, tensor_rows
from .inventory import Inventory, read_inventory
from .kernels import NEAR_ZERO
from .layout import ModelLayout, detect_layout, inventory_only_layout
from .overlays import read_overlays
from .page import page_data, write_page
from .progress import ByteProgress
from .router_geometry import router_tracks
from .scan import ShardResult, TensorPlan, scan_shards
from .similarity import sample_key, weight_similarity

log = logging.getLogger("moesurgeon")


@dataclass(frozen=True)
class BrowseSettings:
    # Lanczos steps per matrix for its top singular value (2 x steps - 1 matrix-vector products; 0: none, the
    # fastest browse: the singular values are most of the computing)
    sigma_steps: int = 5
    sample_per_expert: int = 8192  # weights per expert kept for the similarity estimate
    chunk_mb: int = 16  # largest piece read at once (expert slices, row blocks); memory ~ (2 + 5 x workers) x this
    workers: int = 0  # threads computing statistics; 0: torch's thread count (the run's `threads`), at most 4

    def resolved_workers(self) -> int:
        return self.workers or max(1, min(4, torch.get_num_threads()))

    def check(self) -> None:
        for name, low in (("sigma_steps", 0), ("sample_per_expert", 16), ("chunk_mb", 1), ("workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BrowseError(f"browse.{name}={value!r}: expected an integer >= {low}")


def load_layout(inv: Inventory) -> ModelLayout:
    """The MoE layout from config.json, or an inventory-only layout with the reason."""
    if inv.config is None:
        return inventory_only_layout(inv.shapes(), "no usable config.json: the inventory alone is shown")
    try:
        return detect_layout(inv.config, inv.shapes())
    except (UnsupportedModelError, InvalidConfigError) as exc:
        return inventory_only_layout(inv.shapes(), f"{exc} The inventory alone is shown.")


@dataclass
class Prepared:
    """What `preflight` read from headers and small files, handed on to `build_browser` so it is not read twice."""

    inv: Inventory
    layout: ModelLayout
    overlays: list[dict]
    other: tuple | None = None  # compare_to: (inventory, layout, expert maps, how they were found)


def preflight(checkpoint_dir: Path, *, usage: Sequence[Path] = (), compare_to: Path | None = None,
              expert_map: Path | None = None, settings: BrowseSettings = BrowseSettings()) -> Prepared:
    """Every check that needs only headers and small files (seconds): run it before loading a model.
    Pass the result to `build_browser(prepared=...)`."""
    settings.check()
    inv = read_inventory(Path(checkpoint_dir))
    layout = load_layout(inv)
    overlays = read_overlays([Path(p) for p in usage], layout) if usage else []
    other = None
    if compare_to is not None:
        inv_b = read_inventory(Path(compare_to))
        lay_b = load_layout(inv_b)
        other = (inv_b, lay_b, *expert_maps(inv, layout, inv_b, lay_b, expert_map))
    return Prepared(inv, layout, overlays, other)


def build_browser(checkpoint_dir: Path, out_dir: Path, *, usage: Sequence[Path] = (), compare_to: Path | None = None,
                  expert_map: Path | None = None, output_similarity: Mapping[int, dict] | None = None,
                  settings: BrowseSettings = BrowseSettings(), cache_dir: Path | None = None,
                  progress: bool = True, title: str | None = None, prepared: Prepared | None = None) -> dict:
    """Write `out_dir/index.html` for `checkpoint_dir`; return flat metrics (metrics.json keys).

    usage: usage_stats / expert_scores files (or run dirs) to overlay; compare_to: another checkpoint for the
    diff track; expert_map: its expert_map.json when not beside either checkpoint; output_similarity:
    {layer: {"matrix": E x E, ...}} from `expert_output_similarity` (needs the model); cache_dir: where
    per-shard statistics are kept between runs (None: no cache); prepared: `preflight`'s result for the same
    arguments (otherwise it runs here).
    """
    settings.check()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if prepared is None:
        prepared = preflight(checkpoint_dir, usage=usage, compare_to=compare_to, expert_map=expert_map,
                             settings=settings)
    inv, layout, overlays = prepared.inv, prepared.layout, prepared.overlays
    plan = inv_b = lay_b = None
    if prepared.other is not None:
        inv_b, lay_b, maps, how = prepared.other
        plan = plan_diff(inv, layout, inv_b, lay_b, maps, how, settings.chunk_mb << 20)
    title = title or inv.root.name
    write_page(out_dir, page_data(title, inv, layout, settings=asdict(settings), pending=True))
    inventory_s = time.perf_counter() - t0  # until the page shows the inventory
    log.info("browse: inventory of %d tensors in %d shards (%.2f s) -> %s", len(inv.tensors), len(inv.shards),
             inventory_s, out_dir / "index.html")

    plans = _plans(layout, plan, settings)
    cache = StatsCache(cache_dir)
    # what changes the numbers (not `workers`: results are folded in file order whatever the thread count)
    cache_settings = {**asdict(settings), "near_zero": NEAR_ZERO}
    cache_settings.pop("workers")
    partner_key = plan.key(inv_b) if plan is not None else None
    results: dict[str, ShardResult] = {}
    to_read = []
    for shard in inv.shards.values():
        if not shard.ok:
            continue
        hit = cache.load(shard, cache_settings, partner_key)
        if hit is not None:
            results[shard.name] = hit
        else:
            to_read.append(shard.name)
    read_bytes = sum(inv.shards[s].size for s in to_read)
    t_read = time.perf_counter()
    with ByteProgress(read_bytes, enabled=progress, desc="browse: reading shards") as bar:
        results.update(scan_shards(
            inv, to_read, plans, sigma_steps=settings.sigma_steps, max_bytes=settings.chunk_mb << 20,
            workers=settings.resolved_workers(), on_bytes=bar.update,
            on_shard=lambda s, r: cache.save(inv.shards[s], cache_settings, r, partner_key)))
    read_s = time.perf_counter() - t_read

    merged = _merge(results, inv)
    experts = expert_tracks(layout, merged.tensors, merged.slices)
    full = _full_samples(layout, merged)
    data = page_data(title, inv, layout, settings=asdict(settings), pending=False,
                     tensor_stats=tensor_rows(merged.tensors), experts=experts,
                     similarity=weight_similarity(layout, merged.samples, full),
                     output_similarity=dict(output_similarity or {}), router=router_tracks(inv, layout),
                     overlays=overlays)
    if plan is not None:
        rows = router_row_changes(inv, layout, inv_b, lay_b, plan)
        counts = {i: len(lay.parts) for i, lay in lay_b.layers.items()}
        data["diff"] = diff_tracks(plan, layout, merged.diffs, merged.slice_diffs, rows, counts)
        data["diff"]["other_model_type"] = lay_b.model_type
    page = write_page(out_dir, data)
    wall = time.perf_counter() - t0
    metrics = {
        "browse/page": str(page), "browse/tensors": len(inv.tensors), "browse/shards": len(inv.shards),
        "browse/unreadable_shards": sum(not s.ok for s in inv.shards.values()),
        "browse/checkpoint_bytes": inv.total_bytes, "browse/moe_layers": len(layout.layers),
        "browse/experts_per_layer": layout.num_experts, "browse/shards_read": len(to_read),
        "browse/shards_cached": len(results) - len(to_read), "browse/read_bytes": read_bytes,
        "browse/read_s": round(read_s, 3), "browse/inventory_s": round(inventory_s, 3), "browse/wall_s": round(wall, 3),
        "browse/read_gb_per_s": round(read_bytes / read_s / 1e9, 3) if read_s > 0 and read_bytes else None,
        "browse/problems": len(inv.problems) + len(layout.notes),
    }
    if plan is not None:
        summary = data["diff"]["summary"]
        metrics.update({"browse/diff_compared": summary["compared"], "browse/diff_changed": summary["changed"],
                        "browse/diff_not_compared": summary["not_compared"]})
    return metrics


def _plans(layout: ModelLayout, plan, settings: BrowseSettings) -> dict[str, TensorPlan]:
    plans: dict[str, TensorPlan] = {}
    for lay in layout.layers.values():
        parts = max(1, len(lay.part_names()))
        per_part = max(16, settings.sample_per_expert // parts)
        for expert_parts in lay.parts.values():
            for p in expert_parts:
                plans[p.tensor] = TensorPlan(fused=p.fused, sample=per_part)
    if plan is not None:
        for name, partners in plan.partners.items():
            base = plans.get(name, TensorPlan())
            plans[name] = TensorPlan(fused=base.fused, sample=base.sample, partners=partners)
    return plans


def _merge(results: dict[str, ShardResult], inv: Inventory) -> ShardResult:
    merged = ShardResult()
    for r in results.values():
        merged.tensors.update(r.tensors)
        merged.slices.update(r.slices)
        merged.samples.update(r.samples)
        merged.diffs.update(r.diffs)
        merged.slice_diffs.update(r.slice_diffs)
    for name, meta in inv.tensors.items():
        shard = inv.shards.get(meta.shard)
        if shard is not None and not shard.ok:
            merged.tensors[name] = {"error": f"shard {shard.name} unreadable"}
    return merged


def _full_samples(layout: ModelLayout, merged: ShardResult) -> dict[str, bool]:
    """Which part samples hold every weight of their part (similarity exact, not estimated)."""
    full = {}
    for lay in layout.layers.values():
        for e, parts in lay.parts.items():
            for p in parts:
                key = sample_key(p, e)
                stats = (merged.slices.get(p.tensor) or [None] * (e + 1))[e] if p.fused else merged.tensors.get(p.tensor)
                sample = merged.samples.get(key)
                full[key] = bool(stats and sample is not None and sample.numel() == stats.get("numel"))
    return full
