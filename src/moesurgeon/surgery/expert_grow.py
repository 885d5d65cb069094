"""Grow every MoE layer by N experts: the plan from config.json and headers, the new tensors as an io Patch.

    plan = plan_grow(adapter, config, add=2, init="clone_top", router="mute")   # settings checked, no weights
    plan = check_grow_source(adapter, reader, plan)      # headers only: expert / router / bias tensors found
    parents = choose_parents(plan, frequency)             # {layer: the parent of each added expert}
    patch = grow_patch(adapter, reader, plan, parents)    # drop + add under on-disk names, config edits
    metrics = export_grown(model, adapter, source_dir, out_dir, opts, plan, patch, probe_ids)   # io + exact check
    check_clones(adapter, out_dir, source_dir, plan, parents)   # clone_top: bit-exact copies of their parents

Where the added experts go is the adapter's (`expert_grow_layout`): after the source experts, or at
the end of every group when routing is group-limited (source experts renumbered, groups kept equal).

Inits (every per-expert tensor, on-disk shapes and dtypes): clone_top = bit-exact copies of the
most-used experts (per group, cycled when N exceeds a group; written as byte ranges of the source);
clone_noise = the same plus Gaussian noise of `noise` x each copied tensor's RMS; random = Gaussian
with each tensor's RMS matched over the layer's experts (seeded per tensor name, computed when written).

Router rows (analysis and measurements: experiments/expert_surgery/grow_transplant.md). A clone whose
row equals its parent's ties with it and displaces the k-th expert; splitting a softmax row needs a
-log 2 shift a bias-less linear router cannot add. So the function is kept only if the added experts
are never chosen. router="mute": a per-expert router bias on disk (gpt_oss logit bias, deepseek_v3
choice-only bias) is set MUTE_OFFSET below the layer's lowest: never chosen, exact by construction
(weight row: the parent's, or RMS-matched random). Without such a bias, zero rows: logit 0, chosen
only by tokens with fewer than k positive logits (no linear row stays below the others for every
input); exact on the other tokens where the family renormalises its top-k weights, never where it
does not. router="live": the parent's rows and biases (clones tie), or random rows with the mean bias.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from ..arch import BIAS_SPACES, ArchAdapter, ExpertCountError
from ..arch.config_json import ExpertGrowLayout
from ..errors import ConfigError
from ..io import CheckpointError, CheckpointReader, ComputedTensor, Patch, tensor_source
from ..io.safetensors_format import torch_dtype

__all__ = ["INITS", "MUTE_OFFSET", "ROUTER_RULES", "GrowPlan", "check_clones", "check_grow_source", "choose_parents",
           "export_grown", "grow_patch", "plan_grow"]

INITS = ("clone_top", "clone_noise", "random")
ROUTER_RULES = ("mute", "live")
# how far below the layer's lowest per-expert bias a muted expert's bias goes: router logits and
# choice scores are O(10) and O(1), so it is never among the top k
MUTE_OFFSET = 1.0e4
_FLOATS = ("F64", "F32", "BF16", "F16")


@dataclass(frozen=True)
class GrowPlan:
    add: int
    init: str
    router: str
    noise: float
    seed: int
    num_experts: int                    # E per MoE layer before the grow
    layers: list[int]                   # MoE layer indices (config.json)
    layout: ExpertGrowLayout
    # from the headers (check_grow_source): MoE layer -> its per-expert router bias tensors on disk
    biases: dict[int, list[str]] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """The grown model computes the source's function by construction (muted through a bias everywhere)."""
        return self.router == "mute" and bool(self.layers) and all(self.biases.get(i) for i in self.layers)

    @property
    def exact_reason(self) -> str:
        if self.exact:
            return "the added experts' router biases are far below the rest: they are never chosen"
        if self.router == "live":
            return "router=live: the added experts take part in routing (clones tie with their parents)"
        return ("no per-expert router bias: the added experts get zero router rows (logit 0), chosen by tokens with "
                "fewer than top-k positive logits; measured, not guaranteed")


