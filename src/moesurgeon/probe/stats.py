"""Router-usage statistics: the accumulated tensors, what is derived from them, and their file format.

Layout (L MoE layers, G label groups, E experts). Counts are exact integers:
- `tokens  [L, G]`     non-padding tokens that reached the router
- `counts  [L, G, E]`  tokens that selected expert e (a token with top-k adds k selections)
- `gate_mass [L, G, E]` sum of routing weights given to expert e
- `prob_sum  [L, G, E]` sum of the router's score for expert e over all tokens (selected or not)
- `entropy_sum [L, G]` sum over tokens of the routing entropy in bits (scores normalised to 1)
- `coact [L, G, E, E]` tokens that selected both i and j (diagonal = counts): true joint counts

Saved as safetensors with the names above plus metadata `layer_names`, `group_names`, `top_k`
(JSON lists). `UsageStats.load` reads it back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSORS = ("tokens", "counts", "gate_mass", "prob_sum", "entropy_sum", "coact")
FORMAT = "moesurgeon.router_usage.v1"


def write_layer_tables(path: str | Path, fmt: str, layer_names: list[str], group_names: list[str], top_k,
                       tensors: dict[str, torch.Tensor]) -> Path:
    """One safetensors file of per-layer statistics: the tensors plus the metadata every reader needs
    (format, router names, label groups, top-k). Shared by usage statistics and expert scores."""
    meta = {"format": fmt, "layer_names": json.dumps(layer_names), "group_names": json.dumps(group_names),
            "top_k": json.dumps(top_k)}
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(path), metadata=meta)
    return Path(path)


def read_layer_tables(path: str | Path, fmt: str, not_this_format: str) -> tuple[list, list, object, dict]:
    """(layer_names, group_names, top_k, tensors) of a file `write_layer_tables` wrote with format `fmt`;
    another file is refused with `not_this_format` (formatted with {path} and {found})."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != fmt:
        raise ValueError(not_this_format.format(path=path, found=meta.get("format")))
    tensors = load_file(str(path))
    return json.loads(meta["layer_names"]), json.loads(meta["group_names"]), json.loads(meta["top_k"]), tensors


@dataclass
class UsageStats:
    layer_names: list[str]
    group_names: list[str]
    top_k: list[int]
    tokens: torch.Tensor
    counts: torch.Tensor
    gate_mass: torch.Tensor
    prob_sum: torch.Tensor
    entropy_sum: torch.Tensor
    coact: torch.Tensor

    @classmethod
    def zeros(cls, layer_names, group_names, num_experts: int, top_k, device=None) -> "UsageStats":
        L, G, E = len(layer_names), len(group_names), num_experts
        z = dict(device=device)
        return cls(
            list(layer_names), list(group_names), list(top_k),
            tokens=torch.zeros(L, G, dtype=torch.int64, **z),
            counts=torch.zeros(L, G, E, dtype=torch.int64, **z),
            gate_mass=torch.zeros(L, G, E, dtype=torch.float64, **z),
            prob_sum=torch.zeros(L, G, E, dtype=torch.float64, **z),
            entropy_sum=torch.zeros(L, G, dtype=torch.float64, **z),
            coact=torch.zeros(L, G, E, E, dtype=torch.int64, **z),
        )

    @property
    def num_experts(self) -> int:
        return self.counts.shape[-1]

    def to(self, device) -> "UsageStats":
        moved = {name: getattr(self, name).to(device) for name in TENSORS}
        return UsageStats(self.layer_names, self.group_names, self.top_k, **moved)

    # ------------------------------------------------------------------ file format
    def save(self, path: str | Path) -> Path:
        return write_layer_tables(path, FORMAT, self.layer_names, self.group_names, self.top_k,
                                  {n: getattr(self, n) for n in TENSORS})

    @classmethod
    def load(cls, path: str | Path) -> "UsageStats":
        layers, groups, top_k, tensors = read_layer_tables(
            path, FORMAT, "{path}: not a moesurgeon router-usage file (metadata format={found!r}); "
            "expected a `usage_stats.safetensors` written by experiment=router_usage")
        return cls(layers, groups, top_k, **{n: tensors[n] for n in TENSORS})

    # ------------------------------------------------------------------ derived quantities
    def merged(self) -> "UsageStats":
        """All groups summed into one group named 'all'."""
        summed = {n: getattr(self, n).sum(dim=1, keepdim=True) for n in TENSORS}
        return UsageStats(self.layer_names, ["all"], self.top_k, **summed)

    def usage_share(self) -> torch.Tensor:
        """[L, G, E]: each group's selections per expert as a share of its selections."""
        c = self.counts.double()
        return c / c.sum(dim=-1, keepdim=True).clamp_min(1)

    def mean_entropy_bits(self) -> torch.Tensor:
        """[L, G]: mean per-token routing entropy in bits."""
        return self.entropy_sum / self.tokens.double().clamp_min(1)

    def load_imbalance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([L, G] max/mean, [L, G] coefficient of variation) of selections per expert."""
        c = self.counts.double()
        mean = c.mean(dim=-1).clamp_min(1e-12)
        return c.max(dim=-1).values / mean, c.std(dim=-1, unbiased=False) / mean

    def top_n_share(self, n: int = 2) -> torch.Tensor:
        """[L, G]: share of each group's selections taken by its own n most used experts."""
        share = self.usage_share()
        return share.topk(min(n, share.shape[-1]), dim=-1).values.sum(dim=-1)

    def coactivation_conditional(self, layer: int, group: int | None = None) -> torch.Tensor:
        """[E, E]: P(j selected | i selected) for one layer (all groups when group is None)."""
        co = self.coact[layer].sum(0) if group is None else self.coact[layer, group]
        co = co.double()
        return co / co.diagonal().clamp_min(1).unsqueeze(-1)


