"""experiment=expert_merge — cluster similar experts per layer, merge each cluster into one, measure, export exactly.

setup (ratio, similarity, linkage, router rule, calibration size and the group budget checked from
config.json, and any `expert_merge.scores` file read, before any weight is read; held-out blocks,
plus data.train when scores or output features are computed; model) -> scores: one probed pass over
data.train (probe/expert_scores.py; how often each expert is chosen weights the average), or the
file of an earlier expert_prune / expert_merge run -> features and distances
(surgery/expert_clusters.py: mean expert output on the same calibration tokens, weights, or router
rows; 1 - cosine) -> clusters (hierarchical, the same count per layer, per group where routing is
group-limited; merge_clusters.json and expert_map.json) -> baseline held-out perplexity per label ->
merge (surgery/expert_merge.py: frequency-weighted average into the most-used member's slot, its
router row by `router_rule`, the other members masked out of routing: what the merged checkpoint
computes) -> the same measurement -> export: the checkpoint without the merged-away experts, in the
source's on-disk format, reloaded and its logits compared with the in-memory merged model.
Settings: `expert_merge.*` (ExpertMergeSettings, recipes/settings.py).
"""

from __future__ import annotations

import json
import logging
import time

from ..errors import ConfigError
from ..evaluate import evaluate_perplexity
from ..routers import ExpertMaskRouter, substitute_routers
from ..run_context import RunContext
from ..surgery.expert_clusters import LINKAGES, cluster_experts, output_distances, router_distances, weight_distances
from ..surgery.expert_merge import ROUTER_RULES, export_merged, merge_in_memory, plan_merge
from ..surgery.expert_selection import PruneBudget, plan_budget
from .expert_scoring import moe_layers_as_planned, record_change, scores_of_run, stored_scores
from .settings import ExpertMergeSettings

log = logging.getLogger("moesurgeon")

__all__ = ["SIMILARITIES", "run"]

SIMILARITIES = ("output", "weight", "router")


def run(ctx: RunContext, settings: ExpertMergeSettings) -> dict:
    # ---- setup: everything that needs no weights first
    adapter, config = ctx.adapter, ctx.model_config
    budget = _check_settings(settings, adapter, config)
    stored = stored_scores("expert_merge.scores", settings.scores, budget.num_experts)
    if (stored is None or settings.similarity == "output") and ctx.data.train.path is None:
        need = "expert frequencies (the merge weights)" if stored is None else "calibration tokens (similarity=output)"
        raise ConfigError(f"expert_merge needs {need} from data.train: set data.train.path=FILE"
                          + (" or expert_merge.scores=PATH of an earlier run" if stored is None else
                             ", or cluster by expert_merge.similarity=weight or router"))
    splits = ("heldout", "train") if ctx.data.train.path is not None and (
        stored is None or settings.similarity == "output") else ("heldout",)
    model, _, blocks = ctx.load(splits=splits)
    heldout, bs, out_dir = blocks["heldout"], ctx.batch_size, ctx.out_dir
    layers, names = moe_layers_as_planned(adapter, model, budget.layers)
    metrics: dict = {"similarity": settings.similarity, "linkage": settings.linkage,
                     "router_rule": settings.router_rule, "ratio": settings.ratio,
                     "num_experts_before": budget.num_experts, "num_experts_after": budget.kept,
                     "experts_merged_away_per_layer": budget.remove, "groups": budget.groups}

    # ---- scores (how often each expert is chosen: the merge weights and the representatives)
    scores = scores_of_run(f"expert_merge.scores={settings.scores}", stored, stored is None, model, adapter,
                           blocks.get("train"), bs, ctx.progress, names, out_dir, metrics)

    # ---- features -> distances -> clusters
    t0 = time.perf_counter()
    if settings.similarity == "output":
        found = output_distances(model, adapter, blocks["train"], settings.calib_tokens, bs, ctx.progress)
        distances = found.mean_distance
        metrics["calib_tokens"] = found.tokens
    elif settings.similarity == "weight":
        distances = weight_distances(model, adapter)
    else:
        distances = router_distances(model, adapter)
    clusters = {i: cluster_experts(d, budget.kept, settings.linkage, budget.groups) for i, d in distances.items()}
    metrics["features/seconds"] = time.perf_counter() - t0
    plans = plan_merge(clusters, scores.criterion("frequency"), layers)
    _write_maps(out_dir, plans)
    sizes = [len(c) for p in plans.values() for c in p.clusters]
    metrics.update({"clusters/per_layer": budget.kept, "clusters/largest": max(sizes),
                    "clusters/singletons_per_layer": sum(s == 1 for s in sizes) / len(plans)})
    for plan in plans.values():
        log.info("%s: clusters %s", plan.router_name, [c for c in plan.clusters if len(c) > 1])

    # ---- baseline
    before = evaluate_perplexity(model, heldout, bs, ctx.progress, desc="before", by_label=True)

    # ---- merge in memory (what the merged checkpoint computes), measure, export
    metrics.update(merge_in_memory(model, adapter, plans, settings.router_rule, ctx.source_dir,
                                   ctx.export.options.allow_pickle))
    swap = substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter,
                                                                              plans[layer.index].removed))
    try:
        after = evaluate_perplexity(model, heldout, bs, ctx.progress, desc="merged", by_label=True)
        record_change(metrics, before, after)
        if ctx.export.enabled:
            metrics.update(export_merged(model, adapter, ctx.source_dir, ctx.export.dir, ctx.export.options, plans,
                                         settings.router_rule, heldout.input_ids[:2]))
            _write_maps(ctx.export.dir, plans)
            metrics["export/done"] = True
    finally:
        swap.restore()
    return metrics


def _check_settings(settings: ExpertMergeSettings, adapter, config: dict) -> PruneBudget:
    """The clusters-per-layer budget (expert_selection.plan_budget: ratio, top-k, group balance) and the choices."""
    if settings.similarity not in SIMILARITIES:
        raise ConfigError(f"expert_merge.similarity={settings.similarity!r}: expected one of {list(SIMILARITIES)}")
    if settings.linkage not in LINKAGES:
        raise ConfigError(f"expert_merge.linkage={settings.linkage!r}: expected one of {list(LINKAGES)}")
    if settings.router_rule not in ROUTER_RULES:
        raise ConfigError(f"expert_merge.router_rule={settings.router_rule!r}: expected one of {list(ROUTER_RULES)}")
    calib = settings.calib_tokens
    if isinstance(calib, bool) or not isinstance(calib, int) or calib < 2:
        raise ConfigError(f"expert_merge.calib_tokens={calib!r}: expected an integer >= 2 (calibration tokens every "
                          "expert runs on for similarity=output), e.g. 512")
    return plan_budget(adapter, config, "frequency", settings.ratio, setting="expert_merge", verb="merges")


def _write_maps(directory, plans) -> None:
    """expert_map.json (router -> source index of each kept slot) and merge_clusters.json (router -> clusters,
    representative first, in slot order)."""
    expert_map = {p.router_name: p.kept for p in plans.values()}
    clusters = {p.router_name: p.clusters for p in plans.values()}
    (directory / "expert_map.json").write_text(json.dumps(expert_map, indent=1) + "\n")
    lines = [f" {json.dumps(router)}: {json.dumps(c)}" for router, c in clusters.items()]  # one layer per line
    (directory / "merge_clusters.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
