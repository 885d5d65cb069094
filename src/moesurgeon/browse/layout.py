"""Which on-disk tensor belongs to which decoder layer, router and expert: the browser's map of a checkpoint.

The family-specific answers come from the architecture adapter (`arch.get_adapter(config.json)`):
the block and router attribute names, the pre-transformers-5 block name kept on disk
(`disk_block_attr`), the per-expert tensor suffixes and the expert count. Two on-disk layouts are
recognised for every family, whatever the adapter's default:

- per expert: `<layers>.L.<block>.experts.E.<part>` (hub checkpoints, `save_pretrained` default);
- fused: `<layers>.L.<block>.experts.<part>` with dim 0 = experts (gpt_oss always; any family saved
  with `save_original_format=False`, which also keeps the in-memory block name, e.g. mixtral `mlp`).

Router tensors are the ones under `<block>.<router_attr>.`; router rows are experts.
Nothing here branches on `model_type`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..arch import get_adapter

# the decoder-layer coordinate of every HF causal LM checkpoint: "...layers.<N>...."
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"(\d+)\.(.+)$")


@dataclass(frozen=True)
class ExpertPart:
    """One matrix (or bias) of one expert: a whole tensor, or slice `expert` of dim 0 of a fused tensor."""

    tensor: str
    part: str  # e.g. "gate_proj.weight" (per expert) or "gate_up_proj" (fused)
    fused: bool


@dataclass
class LayerLayout:
    """One MoE layer: its router tensors and, per expert, the parts that make it up."""

    index: int
    block: str  # on-disk block prefix, e.g. "model.layers.3.mlp"
    router: dict[str, str] = field(default_factory=dict)  # local name ("weight", "bias", ...) -> tensor
    parts: dict[int, list[ExpertPart]] = field(default_factory=dict)

    @property
    def storage(self) -> str:
        kinds = {p.fused for parts in self.parts.values() for p in parts}
        return "fused" if kinds == {True} else "per-expert" if kinds == {False} else "mixed" if kinds else "none"

    def part_names(self) -> list[str]:
        names: list[str] = []
        for parts in self.parts.values():
            for p in parts:
                if p.part not in names:
                    names.append(p.part)
        return names


@dataclass
class ModelLayout:
    model_type: str
    num_experts: int
    num_layers: int
    top_k: int | None
    layers: dict[int, LayerLayout]  # MoE layers only
    tensor_layer: dict[str, int | None]  # every tensor -> decoder layer (None: embeddings, final norm, head)
    tensor_role: dict[str, str]  # "router" | "expert" | "layer" | "model"
    notes: list[str]

    def expert_count(self, layer: int) -> int:
        """Experts present on disk in that layer (a pruned export may hold fewer than config.json says)."""
        return len(self.layers[layer].parts) if layer in self.layers else 0


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def block_names(adapter) -> list[str]:
    """Block attribute names a checkpoint of this family may use on disk, disk name first (a fused save by
    transformers 5 keeps the in-memory name, e.g. mixtral `mlp`; a hub checkpoint the disk name)."""
    names = [adapter.disk_block_attr, adapter.block_attr]
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def detect_layout(config: Mapping, shapes: Mapping[str, tuple[int, ...] | None]) -> ModelLayout:
    """Map every tensor name to its layer and role; MoE layers get router and expert parts.

    `shapes`: {tensor name: shape} from the headers; None for a tensor of an unreadable shard (a per-expert
    tensor still counts as its expert's part, marked unreadable later; a fused one cannot say its experts). Raises the adapter's UnsupportedModelError for a
    family it does not know (the caller then shows the inventory alone).
    """
    adapter = get_adapter(dict(config))
    num_experts = adapter.num_experts_from_config(dict(config))
    blocks = block_names(adapter)
    layers: dict[int, LayerLayout] = {}
    tensor_layer: dict[str, int | None] = {}
    tensor_role: dict[str, str] = {}
    notes: list[str] = []
    odd_fused: list[str] = []
    for name, shape in shapes.items():
        index = layer_of(name)
        tensor_layer[name] = index
        tensor_role[name] = "model" if index is None else "layer"
        if index is None:
            continue
        for block in blocks:
            marker = f"layers.{index}.{block}."
            at = name.find(marker)
            if at < 0:
                continue
            prefix = name[: at + len(marker) - 1]
            rest = name[at + len(marker):]
            if rest.startswith(f"{adapter.router_attr}."):
                _layer(layers, index, prefix).router[rest[len(adapter.router_attr) + 1:]] = name
                tensor_role[name] = "router"
            elif rest.startswith(f"{adapter.experts_attr}."):
                rest = rest[len(adapter.experts_attr) + 1:]
                m = _PER_EXPERT.match(rest)
                if m is not None:
                    expert = int(m.group(1))
                    _layer(layers, index, prefix).parts.setdefault(expert, []).append(
                        ExpertPart(name, m.group(2), False))
                    tensor_role[name] = "expert"
                elif shape is not None and len(shape) >= 2 and shape[0] > 0:
                    lay = _layer(layers, index, prefix)
                    for expert in range(shape[0]):
                        lay.parts.setdefault(expert, []).append(ExpertPart(name, rest, True))
                    tensor_role[name] = "expert"
                    if shape[0] != num_experts:
                        odd_fused.append(f"{name} {list(shape)}")
            break
    for lay in layers.values():
        lay.parts = dict(sorted(lay.parts.items()))
    if odd_fused:
        notes.append(f"fused expert tensors whose first dimension is not config.json's {num_experts} experts "
                     f"(e.g. {odd_fused[0]}): drawn with the experts they hold")
    counts = sorted({len(lay.parts) for lay in layers.values()})
    if counts and counts != [num_experts]:
        notes.append(f"config.json says {num_experts} experts per layer; the files hold {counts}")
    if not layers:
        notes.append(f"no router or expert tensors under the {adapter.model_type} block names {blocks}: "
                     "this checkpoint's names are not the ones its family writes; only the inventory is shown")
    num_layers = int(config.get("num_hidden_layers") or 0)
    seen = [i for i in tensor_layer.values() if i is not None]
    num_layers = max(num_layers, max(seen) + 1 if seen else 0)
    top_k = config.get(adapter.top_k_key)
    return ModelLayout(adapter.model_type, int(num_experts), num_layers,
                       int(top_k) if isinstance(top_k, int) else None,
                       dict(sorted(layers.items())), tensor_layer, tensor_role, notes)


def _layer(layers: dict[int, LayerLayout], index: int, prefix: str) -> LayerLayout:
    lay = layers.get(index)
    if lay is None:
        lay = layers[index] = LayerLayout(index, prefix)
    return lay


def inventory_only_layout(shapes: Mapping[str, tuple[int, ...]], note: str) -> ModelLayout:
    """A layout without MoE structure (no config.json, or a family no adapter knows): layers from names only."""
    tensor_layer = {name: layer_of(name) for name in shapes}
    seen = [i for i in tensor_layer.values() if i is not None]
    roles = {name: "model" if i is None else "layer" for name, i in tensor_layer.items()}
    return ModelLayout("unknown", 0, max(seen) + 1 if seen else 0, None, {}, tensor_layer, roles, [note])
