"""An expert mask as a checkpoint WITHOUT those experts: exact where the family's scoring allows.

What changes on disk, per MoE layer: the removed experts' tensors are dropped, the kept experts
are renumbered 0..E'-1 in their old order (per-expert tensors renamed; fused tensors such as
gpt_oss `experts.gate_up_proj [E, ...]` sliced on dim 0), every router tensor with one row per
expert (weight, any per-expert router bias) keeps the kept rows, and config.json gets the
adapter's edits for the new expert count (`adapter.expert_count_edits`: every expert-count key
present becomes E', plus what the family's group limit needs).

Nothing is loaded to do it: a renamed expert is one byte range of its source shard, a sliced
tensor one range per run of kept rows (`io.SourceBytes`), streamed by the writer, so a prune holds
about one chunk in memory whatever the model size. Two entry points share the plan and the patch:
`export_pruned` (a loaded model whose mask is substituted; the export is reloaded and compared) and
`prune_checkpoint` (config.json and the shard headers only, no model). `values=` replaces the disk
content of chosen tensors (SOURCE numbering) before the slice / rename: how a merge writes merged
experts and new router rows into the kept slots. A value may be an `io.ComputedTensor` (computed by
the writer when it writes that tensor, then dropped; a fused one is sliced then too), so a merge
holds about one tensor instead of all merged ones.

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
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..arch import ArchAdapter, ExpertCountError, MoELayer
from ..io import CheckpointError, CheckpointReader, ComputedTensor, Patch, WriteReport, rows_source, tensor_source
from ..io import write_patched_checkpoint
from ..io.output_checks import check_output_location
from ..io.lazy_sources import PatchValue, value_spec
from ..routers.errors import RouterConfigError


@dataclass
class PrunePlan:
    keep: dict[int, list[int]]          # MoE layer index -> kept experts (old numbering, ascending)
    num_experts: int                    # E' in every MoE layer
    exact: bool
    reason: str
    config_edits: dict = field(default_factory=dict)
    source_experts: int = 0             # E in every MoE layer of the source


def plan_removal(adapter: ArchAdapter, config: dict, layer_indices: Sequence[int], num_experts: int,
                 removed: dict[int, list[int]], top_k: int) -> PrunePlan:
    """Check that config.json can express removing `removed[layer]` experts (old numbering) from MoE layers
    `layer_indices` of `num_experts` each, and decide whether the result is exact. Shared by both entry points."""
    E = int(num_experts)
    stray = sorted(set(removed) - set(layer_indices))
    if stray:
        raise RouterConfigError(f"expert mask names layers {stray}, which are not MoE layers of this "
                                f"{adapter.model_type} model (MoE layers: {list(layer_indices)}); key the mask by "
                                "MoE layer index")
    for index, experts in removed.items():
        bad = sorted({int(e) for e in experts if not 0 <= int(e) < E})
        if bad or len(set(experts)) != len(experts):
            what = f"experts {bad} out of range 0..{E - 1}" if bad else f"repeated experts in {sorted(experts)}"
            raise RouterConfigError(f"expert mask for layer {index}: {what}; list each removed expert once, as an "
                                    f"index below the {E} experts per layer")
    drop = {i: sorted(int(e) for e in removed.get(i, [])) for i in layer_indices}
    counts = {i: len(r) for i, r in drop.items()}
    if len(set(counts.values())) != 1:
        raise RouterConfigError(
            f"expert mask removes {counts} experts per MoE layer; a standard config.json has one expert count for "
            "every layer, so prune can only export masks that remove the same number of experts in each MoE layer. "
            "Mask equally many per layer, or export with role_router.export.mode=distill")
    new = E - next(iter(counts.values()))
    if new == E:
        raise RouterConfigError("the expert mask removes no expert: nothing to prune; set router.experts")
    if new < top_k:
        raise RouterConfigError(f"pruning leaves {new} experts, fewer than top-k={top_k}; mask fewer experts")
    keep = {i: [e for e in range(E) if e not in set(r)] for i, r in drop.items()}
    try:
        edits = adapter.expert_count_edits(config, new, drop)
    except ExpertCountError as err:
        raise RouterConfigError(str(err)) from err
    return PrunePlan(keep, new, edits.exact, edits.reason, edits.edits, E)


def plan_prune(adapter: ArchAdapter, config: dict, layers: list[MoELayer], mask: dict[int, list[int]],
               top_k: int) -> PrunePlan:
    """`plan_removal` for a loaded model's MoE layers."""
    return plan_removal(adapter, config, [layer.index for layer in layers], layers[0].num_experts, mask, top_k)


def plan_from_config(adapter: ArchAdapter, config: dict, removed: dict[int, list[int]]) -> PrunePlan:
    """`plan_removal` from config.json alone: its MoE layers, expert count and top-k."""
    adapter.check_config(config)
    top_k = config.get(adapter.top_k_key) or adapter.default_top_k()
    return plan_removal(adapter, config, adapter.moe_layer_indices(config), adapter.num_experts_from_config(config),
                        removed, int(top_k))


