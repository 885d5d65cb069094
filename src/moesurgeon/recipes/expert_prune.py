"""experiment=expert_prune — score experts, drop the lowest-scored ones per layer, measure, export exactly.

setup (criterion, ratio, pinned experts and the group budget checked from config.json, and any
`expert_prune.scores` file read, before any weight is read; held-out blocks, plus data.train when
scores are computed; model) -> scores: one probed pass over data.train (probe/expert_scores.py:
frequency, gate mass, REAP saliency, output norm; written as expert_scores.safetensors), or the
file of an earlier run -> choose the removed experts (surgery/expert_selection.py: the same count
per layer, per group where routing is group-limited; expert_map.json) -> baseline held-out
perplexity per label -> prune: the removed experts masked out of routing in memory
(ExpertMaskRouter), which is what the pruned checkpoint computes -> the same measurement -> export:
a checkpoint without those experts (surgery/prune_experts.py, exact on every supported family for
a group-balanced prune), reloaded and its logits compared with the masked model
(`export/max_abs_logit_diff`). Figures: expert_scores.png (every criterion, the removed experts crossed
out) and expert_scores_<criterion>_by_label.png. criterion=random needs no scores but still computes them when data.train
is set (for the file); data.train.path=null or expert_prune.scores=PATH skips that pass.
Settings: `expert_prune.*` (ExpertPruneSettings, recipes/settings.py).
"""

from __future__ import annotations

import json
import logging

from ..errors import ConfigError
from ..evaluate import evaluate_perplexity
from ..routers import ExpertMaskRouter, substitute_routers
from ..run_context import RunContext
from ..surgery import export_pruned
from ..surgery.expert_selection import choose_removed, plan_budget
from .expert_scoring import moe_layers_as_planned, record_change, scores_of_run, stored_scores
from .score_figures import draw_scores
from .settings import ExpertPruneSettings

log = logging.getLogger("moesurgeon")

__all__ = ["run"]


def run(ctx: RunContext, settings: ExpertPruneSettings) -> dict:
    # ---- setup: everything that needs no weights first
    adapter, config = ctx.adapter, ctx.model_config
    budget = plan_budget(adapter, config, settings.criterion, settings.ratio, settings.keep, settings.seed)
    stored = stored_scores("expert_prune.scores", settings.scores, budget.num_experts)
    compute = stored is None and (settings.criterion != "random" or ctx.data.train.path is not None)
    if compute and ctx.data.train.path is None:
        raise ConfigError(f"expert_prune.criterion={settings.criterion} needs expert scores: set data.train.path=FILE "
                          "(scored in one probed pass) or expert_prune.scores=PATH of an earlier expert_prune run")
    model, _, blocks = ctx.load(splits=("heldout", "train") if compute else ("heldout",))
    heldout, bs, out_dir = blocks["heldout"], ctx.batch_size, ctx.out_dir
    layers, names = moe_layers_as_planned(adapter, model, budget.layers)
    metrics: dict = {"criterion": settings.criterion, "ratio": settings.ratio, "num_experts_before": budget.num_experts,
                     "num_experts_after": budget.kept, "experts_removed_per_layer": budget.remove,
                     "groups": budget.groups}

    # ---- scores
    scores = scores_of_run(f"expert_prune.scores={settings.scores}", stored, compute, model, adapter,
                           blocks.get("train"), bs, ctx.progress, names, out_dir, metrics)
    table = scores.criterion(settings.criterion) if settings.criterion != "random" else None
    removed = choose_removed(budget, table)
    expert_map = {layer.router_name: [e for e in range(budget.num_experts) if e not in removed[layer.index]]
                  for layer in layers}
    (out_dir / "expert_map.json").write_text(json.dumps(expert_map, indent=1) + "\n")
    for layer in layers:
        log.info("%s: removing experts %s (%s)", layer.router_name, removed[layer.index], settings.criterion)
    if scores is not None and settings.figures:
        draw_scores(scores, out_dir, removed_rows={row: removed[layer.index] for row, layer in enumerate(layers)},
                    criterion=settings.criterion if settings.criterion != "random" else None,
                    what=f"expert_prune criterion={settings.criterion} ratio={settings.ratio:g}")

    # ---- baseline
    before = evaluate_perplexity(model, heldout, bs, ctx.progress, desc="before", by_label=True)

    # ---- prune (masked in memory: what the pruned checkpoint computes), measure, export
    swap = substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, removed[layer.index]))
    try:
        after = evaluate_perplexity(model, heldout, bs, ctx.progress, desc="pruned", by_label=True)
        record_change(metrics, before, after)
        if ctx.export.enabled:
            metrics.update(export_pruned(model, adapter, ctx.source_dir, ctx.export.dir, ctx.export.options, removed,
                                         heldout.input_ids[:2]))
            (ctx.export.dir / "expert_map.json").write_text(json.dumps(expert_map, indent=1) + "\n")
            metrics["export/done"] = True
    finally:
        swap.restore()
    return metrics

