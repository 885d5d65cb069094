"""RoleAwareRouter: the family router, steered per token by the token's role.

Each token's role comes from a `RoleContext` (tags in the prompt, or the data label); the role's
preferences for this layer (boost / force / forbid, see roles.py) are looked up in small [R+1, E]
tables built once at construction, so the per-token cost is one gather and one add. Tokens without
a role use the last, all-zero row: the family's routing unchanged.

In families with a group limit (`adapter.group_limit`, deepseek_v3: only experts in the best few
groups can be chosen) a role may force experts from at most that many groups; more cannot all be chosen.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..arch import ArchAdapter, MoELayer
from .errors import RouterConfigError
from .role_context import RoleContext
from .roles import RoleSet
from .substitute import CustomRouter


def _check_groups(adapter: ArchAdapter, layer: MoELayer, roles: RoleSet, force: torch.Tensor) -> None:
    limit = adapter.group_limit(layer)
    if limit is None:
        return
    groups, kept = limit
    size = layer.num_experts // groups
    for r, role in enumerate(roles.roles):
        used = sorted({e // size for e in force[r].nonzero().flatten().tolist()})
        if len(used) > kept:
            raise RouterConfigError(
                f"role {role.name!r} forces experts in groups {used} of layer {layer.index}, but this family chooses "
                f"from the best {kept} of {groups} groups of {size} experts (its group limit); force experts from "
                f"at most {kept} groups (or boost them instead)")


class RoleAwareRouter(CustomRouter):
    """Per-token role preferences on top of the family's routing."""

    # per-token roles: no standard tensor holds them, so distilled (surgery/export_plan.py still finds the special case of
    # one uniform boost, which a family's logit bias holds exactly)
    exact_export: ClassVar[str | None] = None
    resources: ClassVar[tuple[str, ...]] = ("roles", "context")

    def __init__(self, layer: MoELayer, adapter: ArchAdapter, roles: RoleSet, context: RoleContext):
        super().__init__(layer, adapter)
        if not isinstance(roles, RoleSet):
            raise RouterConfigError(f"RoleAwareRouter needs a resolved RoleSet, got {type(roles).__name__}; build it with "
                                    "RoleSet.from_mapping(...) and resolve experts=auto from a usage profile")
        if context.roles is not roles and context.roles.names != roles.names:
            raise RouterConfigError(f"the RoleContext knows roles {context.roles.names} but the router got "
                                    f"{roles.names}; build both from the same RoleSet")
        self.roles = roles
        self.context = context
        bias, force, margin = roles.layer_tables(layer, self.top_k)
        _check_groups(adapter, layer, roles, force)
        self.register_buffer("bias_table", bias.to(self.device), persistent=False)
        self.register_buffer("force_table", force.to(self.device), persistent=False)
        self.register_buffer("margin_table", margin.to(self.device), persistent=False)
        self.any_force = bool(force.any())

    def edit(self, logits: torch.Tensor, hidden_states: torch.Tensor):
        T = logits.shape[0]
        rid = self.context.token_roles(T, logits.device)
        rid = torch.where(rid >= 0, rid, len(self.roles.roles))  # -1 -> the "no role" row
        edited = logits + self.bias_table.to(logits.device)[rid].to(logits.dtype)
        if not self.any_force:
            return edited
        return edited, self.force_table.to(logits.device)[rid], self.margin_table.to(logits.device)[rid].to(logits.dtype)

    def extra_repr(self) -> str:
        return f"layer={self.layer.index}, roles={self.roles.names}"