def prune_patch(adapter: ArchAdapter, reader: CheckpointReader, layers: Sequence[MoELayer | int], plan: PrunePlan, *,
                values: dict[str, torch.Tensor | ComputedTensor] | None = None) -> Patch:
    """The io Patch (drop / add under on-disk names, config edits) that removes the masked experts.

    layers: the MoE layers (loaded `MoELayer`s or bare layer indices). Renamed and sliced tensors are lazy
    byte ranges of the source. values: {on-disk name: full tensor in SOURCE numbering, on-disk dtype and
    shape} replacing the disk content before the slice / rename (e.g. merged expert weights and new router
    rows in the kept slots); a tensor the prune does not touch is replaced as it is. A ComputedTensor value
    stays lazy (renamed as it is, sliced by `ComputedTensor.rows`): nothing is computed here.
    """
    values = _checked_values(reader, values or {})
    E = plan.source_experts
    patch = Patch(config_edits=dict(plan.config_edits))
    names = reader.tensor_names()
    done: set[str] = set()
    for index in (layer if isinstance(layer, int) else layer.index for layer in layers):
        keep = plan.keep[index]
        renumber = {old: new for new, old in enumerate(keep)}
        router, experts = _layer_prefixes(adapter, names, index)
        mine = [n for n in names if n.startswith(experts)]
        for n in [n for n in names if n.startswith(router)] + mine:
            done.add(n)
            parsed = adapter.split_expert_name(n, index)
            if parsed is None:  # a router tensor or a fused expert tensor: one row per expert, kept rows sliced
                _slice_rows(reader, n, E, keep, values.get(n), patch)
                continue
            old, rest = parsed
            if old not in range(E):
                raise CheckpointError(f"{n}: expert {old} on disk, but config.json says {E} experts per layer; "
                                      "the checkpoint and its config.json disagree")
            if old not in renumber:
                if n in values:
                    raise CheckpointError(f"values[{n!r}]: expert {old} of layer {index} is removed by this prune, "
                                          "so its value would be dropped; give values for kept experts only")
                patch.drop.add(n)
            elif renumber[old] != old:
                patch.drop.add(n)
                new = adapter.expert_tensor_name(index, renumber[old], rest)
                patch.add[new] = values[n] if n in values else tensor_source(reader, n)
            elif n in values:
                patch.replace[n] = values[n]
    patch.replace.update({n: v for n, v in values.items() if n not in done})  # tensors the prune leaves alone
    return patch


def _layer_prefixes(adapter: ArchAdapter, names: list[str], index: int) -> tuple[str, str]:
    """(router prefix, expert prefix) of MoE layer `index` as this checkpoint names them, from config alone: the
    adapter's on-disk block (hub checkpoints, `adapter.disk_name`), else the in-memory block name that a fused
    transformers-5 save (`save_original_format=False`) keeps, e.g. mixtral `mlp` instead of `block_sparse_moe`."""
    blocks = [adapter.disk_block_prefix(index), f"{adapter.disk_layers_prefix}.{int(index)}.{adapter.block_attr}"]
    for block in dict.fromkeys(blocks):
        if any(n.startswith(f"{block}.{adapter.experts_attr}.") for n in names):
            return f"{block}.{adapter.router_attr}.", f"{block}.{adapter.experts_attr}."
    raise CheckpointError(f"no expert tensors under {' or '.join(repr(b + '.experts.') for b in blocks)} in the "
                          f"checkpoint: its key format is not one the {adapter.model_type} adapter knows")


def _checked_values(reader: CheckpointReader, values: dict[str, PatchValue]) -> dict[str, PatchValue]:
    """The values checked against the headers (declared dtype/shape for a ComputedTensor, never computed)."""
    for name, value in values.items():
        if not isinstance(value, (torch.Tensor, ComputedTensor)):
            raise CheckpointError(f"values[{name!r}] is a {type(value).__name__}; expected a torch.Tensor or an "
                                  "io.ComputedTensor")
        if name not in reader:
            raise CheckpointError(f"values[{name!r}]: the checkpoint has no such tensor; keys of values are on-disk "
                                  "names in the SOURCE numbering (as in its model.safetensors.index.json)")
        info, (got, shape) = reader.header(name), value_spec(value)
        if (got, shape) != (info.dtype, info.shape):
            raise CheckpointError(f"values[{name!r}] is {got} {list(shape)}, but the checkpoint stores "
                                  f"{info.dtype} {list(info.shape)}: give the full tensor in source numbering, cast "
                                  "to the on-disk dtype")
    return {n: v if isinstance(v, ComputedTensor) else v.detach().to("cpu").contiguous() for n, v in values.items()}


