"""Tensor names on disk: routers, their per-expert biases and the per-expert tensors, as a checkpoint stores them.

Part of the adapter (`ArchAdapter` inherits `DiskNames`). Two ways in:
- from a loaded model's `MoELayer`: `router_tensor_names`, `expert_disk_names`;
- from config.json and a layer index alone, with no model loaded (as mergekit's architecture
  definitions name tensors): `disk_block_prefix`, `expert_tensor_names`, `split_expert_name`,
  `expert_tensor_name`, `bias_disk_name`. Surgery that rewrites a checkpoint (pruning, merging)
  works on these names and never parses them itself.

On-disk names follow the hub checkpoints, which transformers 5 still writes by default: one
tensor per expert (`model.layers.L.mlp.experts.E.gate_proj.weight`), and the pre-5 block name for
families it renamed (mixtral: `block_sparse_moe` on disk, `mlp` in memory).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar

from .errors import UnsupportedModelError

if TYPE_CHECKING:
    from .base import MoELayer

# Where a per-expert router bias acts: "logits" = added to the logits (`x W^T + bias`), so it moves the
# choice and the weights; "choice" = added to the scores for the choice only, weights untouched.
BIAS_SPACES = ("logits", "choice")


class DiskNames:
    """On-disk names of an MoE family's router and expert tensors (a mixin of `ArchAdapter`)."""

    model_type: str
    block_attr: ClassVar[str]
    router_attr: ClassVar[str]
    # decoder layers in a *ForCausalLM checkpoint
    disk_layers_prefix: ClassVar[str] = "model.layers"
    # in-memory block prefix -> on-disk block prefix, for families renamed by transformers 5
    disk_block_attr: ClassVar[str | None] = None
    # per-expert on-disk tensor suffixes (None: experts are fused on disk too)
    expert_disk_suffixes: ClassVar[tuple[str, ...] | None] = (
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    )
    # router attribute holding a per-expert bias, by the space it acts in (see BIAS_SPACES); a router
    # without that attribute has no such bias. These are transformers' names (gpt_oss `bias`,
    # deepseek_v3 / glm4_moe / dots1 `e_score_correction_bias`); a family keeping it elsewhere overrides.
    bias_attrs: ClassVar[dict[str, str]] = {"logits": "bias", "choice": "e_score_correction_bias"}

    if TYPE_CHECKING:  # from ConfigJson, the other half of the adapter
        def moe_layer_indices(self, config: dict) -> list[int]: ...
        def num_experts_from_config(self, config: dict) -> int: ...

    # ---------------------------------------------------------------- from a loaded model
    def disk_name(self, name: str) -> str:
        """On-disk tensor name for an in-memory parameter name of a router."""
        if self.disk_block_attr is None:
            return name
        return name.replace(f".{self.block_attr}.{self.router_attr}.", f".{self.disk_block_attr}.{self.router_attr}.")

    def router_tensor_names(self, layer: MoELayer) -> dict[str, str]:
        """{in-memory fully qualified name: on-disk name} of every tensor of this router."""
        names = {}
        for local, _ in list(layer.router.named_parameters(recurse=False)) + list(
            layer.router.named_buffers(recurse=False)
        ):
            mem = f"{layer.router_name}.{local}"
            names[mem] = self.disk_name(mem)
        return names

    def expert_disk_names(self, layer: MoELayer, expert: int) -> list[str]:
        """On-disk names of one expert's tensors in a loaded model's MoE layer."""
        return self._expert_names(self._disk_block(layer.block_name), expert)

    # ---------------------------------------------------------------- from config.json alone
    def disk_block_prefix(self, layer_index: int) -> str:
        """On-disk name of decoder layer `layer_index`'s MoE block, e.g. "model.layers.3.mlp"."""
        return self._disk_block(f"{self.disk_layers_prefix}.{int(layer_index)}.{self.block_attr}")

    def expert_tensor_names(self, config: dict, layer_index: int, expert: int) -> list[str]:
        """On-disk names of one expert's tensors, from config.json alone; refuses a dense layer or an
        expert the config does not have."""
        moe = self.moe_layer_indices(config)
        if layer_index not in moe:
            raise ValueError(f"layer {layer_index} of this {self.model_type} config.json is not an MoE layer; "
                             f"MoE layers are {moe}")
        experts = self.num_experts_from_config(config)
        if not 0 <= expert < experts:
            raise ValueError(f"expert {expert}: this {self.model_type} config.json has {experts} experts per layer, "
                             f"indices 0..{experts - 1}")
        return self._expert_names(self.disk_block_prefix(layer_index), expert)

    def expert_disk_prefix(self, layer_index: int) -> str:
        """The prefix every expert tensor of that layer has on disk, per-expert or fused: "...mlp.experts."."""
        return f"{self.disk_block_prefix(layer_index)}.experts."

    def split_expert_name(self, name: str, layer_index: int) -> tuple[int, str] | None:
        """(expert, rest) for a per-expert tensor name of that layer, e.g. (5, "gate_proj.weight"); None for
        any other name (another layer, a fused tensor, not an expert). `rest` keeps any extra suffix a
        checkpoint has (quantisation scales), so renaming an expert renames all of its tensors."""
        m = re.match(re.escape(self.expert_disk_prefix(layer_index)) + r"(\d+)\.(.+)$", name)
        return None if m is None else (int(m.group(1)), m.group(2))

    def expert_tensor_name(self, layer_index: int, expert: int, rest: str) -> str:
        """The inverse of `split_expert_name`: the name of `rest` of `expert` in that layer."""
        return f"{self.expert_disk_prefix(layer_index)}{int(expert)}.{rest}"

    def bias_disk_name(self, layer_index: int, space: str) -> str:
        """On-disk name of the router bias acting in `space` (see BIAS_SPACES), in the families whose router
        holds one (`ArchAdapter.router_bias` tells whether a loaded router does)."""
        if space not in BIAS_SPACES:
            raise ValueError(f"bias space={space!r}: expected one of {list(BIAS_SPACES)}")
        router = f"{self.disk_layers_prefix}.{int(layer_index)}.{self.block_attr}.{self.router_attr}"
        return self.disk_name(f"{router}.{self.bias_attrs[space]}")

    # ---------------------------------------------------------------- helpers
    def _disk_block(self, block_name: str) -> str:
        if self.disk_block_attr is None:
            return block_name
        return block_name.rsplit(".", 1)[0] + "." + self.disk_block_attr

    def _expert_names(self, disk_block: str, expert: int) -> list[str]:
        if self.expert_disk_suffixes is None:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} stores experts fused on disk; per-expert tensors do not exist"
            )
        return [f"{disk_block}.experts.{expert}.{s}" for s in self.expert_disk_suffixes]
