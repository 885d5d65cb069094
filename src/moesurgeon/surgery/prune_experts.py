"""An expert mask as a checkpoint WITHOUT those experts: exact where the family's scoring allows.

What changes on disk, per MoE layer: the removed experts' tensors are dropped, the kept experts
are renumbered 0..E'-1 in their old order (per-expert tensors renamed; fused tensors such as
gpt_oss `experts.gate_up_proj [E, ...]` sliced on dim 0), every router tensor with one row per
expert (weight, any per-expert router bias) keeps the kept rows, and config.json gets the
adapter's edits for the new expert count (`adapter.expert_count_edits`: every expert-count key
present becomes E', plus what the family's group limit needs).

When is this exact (pruned model == masked model, logits equal)?
- softmax families (qwen2/3, olmoe, mixtral): a -inf logit contributes exp(-inf) = 0 to the softmax,
  so softmax over E experts with some masked IS softmax over the E' others; the top-k and any
  renormalisation follow. Exact.
- gpt_oss: top-k on logits, softmax over the k chosen: a -inf expert is never chosen. Exact.
- families with a group limit (deepseek_v3: contiguous groups of experts, a token chooses only from
  the best few): exact when the limit excludes nothing, or when every group loses the same number
  of experts; otherwise the kept experts regroup: NOT exact, allowed only with `allow_inexact` and
  measured (arch/config_json.py `expert_count_edits` decides, and says why).
On-disk names (per-expert or fused, renamed families) are the adapter's (arch/disk_names.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..arch import ArchAdapter, ExpertCountError, MoELayer
from ..io import CheckpointError, CheckpointReader, Patch
from ..routers.errors import RouterConfigError


@dataclass
class PrunePlan:
    keep: dict[int, list[int]]          # MoE layer index -> kept experts (old numbering, ascending)
    num_experts: int                    # E' in every MoE layer
    exact: bool
    reason: str
    config_edits: dict = field(default_factory=dict)


def plan_prune(adapter: ArchAdapter, config: dict, layers: list[MoELayer], mask: dict[int, list[int]],
               top_k: int) -> PrunePlan:
    """Check that config.json can express the pruned model and decide whether it is exact."""
    removed = {layer.index: sorted(mask.get(layer.index, [])) for layer in layers}
    counts = {i: len(r) for i, r in removed.items()}
    if len(set(counts.values())) != 1:
        raise RouterConfigError(
            f"expert mask removes {counts} experts per MoE layer; a standard config.json has one expert count for "
            "every layer, so prune can only export masks that remove the same number of experts in each MoE layer. "
            "Mask equally many per layer, or export with role_router.export.mode=distill")
    E = layers[0].num_experts
    new = E - next(iter(counts.values()))
    if new == E:
        raise RouterConfigError("the expert mask removes no expert: nothing to prune; set router.experts")
    if new < top_k:
        raise RouterConfigError(f"pruning leaves {new} experts, fewer than top-k={top_k}; mask fewer experts")
    keep = {i: [e for e in range(E) if e not in set(r)] for i, r in removed.items()}
    try:
        config_edits = adapter.expert_count_edits(config, new, removed)
    except ExpertCountError as err:
        raise RouterConfigError(str(err)) from err
    return PrunePlan(keep, new, config_edits.exact, config_edits.reason, config_edits.edits)


def prune_patch(adapter: ArchAdapter, reader: CheckpointReader, layers: list[MoELayer], plan: PrunePlan) -> Patch:
    """The io Patch (drop / add under on-disk names, config edits) that removes the masked experts."""
    patch = Patch(config_edits=dict(plan.config_edits))
    names = list(reader.tensor_names())
    for layer in layers:
        keep, E = plan.keep[layer.index], layer.num_experts
        index = torch.tensor(keep)
        for disk in adapter.router_tensor_names(layer).values():
            if disk in reader and reader.header(disk).shape[:1] == (E,):
                patch.drop.add(disk)
                patch.add[disk] = reader.get(disk).index_select(0, index).contiguous()
        prefix = adapter.expert_disk_prefix(layer.index)
        mine = [n for n in names if n.startswith(prefix)]
        if not mine:
            raise CheckpointError(f"no expert tensors under {prefix!r} in the checkpoint: its key format is not the one "
                                  f"the {adapter.model_type} adapter knows")
        if adapter.expert_disk_suffixes is None:  # fused on disk: slice dim 0 of every [E, ...] tensor
            for n in mine:
                if reader.header(n).shape[:1] == (E,):
                    patch.drop.add(n)
                    patch.add[n] = reader.get(n).index_select(0, index).contiguous()
            continue
        renumber = {old: new for new, old in enumerate(keep)}
        for n in mine:
            parsed = adapter.split_expert_name(n, layer.index)
            if parsed is None:
                continue
            old, rest = parsed
            if old not in renumber:
                patch.drop.add(n)
            elif renumber[old] != old:
                patch.drop.add(n)
                patch.add[adapter.expert_tensor_name(layer.index, renumber[old], rest)] = reader.get(n)
    return patch


def read_config(source_dir: Path) -> dict:
    return json.loads((Path(source_dir) / "config.json").read_text())


def export_pruned(model, adapter: ArchAdapter, source_dir: Path, out_dir: Path, opts, mask: dict[int, list[int]],
                  probe_input_ids: torch.Tensor, allow_inexact: bool = False) -> dict:
    """Write the masked model as a pruned checkpoint; `model` must run with the mask substituted.

    Exact plans are verified by export_patched_model (reload, logits compared with the masked model,
    failure publishes nothing). An inexact plan (deepseek_v3, uneven groups) is refused unless
    `allow_inexact`; then it is written without that check and the deviation is measured and returned.
    """
    from ..export import export_patched_model, verify_reload

    layers = adapter.moe_layers(model)
    top_k = max(adapter.get_top_k(layer) for layer in layers)
    plan = plan_prune(adapter, read_config(source_dir), layers, mask, top_k)
    if not plan.exact and not allow_inexact:
        raise RouterConfigError(
            f"prune export of this mask is not exact for {adapter.model_type}: {plan.reason}. Set "
            "export.allow_inexact=true to write it anyway with the measured deviation, mask evenly across groups, "
            "or use role_router.export.mode=distill")
    with CheckpointReader(source_dir, allow_pickle=opts.allow_pickle) as reader:
        patch = prune_patch(adapter, reader, layers, plan)
    if not plan.exact:
        opts = replace(opts, verify_reload=False)
    if opts.mode == "reuse" and not (Path(source_dir) / "model.safetensors.index.json").exists():
        # A single-file source patched in "reuse" mode keeps model.safetensors next to the new patch shard and
        # index, and transformers then loads model.safetensors alone (missing the renumbered experts).
        # Rewriting everything as indexed shards avoids that; a single-file checkpoint is small anyway.
        opts = replace(opts, mode="full")
    metrics = export_patched_model(model, adapter, source_dir, out_dir, opts, probe_input_ids=probe_input_ids,
                                   extra=patch)
    if not plan.exact:
        metrics["export/max_abs_logit_diff"] = verify_reload(Path(out_dir), model, probe_input_ids)
    metrics.update({"export/exact": plan.exact, "export/exact_reason": plan.reason,
                    "export/num_experts": plan.num_experts,
                    "export/experts_removed_per_layer": layers[0].num_experts - plan.num_experts,
                    "export/tensors_dropped": len(patch.drop), "export/tensors_added": len(patch.add)})
    return metrics
