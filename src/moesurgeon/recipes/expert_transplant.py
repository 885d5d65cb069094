"""experiment=expert_transplant — copy chosen experts from a donor checkpoint into the same slots, measure, export.

setup (the donor: a checkpoint of the same family, expert count, MoE layers and on-disk shapes of
every tensor involved, and not the target itself; the experts in range; all from config.json and
safetensors headers, before any weight is read; held-out blocks; model) -> baseline held-out
perplexity per label -> transplant in memory (surgery/expert_transplant.py: the donor loaded with
transformers, its slots copied into every experts parameter with dim 0 = E, and with
`expert_transplant.routers` into the router rows and per-expert router biases) -> the same
measurement -> export: only the touched tensors replaced (the donor's bytes; fused-on-disk tensors
with the donor's rows), reloaded and compared with the in-memory model (`export/max_abs_logit_diff`).
`transplant/max_abs_logit_diff_vs_target`: how far the transplanted model moved from the target on
two held-out blocks. Settings: `expert_transplant.*` (ExpertTransplantSettings, recipes/settings.py).
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from ..evaluate import evaluate_perplexity
from ..export import export_patched_model
from ..models import input_device
from ..run_context import RunContext
from ..surgery.expert_transplant import copy_donor_experts, plan_transplant, transplant_patch
from .expert_scoring import record_change
from .settings import ExpertTransplantSettings

log = logging.getLogger("moesurgeon")

__all__ = ["run"]


def run(ctx: RunContext, settings: ExpertTransplantSettings) -> dict:
    # ---- setup: everything that needs no weights first
    adapter = ctx.adapter
    plan = plan_transplant(adapter, ctx.source_dir, ctx.model_config, settings.donor, settings.experts,
                           settings.routers, allow_pickle=ctx.export.options.allow_pickle)
    model, _, blocks = ctx.load(splits=("heldout",))
    heldout, bs = blocks["heldout"], ctx.batch_size
    loaded = [layer.index for layer in adapter.moe_layers(model)]
    if not set(plan.experts) <= set(loaded):
        raise ConfigError(f"the loaded model's MoE layers {loaded} differ from the ones its config.json describes; "
                          "check the checkpoint")
    metrics: dict = {"donor": str(plan.donor_dir), "routers": plan.routers,
                     "experts": {str(k): v for k, v in plan.experts.items()},
                     "transplant/experts_total": sum(len(v) for v in plan.experts.values()),
                     "transplant/tensors_replaced": len(plan.rows)}
    for layer, slots in plan.experts.items():
        log.info("layer %d: experts %s from %s%s", layer, slots, plan.donor_dir, " (with router rows)" * plan.routers)

    # ---- baseline
    before = evaluate_perplexity(model, heldout, bs, ctx.progress, desc="before", by_label=True)
    probe = heldout.input_ids[:2]
    with torch.no_grad():
        target_logits = model(input_ids=probe.to(input_device(model))).logits.float()

    # ---- transplant in memory, measure
    metrics["transplant/tensors_changed_in_memory"] = copy_donor_experts(model, adapter, plan)
    with torch.no_grad():
        moved = model(input_ids=probe.to(input_device(model))).logits.float() - target_logits
    metrics["transplant/max_abs_logit_diff_vs_target"] = float(moved.abs().max())
    after = evaluate_perplexity(model, heldout, bs, ctx.progress, desc="transplanted", by_label=True)
    record_change(metrics, before, after, digits=2)

    # ---- export: only the touched tensors, verified by reload against the in-memory model
    if ctx.export.enabled:
        metrics.update(export_patched_model(model, adapter, ctx.source_dir, ctx.export.dir, ctx.export.options,
                                            probe_input_ids=probe, extra=transplant_patch(plan)))
        metrics["export/done"] = True
    return metrics
