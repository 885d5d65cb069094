"""Measure routing and perplexity label group by label group, and how much of a role's traffic its experts get.

Label-triggered roles are set per forward (`RoleContext.data_label`), so measurement runs one label
group at a time inside `scope(label)`. The unmodified model is measured through the same loop
(scope None), so batches and therefore tokens/s are like for like.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ..arch import ArchAdapter, MoELayer
from ..data import TokenBlocks
from ..evaluate import evaluate_perplexity
from ..probe import UsageStats, profile_usage
from ..probe.stats import TENSORS
from .agreement import label_groups
from .roles import RoleSet


@dataclass
class Measurement:
    stats: UsageStats
    ppl: dict[str, float]           # per label, plus "all"
    tokens_per_s: float             # perplexity forward throughput over all groups
    probe_tokens_per_s: float       # throughput of the profiling pass (router hooks on)

    def flat(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/ppl/{g}": v for g, v in self.ppl.items()}
        out[f"{prefix}/tokens_per_s"] = self.tokens_per_s
        out[f"{prefix}/probe_tokens_per_s"] = self.probe_tokens_per_s
        return out


def _sum_stats(parts: list[UsageStats]) -> UsageStats:
    first = parts[0]
    summed = {n: sum(getattr(p, n) for p in parts) for n in TENSORS}
    return UsageStats(first.layer_names, first.group_names, first.top_k, **summed)


def measure(model, adapter: ArchAdapter, blocks: TokenBlocks, batch_size: int = 8,
            scope: Callable[[str], AbstractContextManager] | None = None, progress: bool = False,
            desc: str = "eval") -> Measurement:
    """Usage statistics, perplexity per label and tokens/s, one label group at a time."""
    stats, nll, count = [], {}, {}
    seconds = tokens = probe_seconds = 0.0
    for label, group in label_groups(blocks).items():
        with scope(label) if scope is not None else nullcontext():
            ev = evaluate_perplexity(model, group, batch_size, progress, desc=f"{desc} {label}")
            st, probe_tps = profile_usage(model, adapter, group, batch_size, progress=progress, desc=f"{desc} {label}")
        stats.append(st)
        nll.update({g: nll.get(g, 0.0) + v for g, v in ev.nll_sum.items()})
        count.update({g: count.get(g, 0) + v for g, v in ev.tokens.items()})
        seen = ev.tokens_per_s * ev.seconds
        seconds += ev.seconds
        tokens += seen
        probe_seconds += seen / max(probe_tps, 1e-9)
    ppl = {g: math.exp(nll[g] / count[g]) for g in nll if count[g] > 0}
    if len(ppl) > 1 or "all" not in ppl:
        ppl["all"] = math.exp(sum(nll.values()) / max(sum(count.values()), 1))
    return Measurement(_sum_stats(stats), ppl, tokens / max(seconds, 1e-9), tokens / max(probe_seconds, 1e-9))


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