def entropy_bits(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    p = p.clamp_min(0)
    p = p / p.sum(dim=dim, keepdim=True).clamp_min(1e-30)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(dim=dim)


def js_divergence_bits(dists: torch.Tensor) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (equal weights, bits) of distributions on dim -2.

    dists [..., G, E] -> [...]: H(mean_g P_g) - mean_g H(P_g). 0 when all groups route alike,
    at most log2(G).
    """
    mixture = dists.mean(dim=-2)
    return entropy_bits(mixture) - entropy_bits(dists).mean(dim=-1)


def layer_metrics(stats: UsageStats) -> dict[str, float]:
    """Flat per-layer and mean metrics for metrics.json (keys documented in README)."""
    out: dict[str, float] = {}
    merged = stats.merged()
    ent = merged.mean_entropy_bits()[:, 0]
    imb_max, imb_cv = merged.load_imbalance()
    has_groups = len(stats.group_names) > 1
    jsd = js_divergence_bits(stats.usage_share()) if has_groups else None
    for i, name in enumerate(stats.layer_names):
        out[f"entropy_bits/{name}"] = float(ent[i])
        out[f"imbalance_max_over_mean/{name}"] = float(imb_max[i, 0])
        out[f"imbalance_cv/{name}"] = float(imb_cv[i, 0])
        if jsd is not None:
            out[f"jsd_bits/{name}"] = float(jsd[i])
    out["entropy_bits/mean"] = float(ent.mean())
    out["imbalance_max_over_mean/mean"] = float(imb_max.mean())
    out["imbalance_cv/mean"] = float(imb_cv.mean())
    out["tokens"] = int(merged.tokens[0, 0])
    if jsd is not None:
        out["jsd_bits/mean"] = float(jsd.mean())
        top2 = stats.top_n_share(2)  # [L, G]
        for g, group in enumerate(stats.group_names):
            out[f"top2_share/{group}"] = float(top2[:, g].mean())
            out[f"tokens/{group}"] = int(stats.tokens[0, g])
        out["top2_share/uniform"] = min(2, stats.num_experts) / stats.num_experts
    if not math.isfinite(out["entropy_bits/mean"]):
        raise FloatingPointError("router entropy is not finite: the model produced NaN router scores")
    return out
