"""StaticBiasRouter: a fixed per-expert preference, the same for every token.

    bias: {3: 1.5, 7: -2.0}                   # expert -> bias, every substituted layer
    bias: {0: {3: 1.5}, 2: {7: -2.0}}         # MoE layer index -> {expert: bias}
    space: auto                               # logits | choice | auto

Where the bias is added decides what a standard checkpoint can hold exactly:
- `logits`: added to the router logits before the family's selection and weighting. gpt_oss
  routers compute `x W^T + bias`, so this is exactly `router.bias` (surgery/bias_export.py).
- `choice`: added to the score used only to CHOOSE experts, weights unchanged — exactly what the
  family's choice bias does (`adapter.choice_bias`, deepseek_v3: sigmoid score + bias). Only for
  such families.
- `auto`: `choice` where the family has a choice bias, else `logits`.
Softmax families without a router bias (qwen, mixtral, olmoe) can run either in memory, but no
standard tensor holds a constant logit offset: their export is distilled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from ..arch import ArchAdapter, MoELayer
from ..arch.selection import with_choice_bias
from .errors import RouterConfigError
from .expert_mask import check_experts
from .substitute import CustomRouter

SPACES = ("auto", "logits", "choice")


def layer_bias(spec: Mapping, layer: MoELayer) -> dict[int, float]:
    """This layer's {expert: bias} from a flat or per-layer spec (per-layer: values are mappings)."""
    if not isinstance(spec, Mapping):
        raise RouterConfigError(f"static bias={spec!r}: expected {{expert: bias}} or {{layer: {{expert: bias}}}}")
    nested = any(isinstance(v, Mapping) for v in spec.values())
    if nested:
        if not all(isinstance(v, Mapping) for v in spec.values()):
            raise RouterConfigError("static bias mixes {expert: bias} and {layer: {expert: bias}} entries; use one form")
        spec = spec.get(layer.index, spec.get(str(layer.index), {}))
    out = {}
    for e, b in spec.items():
        if isinstance(e, bool) or not isinstance(e, int) or isinstance(b, bool) or not isinstance(b, (int, float)):
            raise RouterConfigError(f"static bias entry {e!r}: {b!r}: expected an integer expert and a number")
        out[int(e)] = float(b)
    check_experts(sorted(out), layer.num_experts, f"static bias for layer {layer.index}")
    return out


def resolve_space(space: str, layer: MoELayer, adapter: ArchAdapter) -> str:
    if space not in SPACES:
        raise RouterConfigError(f"static bias space={space!r}: expected one of {list(SPACES)}")
    has_choice_bias = adapter.choice_bias(layer) is not None
    if space == "auto":
        return "choice" if has_choice_bias else "logits"
    if space == "choice" and not has_choice_bias:
        raise RouterConfigError(
            f"static bias space='choice' needs a family that chooses experts by score + correction bias "
            f"(deepseek_v3); {adapter.model_type} has none. Use space=logits (or auto)"
        )
    return space


class StaticBiasRouter(CustomRouter):
    """The family router with a constant per-expert bias (see module docstring for `space`)."""

    exact_export: ClassVar[str | None] = "bias"  # surgery/bias_export.py: the family's own router bias tensor

    def __init__(self, layer: MoELayer, adapter: ArchAdapter, bias: Mapping | None = None, space: str = "auto"):
        super().__init__(layer, adapter)
        values = layer_bias(bias or {}, layer)
        self.space = resolve_space(space, layer, adapter)
        table = torch.zeros(layer.num_experts, dtype=torch.float32)
        for e, b in values.items():
            table[e] = b
        self.register_buffer("bias", table.to(self.device), persistent=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        logits = self.family_forward(hidden_states)[0]
        if self.space == "logits":
            return self.route(logits + self.bias.to(logits.device, logits.dtype))
        # the bias joins the family's choice bias, which only the choice reads
        bias = self.adapter.choice_bias(self.layer) + self.bias.to(logits.device)
        return self.adapter.route_from_logits(with_choice_bias(self.adapter, self.layer, bias), logits)

    def extra_repr(self) -> str:
        nz = {int(e): round(float(b), 4) for e, b in enumerate(self.bias) if b != 0}
        return f"layer={self.layer.index}, space={self.space}, bias={nz}"
