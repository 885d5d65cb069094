"""Merge clusters of experts into one expert each: in memory, and as an exact checkpoint in the source's format.

    plans = plan_merge(clusters, counts, layers)                   # representative, frequency weights
    merge_in_memory(model, adapter, plans, "dominant", source_dir)  # slot[rep] = sum_m w_m * slot[m]
    swap = substitute_routers(model, adapter, lambda l: ExpertMaskRouter(l, adapter, plans[l.index].removed))
    export_merged(model, adapter, source_dir, out_dir, opts, plans, "dominant", probe_ids)

A cluster's members m get weights w_m = (times m was chosen) / (times any member was chosen) — the
frequency-weighted average MC-SMoE uses (uniform when no member was ever chosen). Its
representative, the slot the merged expert lives in, is its most-used member (ties: the lower
index); the other members are removed (masked out of routing in memory, dropped from the export, the
kept experts renumbered in order as a prune does). The merged expert's router row (and every other
per-expert router tensor: gpt_oss's logit bias, deepseek_v3's correction bias): `dominant` keeps the
representative's row; `freq_mean` takes the members' rows averaged with the same weights.

Exactness: the average is elementwise, so it is the same arithmetic whether it runs on the fused
in-memory parameters (`experts.gate_up_proj [E, ...]`, one slice per expert) or on the per-expert
tensors on disk (`experts.5.gate_proj.weight`): both go through `weighted_sum` (float32, members in
cluster order, one rounding per multiply and per add), then are cast to the on-disk dtype; the
in-memory copy is that value cast back. So the in-memory merged model IS the exported checkpoint
(bit for bit where the model was loaded at or above the on-disk precision). A singleton cluster is
left untouched (bit-identical). The export is `export_pruned` with the merged values substituted
for the disk content before the slice / rename.

Memory: the disk values are `io.ComputedTensor`s, computed by the writer when it writes each tensor and
dropped right after (verification hashes the written bytes, it does not recompute). A per-expert
merged tensor reads its cluster's members one at a time (the float32 sum, one member and the result
alive); a fused [E, ...] tensor is read whole, copied once to hold the merged rows, and sliced to the
kept rows when written. So an export holds about one tensor (a fused one: about two), not the merged
experts' bytes (~27 GB for Qwen3-30B-A3B at ratio 0.5). `merge_in_memory` is unchanged: the model is
in memory anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..arch import ArchAdapter, MoELayer
from ..io import CheckpointError, CheckpointReader, ComputedTensor, SourceBytes, tensor_source
from ..io.lazy_sources import iter_source
from ..io.safetensors_format import torch_dtype

__all__ = ["LayerMerge", "ROUTER_RULES", "export_merged", "merge_in_memory", "merged_disk_values", "plan_merge",
           "weighted_sum"]

ROUTER_RULES = ("dominant", "freq_mean")


@dataclass(frozen=True)
class LayerMerge:
    index: int                      # MoE layer index
    router_name: str
    num_experts: int                # E before the merge
    clusters: list[list[int]]       # source indices, representative first; ordered by representative
    weights: list[torch.Tensor]     # per cluster: float32 [len(cluster)], the members' shares (same order)

    @property
    def kept(self) -> list[int]:
        """The representatives, ascending: the source index of each slot of the merged layer."""
        return [c[0] for c in self.clusters]

    @property
    def removed(self) -> list[int]:
        return sorted(e for c in self.clusters for e in c[1:])

    def merged(self) -> list[tuple[list[int], torch.Tensor]]:
        """(cluster, weights) of every cluster with more than one member (singletons stay as they are)."""
        return [(c, w) for c, w in zip(self.clusters, self.weights) if len(c) > 1]


def plan_merge(clusters: dict[int, list[list[int]]], counts: torch.Tensor, layers: list[MoELayer]
               ) -> dict[int, LayerMerge]:
    """{MoE layer index: LayerMerge} from each layer's clusters and `counts` [L, E] (how often each expert
    was chosen, rows in the order of `layers`)."""
    if tuple(counts.shape) != (len(layers), layers[0].num_experts if layers else 0):
        raise ValueError(f"expert counts have shape {tuple(counts.shape)}, expected [{len(layers)} MoE layers, "
                         f"{layers[0].num_experts if layers else 0} experts]: they come from another model")
    out = {}
    for row, layer in enumerate(layers):
        covered = sorted(e for c in clusters[layer.index] for e in c)
        if covered != list(range(layer.num_experts)):
            raise ValueError(f"clusters of {layer.router_name} do not cover experts 0..{layer.num_experts - 1} "
                             "exactly once")
        ordered, weights = [], []
        for cluster in clusters[layer.index]:
            # the most-used member first (ties: the lower index), then the rest in the same order
            members = sorted(cluster, key=lambda e: (-float(counts[row, e]), e))
            c = counts[row, members].double()
            share = c / c.sum() if float(c.sum()) > 0 else torch.full_like(c, 1.0 / len(c))
            ordered.append(members)
            weights.append(share.float())
        pairs = sorted(zip(ordered, weights), key=lambda p: p[0][0])
        out[layer.index] = LayerMerge(layer.index, layer.router_name, layer.num_experts,
                                      [p[0] for p in pairs], [p[1] for p in pairs])
    return out


def weighted_sum(tensors: Iterable[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_m weights[m] * tensors[m] in float32, members in order, each product and sum rounded once (no fused
    multiply-add): the same bits for the same elements whatever the tensors' layout or shapes. `tensors` may be
    a generator: one member is held at a time."""
    acc, count = None, 0
    for t, wm in zip(tensors, weights.float()):
        term = t.float() * wm.to(t.device)
        acc = term if acc is None else acc + term
        count += 1
    if acc is None or count != len(weights):
        raise ValueError(f"weighted_sum: {count} tensors for {len(weights)} weights; give one tensor per weight")
    return acc


