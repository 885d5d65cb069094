"""An expert mask as a checkpoint WITHOUT those experts: exact where the family's scoring allows.

What changes on disk, per MoE layer: the removed experts' tensors are dropped, the kept experts
are renumbered 0..E'-1 in their old order (per-expert tensors renamed; fused tensors such as
gpt_oss `experts.gate_up_proj [E, ...]` sliced on dim 0), every router tensor with one row per
expert (weight, gpt_oss bias, deepseek e_score_correction_bias) keeps the kept rows, and every
expert-count key present in config.json (`num_experts`, `num_local_experts`, `n_routed_experts`)
becomes E'.

When is this exact (pruned model == masked model, logits equal)?
- softmax families (qwen2/3, olmoe, mixtral): a -inf logit contributes exp(-inf) = 0 to the softmax,
  so softmax over E experts with some masked IS softmax over the E' others; the top-k and any
  renormalisation follow. Exact.
- gpt_oss: top-k on logits, softmax over the k chosen: a -inf expert is never chosen. Exact.
- deepseek_v3 (sigmoid, group-limited: experts are split into n_group contiguous groups, a token
  may only use the best topk_group groups, a group scored by its best two experts):
  * topk_group >= n_group: the group limit selects nothing out; the pruned config gets
    n_group = topk_group = 1. Exact.
  * every group loses the same number of experts and keeps >= 2: groups stay aligned after
    renumbering and score the same. Exact.
  * otherwise the kept experts fall into different groups than before: NOT exact. Allowed only with
    `allow_inexact` (and only if n_group divides E'); the caller measures and reports the deviation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..arch import ArchAdapter, MoELayer
from ..io import CheckpointError, CheckpointReader, Patch
from ..routers.errors import RouterConfigError


@dataclass
class PrunePlan:
    keep: dict[int, list[int]]          # MoE layer index -> kept experts (old numbering, ascending)
    num_experts: int                    # E' in every MoE layer
    exact: bool
    reason: str
    config_edits: dict = field(default_factory=dict)


def _group_settings(config: dict) -> tuple[int, int] | None:
    groups, keep = config.get("n_group"), config.get("topk_group")
    if groups is None or keep is None or int(groups) <= 1:
        return None
    return int(groups), int(keep)


def plan_prune(adapter: ArchAdapter, config: dict, layers: list[MoELayer], mask: dict[int, list[int]],
               top_k: int) -> PrunePlan:
    """Check that config.json can express the pruned model and decide whether it is exact."""
    removed = {layer.index: sorted(mask.get(layer.index, [])) for layer in layers}
    counts = {i: len(r) for i, r in removed.items()}
    if len(set(counts.values())) != 1:
        raise RouterConfigError(
            f"expert mask removes {counts} experts per MoE layer; a standard config.json has one expert count for "
            "every layer, so prune can only export masks that remove the same number of experts in each MoE layer. "
            "Mask equally many per layer, or export with export.mode=distill")
    E = layers[0].num_experts
    new = E - next(iter(counts.values()))
    if new == E:
        raise RouterConfigError("the expert mask removes no expert: nothing to prune; set router.experts")
    if new < top_k:
        raise RouterConfigError(f"pruning leaves {new} experts, fewer than top-k={top_k}; mask fewer experts")
    keep = {i: [e for e in range(E) if e not in set(r)] for i, r in removed.items()}
    edits = {key: new for key in adapter.num_experts_keys if config.get(key) is not None}
    if not edits:
        raise RouterConfigError(f"config.json has none of the expert-count keys {adapter.num_experts_keys}")
    groups = _group_settings(config)
    if groups is None:
        return PrunePlan(keep, new, True, f"{adapter.scoring} routing over the remaining experts", edits)
    n_group, topk_group = groups
    if topk_group >= n_group:
        edits.update(n_group=1, topk_group=1)
        return PrunePlan(keep, new, True, f"topk_group={topk_group} >= n_group={n_group}: the group limit excludes "
                                          "nothing, so the pruned config uses one group", edits)
    size = E // n_group
    per_group = {tuple(sum(1 for e in r if e // size == g) for g in range(n_group)) for r in removed.values()}
    balanced = len(per_group) == 1 and len(set(next(iter(per_group)))) == 1
    if balanced and size - next(iter(per_group))[0] >= 2:
        return PrunePlan(keep, new, True, f"each of the {n_group} groups loses the same number of experts, so "
                                          "groups stay aligned", edits)
    if new % n_group != 0:
        raise RouterConfigError(
            f"pruning leaves {new} experts, which n_group={n_group} does not divide: group-limited routing "
            f"(deepseek_v3) cannot hold that. Mask a multiple of {n_group} experts, the same number in each group of "
            f"{size}, for an exact export; or export with export.mode=distill")
    return PrunePlan(keep, new, False, f"the mask removes experts unevenly across the {n_group} groups (removed per "
                                       f"group: {sorted(per_group)}), so pruned experts regroup and the group limit "
                                       f"(topk_group={topk_group}) picks differently", edits)


def _disk_block_prefix(adapter: ArchAdapter, layer: MoELayer) -> str:
    if adapter.disk_block_attr is None:
        return layer.block_name
    return layer.block_name.rsplit(".", 1)[0] + "." + adapter.disk_block_attr


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
        prefix = _disk_block_prefix(adapter, layer) + ".experts."
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
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
        for n in mine:
            m = pattern.match(n)
            if m is None:
                continue
            old = int(m.group(1))
            if old not in renumber:
                patch.drop.add(n)
            elif renumber[old] != old:
                patch.drop.add(n)
                patch.add[f"{prefix}{renumber[old]}.{m.group(2)}"] = reader.get(n)
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
            "or use export.mode=distill")
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
