"""Which experts a prune removes: the per-layer budget (checked from config.json alone) and the choice by score.

    budget = plan_budget(adapter, config, criterion="reap", ratio=0.25, keep=[0])   # before any weight is read
    removed = choose_removed(budget, scores)       # {MoE layer index: sorted removed experts}

Every MoE layer loses the same number of experts (config.json holds one expert count). When the
family limits each token to its best groups of contiguous experts and that limit excludes
something (deepseek_v3 when a token may use fewer groups than there are), the budget is the same
count in every group, so the kept experts stay aligned in groups and group-limited routing stays exact
(`adapter.expert_count_edits`); otherwise the layer is one group. Within a group the
lowest-scored experts go (ties: the lower index goes first); pinned experts (`keep`) never go.
`random` draws the scores from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..arch import ArchAdapter
from ..errors import ConfigError

__all__ = ["CRITERIA", "PruneBudget", "choose_removed", "plan_budget"]

CRITERIA = ("random", "frequency", "gate_mass", "reap")


@dataclass(frozen=True)
class PruneBudget:
    criterion: str
    num_experts: int               # E, per MoE layer, before the prune
    groups: int                    # contiguous groups the removal is balanced over (1: the whole layer)
    remove_per_group: int
    layers: list[int]              # MoE layer indices (from config.json)
    pinned: dict[int, list[int]]   # MoE layer index -> experts that are never removed
    seed: int = 0

    @property
    def group_size(self) -> int:
        return self.num_experts // self.groups

    @property
    def remove(self) -> int:
        return self.groups * self.remove_per_group

    @property
    def kept(self) -> int:
        return self.num_experts - self.remove


def _pinned(keep, layers: list[int], num_experts: int, setting: str) -> dict[int, list[int]]:
    if keep is None:
        return {i: [] for i in layers}
    if isinstance(keep, Mapping):
        unknown = [k for k in keep if int(k) not in layers]
        if unknown:
            raise ConfigError(f"{setting}.keep names layer {unknown[0]}, which is not an MoE layer; MoE layer "
                              f"indices are {layers}. Key it by those, or give one list for every layer")
        spec = {int(k): list(v) for k, v in keep.items()}
    elif isinstance(keep, Sequence) and not isinstance(keep, str):
        spec = {i: list(keep) for i in layers}
    else:
        raise ConfigError(f"{setting}.keep={keep!r}: expected a list of expert indices or {{layer: [indices]}}")
    out = {}
    for i in layers:
        experts = sorted({int(e) for e in spec.get(i, [])})
        bad = [e for e in experts if not 0 <= e < num_experts]
        if bad:
            raise ConfigError(f"{setting}.keep: expert index {bad[0]} (layer {i}) is out of range; the model has "
                              f"{num_experts} experts per layer, indices 0..{num_experts - 1}")
        out[i] = experts
    return out


def plan_budget(adapter: ArchAdapter, config: dict, criterion: str, ratio: float, keep=None, seed: int = 0, *,
                setting: str = "expert_prune", verb: str = "removes") -> PruneBudget:
    """The removal budget from config.json alone; refuses what cannot be pruned or exported exactly.
    `setting` / `verb` name the experiment's settings in the messages (expert_merge: "merges")."""
    if criterion not in CRITERIA:
        raise ConfigError(f"{setting}.criterion={criterion!r}: expected one of {list(CRITERIA)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        shown = f"{ratio:g}" if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else repr(ratio)
        raise ConfigError(f"{setting}.ratio={shown}: expected a share of each layer's experts strictly between "
                          "0 and 1, e.g. 0.25")
    E = adapter.num_experts_from_config(config)
    top_k = int(adapter.config_value(config, adapter.top_k_key))
    layers = adapter.moe_layer_indices(config)
    limit = adapter.group_limit_from_config(config)
    groups, kept_groups = limit if limit is not None and limit[1] < limit[0] else (1, 1)
    if E % groups:
        raise ConfigError(f"config.json: {E} experts do not split into {groups} groups; cannot prune group-aligned")
    size = E // groups
    per_group = round(ratio * size)
    where = f"{groups} groups of {size}" if groups > 1 else f"{E} experts per layer"
    if per_group == 0:
        raise ConfigError(f"{setting}.ratio={ratio:g} {verb} no expert ({where}); raise the ratio to at least "
                          f"{0.5 / size:.3g}")
    left = size - per_group
    if groups > 1 and left < 2:
        raise ConfigError(f"{setting}.ratio={ratio:g} leaves {left} expert(s) in each of {groups} groups; "
                          "group-limited routing scores a group by its best two experts: keep at least 2 per group")
    if kept_groups * left < top_k:
        reach = f"the {kept_groups} group(s) a token may use hold {kept_groups * left}" if groups > 1 else \
            f"{left} remain"
        raise ConfigError(f"{setting}.ratio={ratio:g} leaves too few experts for top-k={top_k}: {reach}. "
                          "Lower the ratio (or lower top-k first with experiment=topk_override)")
    pinned = _pinned(keep, layers, E, setting)
    for i, experts in pinned.items():
        for g in range(groups):
            n = sum(1 for e in experts if e // size == g)
            if n > left:
                part = f"group {g} (experts {g * size}..{g * size + size - 1})" if groups > 1 else "the layer"
                raise ConfigError(f"{setting}.keep pins {n} experts of {part} in layer {i}, but only {left} are "
                                  f"kept there at ratio={ratio:g}; pin fewer or lower the ratio")
    return PruneBudget(criterion, E, groups, per_group, list(layers), pinned, seed)


def choose_removed(budget: PruneBudget, scores: torch.Tensor | None = None) -> dict[int, list[int]]:
    """{MoE layer index: removed experts, ascending}. `scores` [L, E] (higher = keep), in the order of
    `budget.layers`; None only for the random criterion (seeded scores)."""
    L, E = len(budget.layers), budget.num_experts
    if scores is None:
        if budget.criterion != "random":
            raise ConfigError(f"expert_prune.criterion={budget.criterion} needs expert scores: compute them on "
                              "data.train or pass expert_prune.scores=PATH of an earlier run")
        scores = torch.rand(L, E, generator=torch.Generator().manual_seed(budget.seed), dtype=torch.float64)
    if tuple(scores.shape) != (L, E):
        raise ConfigError(f"expert scores have shape {tuple(scores.shape)}, expected [{L} MoE layers, {E} experts]: "
                          "they come from another model")
    scores = scores.double().clone()
    removed = {}
    for row, layer in enumerate(budget.layers):
        scores[row, budget.pinned[layer]] = float("inf")
        out = []
        for g in range(budget.groups):
            lo = g * budget.group_size
            part = scores[row, lo:lo + budget.group_size]
            order = torch.sort(part, stable=True).indices[:budget.remove_per_group]
            out += [lo + int(e) for e in order]
        removed[layer] = sorted(out)
    return removed
