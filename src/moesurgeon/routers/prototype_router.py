"""PrototypeRouter: router rows moved towards each role's mean hidden state (a 'hidden' gate init).

Sparse upcycling initialises a new router from hidden states instead of at random; here the same
idea steers an existing router. For every layer and role, the prototype is the mean router input
(the hidden state the router sees) over the role's example tokens. The choice made here:

- directions are CENTRED: d_r = mean_r - mean over roles of mean_r, then unit-normalised. The
  uncentred mean is dominated by a direction every token shares, so writing it into a row would
  raise that expert for all roles alike; the centred one points at what is specific to role r;
- only rows of the role's experts change (`roles.role_experts`: boosted or forced experts, e.g.
  `experts: auto`); an expert claimed by several roles gets the mean of their directions;
- `mode: mix` (default) w' = (1 - alpha) w + alpha * gain * |w| * d_r keeps part of what the row
  did; `mode: replace` is alpha = 1: the row becomes the prototype direction, scaled to the old
  row's norm (times `gain`) so logits stay on the family's scale.

The result is an ordinary router weight: no role context at run time, and the export writes the
new rows into the standard router tensor (exact). In memory the edit is applied as
logits + h (W' - W)^T on top of the family's own logits, so dtypes and any bias stay the family's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..arch import ArchAdapter, MoELayer
from ..block_runner import Batch, run_blocks
from ..data import TokenBlocks
from .errors import RouterConfigError
from .roles import RoleSet
from .substitute import CustomRouter

MODES = ("mix", "replace")


def role_prototypes(model, adapter: ArchAdapter, blocks_by_role: Mapping[str, TokenBlocks], batch_size: int = 8,
                    progress: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """{MoE layer index: {role: mean router input [H] (float32, CPU)}} over each role's real tokens."""
    layers = adapter.moe_layers(model)
    sums = {layer.index: {} for layer in layers}

    def hook_for(layer: MoELayer, role: str):
        def hook(module, inputs, output, batch: Batch) -> None:
            h = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            m = batch.real(h.device).reshape(-1, 1).to(h.dtype)
            total, count = sums[layer.index].get(role, (0.0, 0.0))
            sums[layer.index][role] = (total + (h * m).sum(0).cpu(), count + float(m.sum()))
        return hook

    for role, blocks in blocks_by_role.items():
        if len(blocks) == 0:
            raise RouterConfigError(f"role {role!r} has no example blocks to build its prototype from")
        run_blocks(model, blocks, batch_size, hooks=[(layer.router, hook_for(layer, role)) for layer in layers],
                   progress=progress, desc=f"prototype {role}")
    return {i: {r: t / max(c, 1.0) for r, (t, c) in per.items()} for i, per in sums.items()}


def prototype_weight(weight: torch.Tensor, layer_index: int, roles: RoleSet, prototypes: Mapping[str, torch.Tensor],
                     mode: str = "mix", alpha: float = 0.5, gain: float = 1.0) -> torch.Tensor:
    """The new router weight [E, H] (float32) for one layer; see the module docstring."""
    if mode not in MODES:
        raise RouterConfigError(f"prototype mode={mode!r}: expected one of {list(MODES)}")
    if mode == "mix" and not 0.0 < alpha <= 1.0:
        raise RouterConfigError(f"prototype alpha={alpha!r}: expected a number in (0, 1], e.g. alpha: 0.5")
    missing = [r for r in roles.names if r not in prototypes]
    if missing:
        raise RouterConfigError(f"no prototype for roles {missing} in layer {layer_index}; compute prototypes from "
                                "example blocks of every role (role_prototypes)")
    a = 1.0 if mode == "replace" else float(alpha)
    means = torch.stack([prototypes[r].float() for r in roles.names])
    centred = means - means.mean(dim=0, keepdim=True) if len(roles.names) > 1 else means
    dirs = F.normalize(centred, dim=-1)
    w = weight.detach().float().cpu()
    new = w.clone()
    claimed: dict[int, list[int]] = {}
    for r, name in enumerate(roles.names):
        for e in roles.role_experts(name, layer_index):
            claimed.setdefault(e, []).append(r)
    for e, rs in claimed.items():
        d = F.normalize(dirs[rs].mean(dim=0), dim=-1)
        new[e] = (1.0 - a) * w[e] + a * gain * w[e].norm() * d
    return new


class PrototypeRouter(CustomRouter):
    """A router whose rows for role experts were moved towards role prototypes (role-independent at run time)."""

    exact_export: ClassVar[str | None] = "weights"  # `new_weight` is a standard router weight
    resources: ClassVar[tuple[str, ...]] = ("roles", "prototypes")

    def __init__(self, layer: MoELayer, adapter: ArchAdapter, roles: RoleSet,
                 prototypes: Mapping[int, Mapping[str, torch.Tensor]], mode: str = "mix", alpha: float = 0.5,
                 gain: float = 1.0):
        super().__init__(layer, adapter)
        if layer.index not in prototypes:
            raise RouterConfigError(f"no prototypes for MoE layer {layer.index}; they were computed for "
                                    f"{sorted(prototypes)}")
        weight = layer.router.weight
        new = prototype_weight(weight, layer.index, roles, prototypes[layer.index], mode, alpha, gain)
        self.mode, self.alpha, self.gain = mode, alpha, gain
        self.register_buffer("new_weight", new.to(weight.device), persistent=False)
        self.register_buffer("delta", (new - weight.detach().float().cpu()).to(weight.device), persistent=False)

    def edit(self, logits: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        h = hidden_states.reshape(-1, hidden_states.shape[-1]).to(logits.dtype)
        return logits + F.linear(h, self.delta.to(logits.device, logits.dtype))

    def extra_repr(self) -> str:
        return f"layer={self.layer.index}, mode={self.mode}, alpha={self.alpha}, gain={self.gain}"
