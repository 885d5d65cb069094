"""A static per-expert bias written into the family's own router bias tensor: exact for what that tensor affects.

Which tensor holds a bias of which space is the adapter's answer (`adapter.router_bias(layer, space)`):
- `space="logits"` -> a logit bias (gpt_oss `router.bias`: logits = x W^T + bias): logits, selection
  and weights are all exactly those of the in-memory StaticBiasRouter (up to rounding to the stored dtype).
- `space="choice"` -> the family's choice bias (deepseek_v3: only the choice reads it): selection
  exact, weights untouched — which is what a choice-space bias does in memory too.
Families without such a tensor (qwen, mixtral, olmoe) cannot hold a constant logit offset in a
standard checkpoint; asking for it is refused with the alternative (role_router.export.mode=distill).
"""

from __future__ import annotations

import torch

from ..arch import BIAS_SPACES, ArchAdapter, MoELayer
from ..routers.errors import RouterConfigError


def bias_tensor(adapter: ArchAdapter, layer: MoELayer, space: str) -> torch.Tensor:
    """The router tensor that holds a `space` bias in this family, or a RouterConfigError saying why none does."""
    if space not in BIAS_SPACES:
        raise RouterConfigError(f"static bias space={space!r}: expected 'logits' or 'choice'")
    tensor = adapter.router_bias(layer, space)
    if tensor is None:
        other = [s for s in BIAS_SPACES if adapter.router_bias(layer, s) is not None]
        alt = (f"use space={other[0]} (this family has {adapter.bias_attrs[other[0]]})" if other
               else "export with role_router.export.mode=distill")
        raise RouterConfigError(
            f"role_router.export.mode=bias: {adapter.model_type} routers have no `{adapter.bias_attrs[space]}` tensor of "
            f"{layer.num_experts} entries, so a {space}-space bias cannot be written exactly into a standard "
            f"checkpoint; {alt}")
    return tensor


@torch.no_grad()
def write_static_bias(model, adapter: ArchAdapter, biases: dict[int, torch.Tensor], space: str
                      ) -> dict[int, torch.Tensor]:
    """Add `biases[layer index]` [E] to the family's bias tensor in memory; returns the previous values."""
    previous = {}
    for layer in adapter.moe_layers(model):
        if layer.index not in biases:
            continue
        target = bias_tensor(adapter, layer, space)
        previous[layer.index] = target.detach().clone()
        target.add_(biases[layer.index].to(target.device, target.dtype))
    return previous


def check_bias_export(adapter: ArchAdapter, layers: list[MoELayer], space: str) -> None:
    """Fail before any work when the family cannot hold the bias (see bias_tensor)."""
    for layer in layers:
        bias_tensor(adapter, layer, space)
