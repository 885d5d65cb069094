"""experiment=expert_grow — add N experts to every MoE layer, check what the grown model computes, export it.

setup (add, init, router rule and the group structure checked from config.json, the checkpoint's
expert / router / bias tensors found in its headers, any `expert_grow.scores` file read, before any
weight is read; held-out blocks, plus data.train when clone inits need scores; model) -> scores:
selection frequency from one probed pass over data.train (probe/expert_scores.py, written as
expert_scores.safetensors) or the file of an earlier run; clone inits copy the most-used experts ->
baseline held-out perplexity per label -> grow (surgery/expert_grow.py): the new tensors as an io
patch (renamed and clone_top tensors as byte ranges of the source, noisy / random / fused tensors
computed when written), written as a checkpoint with E+N experts through export_patched_model (io
verifies every written value; a plan exact by construction is reloaded and compared with the source
before it is published), clone_top copies compared bit for bit with their parents, reloaded ->
measure: the reloaded checkpoint IS the in-memory grown model (transformers cannot resize experts in
place), so it is compared with the source model on every held-out token
(`grow/max_abs_logit_diff_vs_source`, and the share of routed top-k slots that chose an added expert)
and its perplexity measured. With export.enabled=false the checkpoint goes to a temporary directory
in the run dir and is removed at the end.

Router rows of the added experts (the function-preservation question, surgery/expert_grow.py):
`expert_grow.router=mute` (default: never chosen where a per-expert bias allows it, exact on gpt_oss and
deepseek_v3; zero rows on bias-less routers, measured) or `live` (parent rows: clones tie with their
parents). Settings: `expert_grow.*` (ExpertGrowSettings, recipes/settings.py).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..block_runner import run_blocks
from ..errors import ConfigError
from ..evaluate import evaluate_perplexity
from ..export import ExportVerificationError
from ..io import CheckpointReader
from ..models import input_device
from ..run_context import RunContext
from ..surgery.expert_grow import check_clones, check_grow_source, choose_parents, export_grown, grow_patch, plan_grow
from .expert_scoring import moe_layers_as_planned, record_change, scores_of_run, stored_scores
from .settings import ExpertGrowSettings

log = logging.getLogger("moesurgeon")

__all__ = ["run"]


def run(ctx: RunContext, settings: ExpertGrowSettings) -> dict:
    # ---- setup: everything that needs no weights first
    adapter, config, allow_pickle = ctx.adapter, ctx.model_config, ctx.export.options.allow_pickle
    plan = plan_grow(adapter, config, settings.add, settings.init, settings.router, settings.noise, settings.seed)
    with CheckpointReader(ctx.source_dir, allow_pickle=allow_pickle) as reader:
        plan = check_grow_source(adapter, reader, plan)
    needs_scores = plan.init != "random"
    stored = stored_scores("expert_grow.scores", settings.scores if needs_scores else None, plan.num_experts)
    compute = needs_scores and stored is None
    if compute and ctx.data.train.path is None:
        raise ConfigError(f"expert_grow.init={plan.init} copies the most-used experts and needs their frequency: set "
                          "data.train.path=FILE (scored in one probed pass) or expert_grow.scores=PATH of an earlier "
                          "expert_prune / expert_grow run")
    model, _, blocks = ctx.load(splits=("heldout", "train") if compute else ("heldout",))
    heldout, bs, out_dir = blocks["heldout"], ctx.batch_size, ctx.out_dir
    layers, names = moe_layers_as_planned(adapter, model, plan.layers)
    metrics: dict = {"init": plan.init, "router": plan.router, "add": plan.add, "num_experts_before": plan.num_experts,
                     "num_experts_after": plan.layout.num_experts, "groups": plan.layout.groups,
                     "grow/exact_by_construction": plan.exact, "grow/reason": plan.exact_reason}
    log.info("grow %d -> %d experts per layer (%s; %s)", plan.num_experts, plan.layout.num_experts,
             plan.layout.reason, plan.exact_reason)

    # ---- scores (clone inits: the parents are the most-used experts)
    scores = scores_of_run(f"expert_grow.scores={settings.scores}", stored, compute, model, adapter,
                           blocks.get("train"), bs, ctx.progress, names, out_dir, metrics)
    parents = choose_parents(plan, scores.criterion("frequency") if scores is not None else None)
    expert_map = {layer.router_name: {"source": _sources(plan), "parents": {
        str(p): parent for p, parent in zip(plan.layout.new_positions, parents[layer.index], strict=True)}}
        for layer in layers}
    (out_dir / "expert_map.json").write_text(json.dumps(expert_map, indent=1) + "\n")
    for layer in layers:
        log.info("%s: added experts %s from %s (%s)", layer.router_name, list(plan.layout.new_positions),
                 parents[layer.index], plan.init)

    # ---- baseline
    before = evaluate_perplexity(model, heldout, bs, ctx.progress, desc="before", by_label=True)

    # ---- grow: written (io checks every value; exact plans also reloaded vs the source), clones checked, reloaded
    with CheckpointReader(ctx.source_dir, allow_pickle=allow_pickle) as reader:
        patch = grow_patch(adapter, reader, plan, parents)  # lazy values: byte ranges, tensors computed when written
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".grown-") as scratch:
        target = ctx.export.dir if ctx.export.enabled else Path(scratch) / "checkpoint"
        exported = export_grown(model, adapter, ctx.source_dir, target, ctx.export.options, plan, patch,
                                heldout.input_ids[:2])
        if plan.init == "clone_top":
            metrics["grow/clone_tensors_bit_exact"] = check_clones(adapter, target, ctx.source_dir, plan, parents,
                                                                   allow_pickle)
        if ctx.export.enabled:
            metrics.update(exported)
            (target / "expert_map.json").write_text(json.dumps(expert_map, indent=1) + "\n")
            metrics["export/done"] = True
        grown = AutoModelForCausalLM.from_pretrained(target, dtype=model.dtype).to(input_device(model)).eval()
        counts = {layer.num_experts for layer in adapter.moe_layers(grown)}
        if counts != {plan.layout.num_experts}:
            raise ExportVerificationError(f"the grown checkpoint {target} reloads with {sorted(counts)} experts per "
                                          f"MoE layer, expected {plan.layout.num_experts}")

        # ---- measure: the reloaded checkpoint is the grown model, compared with the source on every held-out token
        diff, share = compare_with_source(grown, model, adapter, heldout, bs, plan.layout.new_positions)
        metrics["grow/max_abs_logit_diff_vs_source"] = diff
        metrics.update({f"grow/new_expert_share/{name}": v for name, v in share.items()})
        after = evaluate_perplexity(grown, heldout, bs, ctx.progress, desc="grown", by_label=True)
        del grown
    log.info("max |logit diff| grown vs source on held-out: %.3g; token slots on added experts: %s", diff,
             {k: round(v, 4) for k, v in share.items()})
    record_change(metrics, before, after, digits=2)
    return metrics


@torch.no_grad()
def compare_with_source(grown, source, adapter, blocks, batch_size: int, new_positions) -> tuple[float, dict]:
    """(max |logit difference| over the real tokens of `blocks`, {router: share of its top-k slots that chose an
    added expert}): the grown model runs through run_blocks, the source on the same batch beside it."""
    layers = adapter.moe_layers(grown)
    added = torch.tensor(sorted(new_positions))
    chosen = {layer.router_name: [0, 0] for layer in layers}
    worst = torch.zeros((), dtype=torch.float64)

    def count(layer):
        def hook(module, inputs, output, batch) -> None:
            indices = adapter.routing(layer, output).indices
            real = batch.real(indices.device)
            picked = indices[real]
            chosen[layer.router_name][0] += int(torch.isin(picked, added.to(picked.device)).sum())
            chosen[layer.router_name][1] += picked.numel()
        return hook

    def compare(batch, output) -> None:
        nonlocal worst
        expected = source(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        diff = (output.logits.float() - expected).abs().amax(dim=-1)[batch.attention_mask.bool()]
        worst = torch.maximum(worst, diff.max().double().cpu())

    run_blocks(grown, blocks, batch_size, hooks=[(layer.router, count(layer)) for layer in layers], on_output=compare)
    return float(worst), {name: n / max(total, 1) for name, (n, total) in chosen.items()}


def _sources(plan) -> list[int | None]:
    """The source index of every expert of the grown layer, in its order; null for an added expert."""
    out: list[int | None] = [None] * plan.layout.num_experts
    for e, position in enumerate(plan.layout.old_positions):
        out[position] = e
    return out
