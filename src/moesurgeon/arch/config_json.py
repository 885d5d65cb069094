"""What a family's config.json says, read as a plain dict: expert count, top-k, MoE layers, group limit, and the
edits a checkpoint with another expert count needs.

Part of the adapter (`ArchAdapter` inherits `ConfigJson`). Everything here works on the parsed
config.json of the source checkpoint, with no model loaded, and edits only keys that are there:
other runtimes and converters read the hub keys, which transformers 5 may rename when it writes a
config (see ../shared/notes/transformers5-moe.md). A key config.json omits takes the default of
transformers' config class for the family, as loading the checkpoint would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ExpertCountError, InvalidConfigError, UnsupportedModelError


@dataclass(frozen=True)
class ExpertCountEdits:
    """config.json edits for a checkpoint whose MoE layers keep fewer experts, and whether it is exact."""

    edits: dict[str, int]  # config.json key -> new value
    exact: bool  # the checkpoint routes over the kept experts exactly as the masked model does
    reason: str  # why it is (or is not) exact, for the log and metrics


@dataclass(frozen=True)
class ExpertGrowLayout:
    """Where the experts of a grown MoE layer sit (the same in every MoE layer), and the config.json edits."""

    edits: dict[str, int]  # config.json key -> new value
    groups: int  # contiguous groups the added experts are spread over (1: appended after the source experts)
    old_positions: tuple[int, ...]  # new index of each source expert, in source order
    new_positions: tuple[int, ...]  # indices of the added experts, group by group, ascending
    reason: str  # how the layout keeps the family's routing, for the log and metrics

    @property
    def num_experts(self) -> int:
        return len(self.old_positions) + len(self.new_positions)

    def group_of(self, position: int) -> int:
        """The group (0..groups-1) of the expert at `position` in the grown layer."""
        return position // (self.num_experts // self.groups)


class ConfigJson:
    """The config.json part of an architecture adapter (a mixin of `ArchAdapter`)."""

    model_type: str
    scoring: ClassVar[str]
    # config.json keys (hub format first); transformers 5 may write the alias instead
    num_experts_keys: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts")
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    # config.json keys of the group limit (number of groups, groups a token may use); None: no limit
    group_keys: ClassVar[tuple[str, str] | None] = None

    if TYPE_CHECKING:  # from DiskNames, the other half of the adapter (router_disk_prefix)
        disk_layers_prefix: ClassVar[str]
        block_attr: ClassVar[str]
        router_attr: ClassVar[str]
        def disk_name(self, name: str) -> str: ...

    # ---------------------------------------------------------------- reading
    def config_value(self, config: dict, key: str) -> Any:
        """config.json's value for `key`, or transformers' default for the family when it is absent or null."""
        if config.get(key) is not None:
            return config[key]
        from transformers import CONFIG_MAPPING

        return getattr(CONFIG_MAPPING[self.model_type](), key, None)

    def num_experts_from_config(self, config: dict) -> int:
        for key in self.num_experts_keys:
            if config.get(key) is not None:
                try:
                    return int(config[key])
                except (TypeError, ValueError):
                    raise InvalidConfigError(f"config.json: {key}={config[key]!r}; expected a positive integer "
                                             "number of experts") from None
        raise UnsupportedModelError(
            f"config.json of model_type {self.model_type!r} has none of {self.num_experts_keys}: "
            "cannot tell the number of experts"
        )

    def moe_layer_indices(self, config: dict) -> list[int]:
        """Indices of the decoder layers that are sparse MoE layers, as the family builds them. Default: all."""
        return list(range(int(self.config_value(config, "num_hidden_layers"))))

    def group_limit_from_config(self, config: dict) -> tuple[int, int] | None:
        """(groups, groups a token may choose from) from config.json; None without a limit or with one group.
        Keys config.json omits mean no limit (the loaded model would use the class default: read the
        router with `group_limit(layer)` for what a loaded model does)."""
        if self.group_keys is None:
            return None
        groups, kept = (config.get(k) for k in self.group_keys)
        if groups is None or kept is None or int(groups) <= 1:
            return None
        return int(groups), int(kept)

    def check_config(self, config: dict) -> list[str]:
        """Validate the expert count and top-k of a config.json dict; return notes for the log.

        Raises InvalidConfigError for values transformers would accept and then fail on much later
        (top-k of 0 divides by zero in renormalisation, top-k above the expert count fails in topk).
        A missing top-k is legal: the config class's default applies, and the note says which.
        """
        experts = self.num_experts_from_config(config)
        key = next(k for k in self.num_experts_keys if config.get(k) is not None)
        if isinstance(config[key], bool) or not isinstance(config[key], int) or experts <= 0:
            raise InvalidConfigError(f"config.json: {key}={config[key]!r}; expected a positive integer number of "
                                     "experts. Fix config.json (the source checkpoint's value is authoritative)")
        notes = []
        k = config.get(self.top_k_key)
        if k is None:
            default = self.default_top_k()
            notes.append(f"config.json has no {self.top_k_key}: transformers uses the {self.model_type} default "
                         f"of {default} experts per token")
            k = default
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
            raise InvalidConfigError(f"config.json: {self.top_k_key}={k!r}; expected an integer from 1 to the "
                                     f"expert count {experts} ({key}). Fix config.json, or choose top-k at run "
                                     "time with experiment=topk_override top_k=N")
        return notes

    def default_top_k(self) -> int | None:
        """The experts-per-token transformers' config class uses when config.json omits it."""
        return self.config_value({}, self.top_k_key)

    # ---------------------------------------------------------------- edits
    def top_k_config_edit(self, k: int) -> dict:
        return {self.top_k_key: int(k)}

    def expert_count_edits(self, config: dict, new_count: int, removed_per_layer: dict[int, list[int]]
                           ) -> ExpertCountEdits:
        """The config.json edits for MoE layers that each drop `removed_per_layer[layer]` (old numbering; the
        same number in every layer) and keep `new_count` experts renumbered in order, and whether the
        result routes exactly as the model with those experts masked.

        Without a group limit it is exact (a masked expert takes no part in the family's routing). With
        one (experts in contiguous groups, a token choosing only from the best groups, a group scored
        by its best two experts): exact when the limit excludes nothing (the edits then use one group),
        or when every group loses the same number of experts and keeps at least two (groups stay
        aligned); otherwise inexact, and refused outright (ExpertCountError) when the group count does not
        divide `new_count`. Also ExpertCountError when config.json has no expert-count key.
        """
        edits = {key: new_count for key in self.num_experts_keys if config.get(key) is not None}
        if not edits:
            raise ExpertCountError(f"config.json has none of the expert-count keys {self.num_experts_keys}")
        groups = self.group_limit_from_config(config)
        if groups is None or self.group_keys is None:
            return ExpertCountEdits(edits, True, f"{self.scoring} routing over the remaining experts")
        groups_key, kept_key = self.group_keys
        n_group, topk_group = groups
        if topk_group >= n_group:
            edits.update(dict.fromkeys(self.group_keys, 1))
            return ExpertCountEdits(edits, True, f"{kept_key}={topk_group} >= {groups_key}={n_group}: the group "
                                                 "limit excludes nothing, so the pruned config uses one group")
        removed = list(removed_per_layer.values()) or [[]]
        if len({len(r) for r in removed}) != 1:
            raise ExpertCountError(f"removed_per_layer removes {[len(r) for r in removed]} experts per MoE layer; a "
                                   "config.json has one expert count for every layer: remove equally many in each")
        old_count = new_count + len(removed[0])
        size = old_count // n_group
        per_group = {tuple(sum(1 for e in r if e // size == g) for g in range(n_group)) for r in removed}
        balanced = len(per_group) == 1 and len(set(next(iter(per_group)))) == 1
        if balanced and size - next(iter(per_group))[0] >= 2:
            return ExpertCountEdits(edits, True, f"each of the {n_group} groups loses the same number of experts, "
                                                 "so groups stay aligned")
        if new_count % n_group != 0:
            raise ExpertCountError(
                f"pruning leaves {new_count} experts, which {groups_key}={n_group} does not divide: group-limited "
                f"routing ({self.model_type}) cannot hold that. Mask a multiple of {n_group} experts, the same "
                f"number in each group of {size}, for an exact export; or export with role_router.export.mode=distill")
        return ExpertCountEdits(edits, False, f"the mask removes experts unevenly across the {n_group} groups "
                                              f"(removed per group: {sorted(per_group)}), so pruned experts regroup "
                                              f"and the group limit ({kept_key}={topk_group}) picks differently")

    # ---------------------------------------------------------------- growing (expert_grow, expert_transplant)
    def expert_grow_layout(self, config: dict, add: int) -> ExpertGrowLayout:
        """The layout of MoE layers that each gain `add` experts, and the config.json edits.

        Without a group limit (or with one that excludes nothing, as for prune: `topk_group >= n_group`,
        written as one group) the added experts come after the source experts, whose indices stay.
        With a real limit (a token chooses only from its best groups of contiguous experts) the groups
        must stay equal and contiguous, so every group gains `add / n_group` experts at its end and the
        source experts after group 0 move up (renumbering); an `add` the group count does not divide
        is refused (ExpertCountError), as is a config.json without an expert-count key.
        """
        keys = [key for key in self.num_experts_keys if config.get(key) is not None]
        if not keys:
            raise ExpertCountError(f"config.json has none of the expert-count keys {self.num_experts_keys}")
        old = self.num_experts_from_config(config)
        new = old + int(add)
        edits = dict.fromkeys(keys, new)
        groups = self.group_limit_from_config(config)
        appended = (tuple(range(old)), tuple(range(old, new)))
        if groups is None or self.group_keys is None:
            return ExpertGrowLayout(edits, 1, *appended, f"{self.scoring} routing; the added experts follow the "
                                                          f"{old} source experts")
        groups_key, kept_key = self.group_keys
        n_group, topk_group = groups
        if topk_group >= n_group:
            edits.update(dict.fromkeys(self.group_keys, 1))
            return ExpertGrowLayout(edits, 1, *appended, f"{kept_key}={topk_group} >= {groups_key}={n_group}: the "
                                                          "group limit excludes nothing, so the grown config uses one "
                                                          "group")
        if old % n_group:
            raise ExpertCountError(f"config.json: {old} experts do not split into {groups_key}={n_group} equal groups; "
                                   "the source config is inconsistent")
        size = old // n_group
        if add % n_group:
            raise ExpertCountError(
                f"grow beyond what the config's group structure allows: {add} new experts per layer cannot be "
                f"spread evenly over {groups_key}={n_group} groups of {size} ({self.model_type} routes group-limited, "
                f"{kept_key}={topk_group}, over equal contiguous groups); add a multiple of {n_group}")
        per = add // n_group
        old_positions = tuple((e // size) * (size + per) + e % size for e in range(old))
        new_positions = tuple(g * (size + per) + size + j for g in range(n_group) for j in range(per))
        return ExpertGrowLayout(edits, n_group, old_positions, new_positions,
                                f"every one of the {n_group} groups gains {per} expert(s) at its end, so groups stay "
                                f"equal and contiguous ({kept_key}={topk_group} still applies)")

    def router_disk_prefix(self, layer_index: int) -> str:
        """On-disk name prefix of every tensor of MoE layer `layer_index`'s router, e.g. "model.layers.3.mlp.gate.",
        from config.json alone (disk_names.py's rules: renamed blocks such as mixtral's block_sparse_moe)."""
        block = f"{self.disk_layers_prefix}.{int(layer_index)}.{self.block_attr}"
        return self.disk_name(f"{block}.{self.router_attr}.x")[:-1]