def _slice_rows(reader: CheckpointReader, name: str, E: int, keep: list[int], value: PatchValue | None,
                patch: Patch) -> None:
    shape = reader.header(name).shape
    if shape[:1] != (E,):
        raise CheckpointError(f"{name} has shape {list(shape)}; a router or fused expert tensor has one row per "
                              f"expert ({E} in config.json) on dim 0, so it cannot be pruned exactly. The "
                              "checkpoint and its config.json disagree, or its key format is not the adapter's")
    patch.drop.add(name)
    if value is None:
        patch.add[name] = rows_source(reader, name, keep)
    elif isinstance(value, ComputedTensor):
        patch.add[name] = value.rows(keep)  # computed whole and sliced only when written
    else:
        patch.add[name] = value.index_select(0, torch.tensor(keep, dtype=torch.long)).contiguous()


def read_config(source_dir: Path) -> dict:
    return json.loads((Path(source_dir) / "config.json").read_text())


def _inexact_refusal(adapter: ArchAdapter, plan: PrunePlan, options: str) -> RouterConfigError:
    return RouterConfigError(f"prune export of this mask is not exact for {adapter.model_type}: {plan.reason}. "
                             f"{options}")


def export_pruned(model, adapter: ArchAdapter, source_dir: Path, out_dir: Path, opts, mask: dict[int, list[int]],
                  probe_input_ids: torch.Tensor, allow_inexact: bool = False, *,
                  values: dict[str, torch.Tensor | ComputedTensor] | None = None) -> dict:
    """Write the masked model as a pruned checkpoint; `model` must run with the mask substituted.

    Exact plans are verified by export_patched_model (reload, logits compared with the masked model,
    failure publishes nothing). An inexact plan (deepseek_v3, uneven groups) is refused unless
    `allow_inexact`; then it is written without that check and the deviation is measured and returned.
    `values`: see `prune_patch` (the in-memory model must compute what they hold).
    """
    from ..export import export_patched_model, verify_reload

    layers = adapter.moe_layers(model)
    top_k = max(adapter.get_top_k(layer) for layer in layers)
    plan = plan_prune(adapter, read_config(source_dir), layers, mask, top_k)
    if not plan.exact and not allow_inexact:
        raise _inexact_refusal(adapter, plan, "Set export.allow_inexact=true to write it anyway with the measured "
                               "deviation, mask evenly across groups, or use role_router.export.mode=distill")
    with CheckpointReader(source_dir, allow_pickle=opts.allow_pickle) as reader:
        patch = prune_patch(adapter, reader, layers, plan, values=values)
    if not plan.exact:
        opts = replace(opts, verify_reload=False)
    metrics = export_patched_model(model, adapter, source_dir, out_dir, opts, probe_input_ids=probe_input_ids,
                                   extra=patch)
    if not plan.exact:
        metrics["export/max_abs_logit_diff"] = verify_reload(Path(out_dir), model, probe_input_ids)
    metrics.update({"export/exact": plan.exact, "export/exact_reason": plan.reason,
                    "export/num_experts": plan.num_experts,
                    "export/experts_removed_per_layer": layers[0].num_experts - plan.num_experts,
                    "export/tensors_dropped": len(patch.drop), "export/tensors_added": len(patch.add)})
    return metrics


def prune_checkpoint(source_dir: str | os.PathLike, out_dir: str | os.PathLike, adapter: ArchAdapter, config: dict,
                     removed: dict[int, list[int]], *, values: dict[str, torch.Tensor | ComputedTensor] | None = None,
                     mode: str = "reuse", link: str = "auto", max_shard_size: int | str = "5GB",
                     overwrite: bool = False, allow_inexact: bool = False) -> WriteReport:
    """Prune a checkpoint on disk, no model loaded: `removed[layer]` experts (old numbering) leave every MoE layer.

    config: the source's parsed config.json (the plan, exactness and edits come from it, as for
    `plan_prune`). Writes through the io patch writer (atomic, verified byte for byte against the source;
    no logits are compared: there is no model). An inexact plan is refused unless `allow_inexact`; its
    reason is then in `report.notes`.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    check_output_location(out_dir, source_dir=source_dir, overwrite=overwrite)  # before any header is read
    plan = plan_from_config(adapter, config, removed)
    if not plan.exact and not allow_inexact:
        raise _inexact_refusal(adapter, plan, "Remove the same number of experts from every group, or pass "
                               "allow_inexact=True to write it anyway (unmeasured: no model is loaded here)")
    with CheckpointReader(source_dir) as reader:
        patch = prune_patch(adapter, reader, sorted(plan.keep), plan, values=values)
    report = write_patched_checkpoint(source_dir, out_dir, patch, mode=mode, link=link,
                                      max_shard_size=max_shard_size, overwrite=overwrite)
    report.notes.append(f"pruned to {plan.num_experts} of {plan.source_experts} experts per MoE layer; exact: "
                        f"{plan.exact} ({plan.reason})")
    return report