def plan_grow(adapter: ArchAdapter, config: dict, add, init: str, router: str = "mute", noise: float = 0.01,
              seed: int = 0) -> GrowPlan:
    """Check the settings against config.json alone and place the added experts (adapter.expert_grow_layout)."""
    if isinstance(add, bool) or not isinstance(add, int) or add < 1:
        raise ConfigError(f"expert_grow.add={add!r}: expected a positive integer number of experts to add to every "
                          "MoE layer, e.g. expert_grow.add=2")
    if init not in INITS:
        raise ConfigError(f"expert_grow.init={init!r}: expected one of {list(INITS)}")
    if router not in ROUTER_RULES:
        raise ConfigError(f"expert_grow.router={router!r}: expected one of {list(ROUTER_RULES)}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ConfigError(f"expert_grow.noise={noise!r}: expected a non-negative share of each tensor's RMS, e.g. 0.01")
    try:
        layout = adapter.expert_grow_layout(config, add)
    except ExpertCountError as err:
        raise ConfigError(f"expert_grow.add={add}: {err}") from None
    return GrowPlan(add, init, router, float(noise), int(seed), adapter.num_experts_from_config(config),
                    list(adapter.moe_layer_indices(config)), layout)


def check_grow_source(adapter: ArchAdapter, reader: CheckpointReader, plan: GrowPlan) -> GrowPlan:
    """Find every tensor the grow rewrites in the checkpoint's headers (no weight read) and the per-expert
    router biases that can mute the added experts; refuse a key format the adapter does not know."""
    E, biases = plan.num_experts, {}
    for layer in plan.layers:
        found = _expert_tensors(adapter, reader, layer, E)
        names = found if isinstance(found, list) else list(found[0].values())
        coded = [n for n in names if reader.header(n).dtype not in _FLOATS]
        if coded and plan.init != "clone_top":  # noise or Gaussian values in quantised blocks would be garbage
            raise ConfigError(f"expert_grow.init={plan.init}: {coded[0]!r} is stored as "
                              f"{reader.header(coded[0]).dtype} (quantised); only clone_top copies such tensors "
                              "(bit-exact): use expert_grow.init=clone_top")
        routers = _router_tensors(adapter, reader, layer, E)
        if not any(len(reader.header(n).shape) == 2 for n in routers):
            raise CheckpointError(f"no router weight [{E}, hidden] under {adapter.router_disk_prefix(layer)!r} in the "
                                  f"checkpoint: its key format is not the one the {adapter.model_type} adapter knows")
        named = {adapter.bias_disk_name(layer, space) for space in BIAS_SPACES}
        biases[layer] = sorted(n for n in routers if n in named and len(reader.header(n).shape) == 1)
    return replace(plan, biases=biases)


def choose_parents(plan: GrowPlan, scores: torch.Tensor | None) -> dict[int, list[int | None]]:
    """{MoE layer: the parent of each added expert, in layout.new_positions order}: per group, the source
    experts of that group by descending score (ties: lower index first), cycled when a group gains more
    experts than it has. `scores` [L, E] in plan.layers order; None (every parent None) for init=random."""
    L, E = len(plan.layers), plan.num_experts
    if plan.init == "random":
        return {layer: [None] * plan.add for layer in plan.layers}
    if scores is None or tuple(scores.shape) != (L, E):
        raise ConfigError(f"expert_grow.init={plan.init} needs expert scores of shape [{L} MoE layers, {E} experts], "
                          f"got {None if scores is None else tuple(scores.shape)}: score data.train or pass the "
                          "scores of a run on this model")
    groups, size = plan.layout.groups, E // plan.layout.groups
    per = plan.add // groups
    parents = {}
    for row, layer in enumerate(plan.layers):
        chosen: list[int | None] = []
        for g in range(groups):
            order = sorted(range(g * size, (g + 1) * size), key=lambda e: (-float(scores[row, e]), e))
            chosen += [order[j % size] for j in range(per)]
        parents[layer] = chosen
    return parents


def grow_patch(adapter: ArchAdapter, reader: CheckpointReader, plan: GrowPlan,
               parents: dict[int, list[int | None]]) -> Patch:
    """The io Patch that grows every MoE layer: renamed or rebuilt tensors dropped and added under their on-disk
    names (per-expert stays per-expert, fused stays fused, router rows and biases [E+N]), config edits."""
    patch = Patch(config_edits=dict(plan.layout.edits))
    for layer in plan.layers:
        if adapter.expert_disk_suffixes is None:
            _grow_fused(adapter, reader, plan, layer, parents[layer], patch)
        else:
            _grow_per_expert(adapter, reader, plan, layer, parents[layer], patch)
        muted = bool(plan.biases.get(layer))
        for name in _router_tensors(adapter, reader, layer, plan.num_experts):  # small: built now, in memory
            source = reader.get(name)
            rows = [_router_row(plan, name, position, source, parent, name in plan.biases.get(layer, []), muted)
                    for position, parent in zip(plan.layout.new_positions, parents[layer], strict=True)]
            patch.drop.add(name)
            patch.add[name] = _spread(plan.layout, source, rows)
    return patch


def export_grown(source_model, adapter: ArchAdapter, source_dir: Path, out_dir: Path, opts, plan: GrowPlan,
                 patch: Patch, probe_input_ids: torch.Tensor) -> dict:
    """Write the grown checkpoint through export.export_patched_model (io verifies every written value: byte
    ranges, digests of computed values, in-memory tensors). A plan exact by construction is also reloaded and
    compared with the SOURCE model before anything is published: that is the function it must keep. Other
    plans have no in-memory model to compare with; the caller reloads and measures them. `opts`: ExportOptions."""
    from ..export import export_patched_model

    if not plan.exact:
        opts = replace(opts, verify_reload=False)
    if opts.mode == "reuse" and not (Path(source_dir) / "model.safetensors.index.json").exists():
        opts = replace(opts, mode="full")  # a single-file source beside a patch shard would hide it (as prune)
    metrics = export_patched_model(source_model, adapter, source_dir, out_dir, opts, probe_input_ids=probe_input_ids,
                                   extra=patch)
    if "export/max_abs_logit_diff" in metrics:
        metrics["export/max_abs_logit_diff_vs_source"] = metrics.pop("export/max_abs_logit_diff")
    metrics.update({"export/exact": plan.exact, "export/exact_reason": plan.exact_reason,
                    "export/num_experts": plan.layout.num_experts, "export/tensors_dropped": len(patch.drop),
                    "export/tensors_added": len(patch.add)})
    return metrics


def check_clones(adapter: ArchAdapter, export_dir: Path, source_dir: Path, plan: GrowPlan,
                 parents: dict[int, list[int | None]], allow_pickle: bool = False) -> int:
    """clone_top: every added expert of the written checkpoint equals its parent in the source, bit for bit (one
    tensor pair at a time). Returns the tensors compared; raises ExportVerificationError on a difference."""
    from ..export import ExportVerificationError

    compared = 0
    with CheckpointReader(export_dir) as out, CheckpointReader(source_dir, allow_pickle=allow_pickle) as src:
        for layer in plan.layers:
            experts = _expert_tensors(adapter, src, layer, plan.num_experts)
            for position, parent in zip(plan.layout.new_positions, parents[layer], strict=True):
                if adapter.expert_disk_suffixes is None:
                    pairs = [(n, out.get(n)[position], src.get(n)[parent]) for n in experts]
                else:
                    pairs = [(n, out.get(adapter.expert_tensor_name(layer, position, rest)), src.get(n))
                             for rest, n in experts[parent].items()]
                for name, got, want in pairs:
                    compared += 1
                    if not torch.equal(got, want):
                        raise ExportVerificationError(f"layer {layer}: added expert {position} is not a bit-exact copy "
                                                      f"of its parent, source expert {parent} ({name})")
    return compared


# ---------------------------------------------------------------- helpers
def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _draw(plan: GrowPlan, key: str, shape) -> torch.Tensor:
    """Gaussian values for one added tensor or row, from a generator seeded by the run's seed and `key` (its name):
    the values do not depend on the order in which tensors are computed or written."""
    seed = int.from_bytes(hashlib.sha256(f"{plan.seed}:{key}".encode()).digest()[:8], "little")
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _init(plan: GrowPlan, key: str, parent: torch.Tensor | None, layer_rms: float, shape, dtype) -> torch.Tensor:
    """One tensor (or fused row) of an added expert: the parent's bits, the parent plus noise, or RMS-matched
    Gaussian values."""
    if plan.init == "clone_top":
        return parent.clone()
    if plan.init == "clone_noise":
        return (parent.float() + plan.noise * _rms(parent) * _draw(plan, key, parent.shape)).to(parent.dtype)
    return (_draw(plan, key, shape) * layer_rms).to(dtype)


def _router_row(plan: GrowPlan, name: str, position: int, source: torch.Tensor, parent: int | None, is_bias: bool,
                muted: bool) -> torch.Tensor:
    """The added expert's row of one router tensor [E, ...] (module docstring: router rules)."""
    if plan.router == "mute" and is_bias:
        return torch.full(source.shape[1:], float(source.float().min()) - MUTE_OFFSET).to(source.dtype)
    if plan.router == "mute" and not muted and source.dim() == 2:
        return torch.zeros(source.shape[1:], dtype=source.dtype)  # logit 0: no bias to mute with
    if parent is not None:
        return source[parent].clone()
    if source.dim() == 1:
        return source.float().mean().to(source.dtype)
    return (_draw(plan, f"{name}[{position}]", source.shape[1:]) * _rms(source)).to(source.dtype)


def _spread(layout: ExpertGrowLayout, source: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
    """[E+N, ...]: the source rows at their new positions, the added rows at theirs."""
    out = source.new_empty((layout.num_experts, *source.shape[1:]))
    out[list(layout.old_positions)] = source
    for position, row in zip(layout.new_positions, rows, strict=True):
        out[position] = row
    return out.contiguous()


def _read(reader: CheckpointReader, name: str) -> torch.Tensor:
    """`name` from a fresh reader of the same checkpoint: computed values run when written, after planning."""
    with CheckpointReader(reader.model_dir, allow_pickle=reader.format == "pickle") as again:
        return again.get(name)


def _grown_fused(plan: GrowPlan, reader: CheckpointReader, name: str, parents: list[int | None]) -> torch.Tensor:
    source = _read(reader, name)
    rms = _rms(source) if plan.init == "random" else 0.0
    rows = [_init(plan, f"{name}[{position}]", source[p] if p is not None else None, rms, source.shape[1:],
                  source.dtype) for position, p in zip(plan.layout.new_positions, parents, strict=True)]
    return _spread(plan.layout, source, rows)


def _added_expert(plan: GrowPlan, reader: CheckpointReader, name: str, parent: str | None, layer_rms: float,
                  shape, dtype) -> torch.Tensor:
    return _init(plan, name, _read(reader, parent) if parent is not None else None, layer_rms, shape, dtype)


def _grow_fused(adapter, reader, plan, layer, parents, patch) -> None:
    """Fused on disk: every [E, ...] expert tensor dropped and re-added as [E+N, ...], computed when written."""
    for name in _expert_tensors(adapter, reader, layer, plan.num_experts):
        info = reader.header(name)
        patch.drop.add(name)
        patch.add[name] = ComputedTensor(info.dtype, (plan.layout.num_experts, *info.shape[1:]),
                                         partial(_grown_fused, plan, reader, name, parents), name)


def _grow_per_expert(adapter, reader, plan, layer, parents, patch) -> None:
    """Per-expert on disk: renumbered experts and clone_top copies are byte ranges of the source (no tensor
    held); noisy and random tensors are computed when written."""
    experts = _expert_tensors(adapter, reader, layer, plan.num_experts)
    for e, rests in experts.items():  # renumbered source experts (group-limited layouts)
        to = plan.layout.old_positions[e]
        if to != e:
            for rest, name in rests.items():
                patch.drop.add(name)
                patch.add[adapter.expert_tensor_name(layer, to, rest)] = tensor_source(reader, name)
    for rest in sorted(experts[0]):
        info = reader.header(experts[0][rest])
        rms = _layer_rms(reader, [experts[e][rest] for e in experts]) if plan.init == "random" else 0.0
        for position, parent in zip(plan.layout.new_positions, parents, strict=True):
            name = adapter.expert_tensor_name(layer, position, rest)
            src = experts[parent][rest] if parent is not None else None
            if plan.init == "clone_top":
                patch.add[name] = tensor_source(reader, src)
            else:
                patch.add[name] = ComputedTensor(info.dtype, info.shape, partial(
                    _added_expert, plan, reader, name, src, rms, info.shape, torch_dtype(info.dtype)), name)


def _layer_rms(reader: CheckpointReader, names: list[str]) -> float:
    """RMS over the same tensor of every expert of a layer, read one tensor at a time."""
    total = count = 0.0
    for name in names:
        t = reader.get(name).double()
        total, count = total + float(t.pow(2).sum()), count + t.numel()
    return math.sqrt(total / max(count, 1))


def _expert_tensors(adapter: ArchAdapter, reader: CheckpointReader, layer: int, E: int):
    """Fused layouts: [names of the [E, ...] expert tensors]. Per-expert: {expert: {rest: name}}, every expert
    with the same tensors. Refuses a checkpoint whose expert tensors the adapter cannot find."""
    prefix = adapter.expert_disk_prefix(layer)
    mine = [n for n in reader.tensor_names() if n.startswith(prefix)]
    if adapter.expert_disk_suffixes is None:
        fused = [n for n in mine if reader.header(n).shape[:1] == (E,)]
        if not fused:
            raise CheckpointError(f"no fused expert tensors [{E}, ...] under {prefix!r} in the checkpoint: its key "
                                  f"format is not the one the {adapter.model_type} adapter knows")
        return fused
    experts: dict[int, dict[str, str]] = {}
    for name in mine:
        parsed = adapter.split_expert_name(name, layer)
        if parsed is not None:
            experts.setdefault(parsed[0], {})[parsed[1]] = name
    if sorted(experts) != list(range(E)) or len({tuple(sorted(r)) for r in experts.values()}) != 1:
        raise CheckpointError(f"the expert tensors under {prefix!r} do not cover experts 0..{E - 1} with the same "
                              f"tensors each (found experts {sorted(experts)[:E + 2]}): the checkpoint's key format "
                              f"is not the one the {adapter.model_type} adapter knows")
    return experts


def _router_tensors(adapter: ArchAdapter, reader: CheckpointReader, layer: int, E: int) -> list[str]:
    """On-disk names of the router tensors of `layer` with one row per expert (weight, per-expert biases)."""
    prefix = adapter.router_disk_prefix(layer)
    return sorted(n for n in reader.tensor_names() if n.startswith(prefix) and reader.header(n).shape[:1] == (E,))
