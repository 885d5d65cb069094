"""role_share: how much of a role's routing traffic goes to the role's own experts, layer by layer."""

from __future__ import annotations

import torch

from ..arch import MoELayer
from ..probe import UsageStats
from .roles import RoleSet


def role_share(stats: UsageStats, roles: RoleSet, layers: list[MoELayer]) -> dict[str, torch.Tensor]:
    """{role: [L] share of the role's expert selections that went to the role's experts, per layer}.

    The role's tokens are its profile group (its label, else its name); roles without such a group
    in `stats` are left out. A role with no experts in a layer scores 0 there.
    """
    out = {}
    for role in roles.roles:
        if role.profile_group not in stats.group_names:
            continue
        g = stats.group_names.index(role.profile_group)
        shares = []
        for pos, layer in enumerate(layers):
            experts = roles.role_experts(role.name, layer.index)
            counts = stats.counts[pos, g].double()
            shares.append(float(counts[experts].sum() / counts.sum().clamp_min(1)) if experts else 0.0)
        out[role.name] = torch.tensor(shares)
    return out