def _expert_names(reader: CheckpointReader, adapter: ArchAdapter, layer: MoELayer) -> list[str]:
    """The checkpoint's expert tensors of `layer`: under the adapter's on-disk block (hub checkpoints), else under
    the in-memory block name a fused transformers-5 save (`save_original_format=False`) keeps."""
    prefixes = [adapter.expert_disk_prefix(layer.index), f"{layer.block_name}.{adapter.experts_attr}."]
    for prefix in dict.fromkeys(prefixes):
        names = [n for n in reader.tensor_names() if n.startswith(prefix)]
        if names:
            return names
    raise CheckpointError(f"no expert tensors under {adapter.expert_disk_prefix(layer.index)!r} in the checkpoint: its "
                          f"key format is not the one the {adapter.model_type} adapter knows")


def _router_name(reader: CheckpointReader, mem: str, disk: str) -> str | None:
    return disk if disk in reader else mem if mem in reader else None


def _expert_disk_dtype(reader: CheckpointReader, adapter: ArchAdapter, layer: MoELayer) -> torch.dtype:
    found = sorted({reader.header(n).dtype for n in _expert_names(reader, adapter, layer)})
    dtypes = [torch_dtype(d) for d in found]
    if len(found) != 1 or dtypes[0] is None or not dtypes[0].is_floating_point:
        raise CheckpointError(f"the expert tensors of {layer.block_name} are stored as {found}; merging averages "
                              "weights and needs one floating-point dtype (dequantise the checkpoint first)")
    return dtypes[0]


def _router_rows(layer: MoELayer) -> dict[str, torch.Tensor]:
    """{in-memory name: tensor} of the router's tensors with one row (or value) per expert."""
    own = list(layer.router.named_parameters(recurse=False)) + list(layer.router.named_buffers(recurse=False))
    return {f"{layer.router_name}.{n}": t for n, t in own if t.ndim >= 1 and t.shape[0] == layer.num_experts}


def _check_rule(router_rule: str) -> None:
    if router_rule not in ROUTER_RULES:
        raise ValueError(f"router_rule={router_rule!r}: expected one of {list(ROUTER_RULES)}")


@torch.no_grad()
def merge_in_memory(model, adapter: ArchAdapter, plans: dict[int, LayerMerge], router_rule: str,
                    source_dir: Path, allow_pickle: bool = False) -> dict:
    """Write each cluster's merged expert (and, for freq_mean, router rows) into its representative's slot of
    the loaded model, rounded through the on-disk dtype; returns a few counts for the metrics."""
    _check_rule(router_rule)
    layers = adapter.moe_layers(model)
    with CheckpointReader(source_dir, allow_pickle=allow_pickle) as reader:
        expert_dtype = {layer.index: _expert_disk_dtype(reader, adapter, layer) for layer in layers}
        router_dtype = {}
        for layer in layers:
            for mem, disk in adapter.router_tensor_names(layer).items():
                stored = _router_name(reader, mem, disk)
                if stored is not None:
                    router_dtype[mem] = torch_dtype(reader.header(stored).dtype)
    merged = 0
    for layer in layers:
        plan = plans[layer.index]
        experts = getattr(layer.block, adapter.experts_attr)
        params = [p for p in experts.parameters() if p.ndim >= 1 and p.shape[0] == layer.num_experts]
        if not params:
            raise ValueError(f"{layer.block_name}: its experts module holds no parameter with one slice per expert")
        rows = _router_rows(layer) if router_rule == "freq_mean" else {}
        for cluster, w in plan.merged():
            for p in params:
                p[cluster[0]] = weighted_sum([p[m] for m in cluster], w).to(expert_dtype[layer.index]).to(p.dtype)
            for mem, t in rows.items():
                stored = router_dtype.get(mem) or t.dtype
                t[cluster[0]] = weighted_sum([t[m] for m in cluster], w).to(stored).to(t.dtype)
            merged += 1
    return {"merge/clusters_merged": merged}


