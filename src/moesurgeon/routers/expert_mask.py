"""ExpertMaskRouter: disable chosen experts; the remaining selection renormalises as the family does.

    experts: [3, 7]                 # the same experts in every substituted layer
    experts: {0: [3], 2: [1, 5]}    # per MoE layer index; layers not listed are left unmasked

Masked experts get logit -inf, so softmax families give them probability 0 and share the mass
over the others — the same numbers as a model whose router has only the remaining experts, which
is what makes `surgery.prune_experts` an exact export for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from ..arch import ArchAdapter, MoELayer
from .errors import RouterConfigError
from .substitute import CustomRouter

MaskSpec = Sequence[int] | Mapping[int, Sequence[int]]


def _expert_list(value, where: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise RouterConfigError(f"{where}={value!r}: expected a list of expert indices, e.g. [3, 7]")
    out = []
    for e in value:
        if isinstance(e, bool) or not isinstance(e, int):
            raise RouterConfigError(f"{where} holds {e!r}: expert indices are integers, e.g. [3, 7]")
        out.append(int(e))
    return sorted(set(out))


def check_experts(experts: list[int], num_experts: int, where: str) -> None:
    bad = [e for e in experts if not 0 <= e < num_experts]
    if bad:
        raise RouterConfigError(
            f"{where}: expert index {bad[0]} is out of range; this model has {num_experts} experts per layer, "
            f"indices 0..{num_experts - 1}. Fix the index (experts are numbered from 0)"
        )


def resolve_mask(spec: MaskSpec, layers: list[MoELayer], top_k: int | Mapping[int, int]) -> dict[int, list[int]]:
    """{MoE layer index: sorted masked experts}, validated against each layer's experts and top-k."""
    if isinstance(spec, Mapping):
        by_index = {layer.index: layer for layer in layers}
        unknown = [k for k in spec if int(k) not in by_index]
        if unknown:
            raise RouterConfigError(
                f"expert mask names layer {unknown[0]}, which is not an MoE layer; MoE layer indices are "
                f"{sorted(by_index)}. Key the mask by those, or give one list for every layer"
            )
        mask = {int(k): _expert_list(v, f"expert mask for layer {k}") for k, v in spec.items()}
    else:
        experts = _expert_list(spec, "expert mask")
        mask = {layer.index: experts for layer in layers}
    for layer in layers:
        experts = mask.get(layer.index, [])
        check_experts(experts, layer.num_experts, f"expert mask for layer {layer.index}")
        k = top_k[layer.index] if isinstance(top_k, Mapping) else top_k
        left = layer.num_experts - len(experts)
        if left < k:
            raise RouterConfigError(
                f"expert mask for layer {layer.index} disables {len(experts)} of {layer.num_experts} experts, "
                f"leaving {left}, fewer than top-k={k}: every token needs {k} experts. Mask at most "
                f"{layer.num_experts - k} experts per layer (or lower top-k first)"
            )
    return {i: e for i, e in mask.items() if e}


class ExpertMaskRouter(CustomRouter):
    """The family router with some experts disabled (logit -inf)."""

    exact_export: ClassVar[str | None] = "prune"  # surgery/prune_experts.py: a checkpoint without those experts

    def __init__(self, layer: MoELayer, adapter: ArchAdapter, experts: MaskSpec = ()):
        super().__init__(layer, adapter)
        if isinstance(experts, Mapping):  # per layer: only this layer's entry; layers not listed stay unmasked
            experts = {k: v for k, v in experts.items() if int(k) == layer.index}
        self.masked = resolve_mask(experts, [layer], self.top_k).get(layer.index, [])
        keep = torch.zeros(layer.num_experts, dtype=torch.bool)
        keep[self.masked] = True
        self.register_buffer("mask", keep.to(self.device), persistent=False)

    def edit(self, logits: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.masked:
            return logits
        return logits.masked_fill(self.mask.to(logits.device), float("-inf"))

    def extra_repr(self) -> str:
        return f"layer={self.layer.index}, masked={self.masked}"