def merged_disk_values(reader: CheckpointReader, adapter: ArchAdapter, layers: list[MoELayer],
                       plans: dict[int, LayerMerge], router_rule: str) -> dict[str, ComputedTensor]:
    """{on-disk name: merged tensor in SOURCE numbering, on-disk dtype and shape}, each a ComputedTensor made from
    the disk tensors when it is computed: a per-expert tensor (`experts.5.gate_proj.weight`) of each
    representative, and every fused [E, ...] tensor (gpt_oss, or any transformers-5 fused save) whole with the
    representatives' slices replaced; freq_mean adds the whole per-expert router tensors. Each tensor is treated
    by what its name and shape say, so both on-disk layouts (and a mix) work. Only headers are read here; the
    values read through `reader`, which must stay open until they are written."""
    _check_rule(router_rule)
    values: dict[str, ComputedTensor] = {}
    for layer in layers:
        plan, E = plans[layer.index], layer.num_experts
        merged = plan.merged()
        if not merged:
            continue
        by_rest: dict[str, dict[int, str]] = {}  # per-expert tensors: suffix -> {expert: name}
        for n in _expert_names(reader, adapter, layer):
            parsed = adapter.split_expert_name(n, layer.index)
            if parsed is not None:
                by_rest.setdefault(parsed[1], {})[parsed[0]] = n
            elif reader.header(n).shape[:1] == (E,):  # fused: one slice per expert
                values[n] = _lazy(reader, n, partial(_merged_rows, reader, n, merged))
        for cluster, w in merged:
            for rest, experts in by_rest.items():
                missing = [m for m in cluster if m not in experts]
                if missing:
                    raise CheckpointError(f"expert {missing[0]} of layer {layer.index} has no tensor {rest!r} on disk "
                                          "while other experts do; cannot merge a partial expert")
                names = [experts[m] for m in cluster]
                values[names[0]] = _lazy(reader, names[0], partial(_merged_expert, reader, names, w))
        if router_rule == "freq_mean":
            for mem, disk in adapter.router_tensor_names(layer).items():
                stored = _router_name(reader, mem, disk)
                if stored is not None and reader.header(stored).shape[:1] == (E,):
                    values[stored] = _lazy(reader, stored, partial(_merged_rows, reader, stored, merged))
    return values


def _lazy(reader: CheckpointReader, name: str, compute) -> ComputedTensor:
    info = reader.header(name)
    return ComputedTensor(info.dtype, info.shape, compute, label=f"merged {name}")


def _merged_expert(reader: CheckpointReader, names: list[str], w: torch.Tensor) -> torch.Tensor:
    """One merged per-expert tensor, the members read one at a time (in cluster order, as weighted_sum sums)."""
    dtype = torch_dtype(reader.header(names[0]).dtype)
    return weighted_sum((_read(reader, n) for n in names), w).to(dtype)


def _read(reader: CheckpointReader, name: str) -> torch.Tensor:
    """The tensor in memory of its own, read with pread (its file checked against the reader's view of it). Not
    `reader.get`: safetensors maps the whole shard, and the pages a merge touches would stay in RSS up to a
    shard's size; a pickle source's (shared, mmap-backed) tensor is cloned."""
    source = tensor_source(reader, name)
    if not isinstance(source, SourceBytes):
        return source.clone()
    out = torch.empty(source.nbytes, dtype=torch.uint8)
    view, pos = memoryview(out.numpy()), 0
    for chunk in iter_source(source):
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    return out.view(torch_dtype(source.dtype)).reshape(source.shape)


def _merged_rows(reader: CheckpointReader, name: str, merged: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """A fused [E, ...] tensor with each merged cluster's average in its representative's row, written in place
    into the tensor read (its own memory): clusters are disjoint and each reads its members before writing its
    representative, so reading from it is the same as reading the source."""
    out = _read(reader, name)
    for cluster, w in merged:
        out[cluster[0]] = weighted_sum([out[m] for m in cluster], w).to(out.dtype)
    return out


def export_merged(model, adapter: ArchAdapter, source_dir: Path, out_dir: Path, opts, plans: dict[int, LayerMerge],
                  router_rule: str, probe_input_ids: torch.Tensor) -> dict:
    """The merged model (merge_in_memory + the removed experts masked) as a checkpoint without the removed
    experts, in the source's on-disk format; reloaded and compared with `model` before it is published."""
    from .prune_experts import export_pruned

    layers = adapter.moe_layers(model)
    removed = {layer.index: plans[layer.index].removed for layer in layers}
    with CheckpointReader(source_dir, allow_pickle=opts.allow_pickle) as reader:  # open while values are written
        values = merged_disk_values(reader, adapter, layers, plans, router_rule)
        metrics = export_pruned(model, adapter, source_dir, out_dir, opts, removed, probe_input_ids, values=values)
    metrics["export/tensors_merged"] = len(values)
    return metrics
