"""One adapter per supported MoE family (transformers 5.x module layout).

Each class states only what differs from `ArchAdapter`'s defaults. Facts behind these choices are
in ../shared/notes/transformers5-moe.md (router classes, scoring, on-disk names).
"""

from __future__ import annotations

import torch

from .base import ArchAdapter, MoELayer


class Qwen3MoeAdapter(ArchAdapter):
    """Qwen3-MoE: softmax over all experts, top-k, optional renormalisation (norm_topk_prob).
    Dense layers come from `mlp_only_layers` / `decoder_sparse_step`."""

    model_types = ("qwen3_moe",)
    router_class_names = ("Qwen3MoeTopKRouter",)


class Qwen2MoeAdapter(ArchAdapter):
    """Qwen2-MoE: Qwen3 routing plus a shared expert with its own sigmoid gate
    (`shared_expert_gate`), which is not a router over experts and is left alone."""

    model_types = ("qwen2_moe",)
    router_class_names = ("Qwen2MoeTopKRouter",)


class OlmoeAdapter(ArchAdapter):
    """OLMoE: softmax top-k without renormalisation by default."""

    model_types = ("olmoe",)
    router_class_names = ("OlmoeTopKRouter",)


class MixtralAdapter(ArchAdapter):
    """Mixtral: softmax top-k, always renormalised. transformers 5 renames the on-disk
    `block_sparse_moe` to `mlp` in memory; on disk experts are `w1` (gate), `w3` (up), `w2` (down)."""

    model_types = ("mixtral",)
    router_class_names = ("MixtralTopKRouter",)
    always_renormalize = True
    num_experts_keys = ("num_local_experts",)
    disk_block_attr = "block_sparse_moe"
    expert_disk_suffixes = ("w1.weight", "w2.weight", "w3.weight")


class DeepseekV3Adapter(ArchAdapter):
    """DeepSeek-V3: sigmoid scores; `e_score_correction_bias` only for the choice; group-limited
    selection (n_group / topk_group); optional renorm; `routed_scaling_factor` on the weights.
    The first `first_k_dense_replace` layers are dense."""

    model_types = ("deepseek_v3",)
    router_class_names = ("DeepseekV3TopkRouter",)
    scoring = "sigmoid"
    num_experts_keys = ("n_routed_experts", "num_local_experts")

    def choice_bias(self, layer: MoELayer) -> torch.Tensor | None:
        bias = getattr(layer.router, "e_score_correction_bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def max_top_k(self, layer: MoELayer) -> int:
        # Selection only looks inside the `topk_group` best groups: a larger k would silently
        # pick masked experts (-inf scores), so refuse it.
        router = layer.router
        per_group = layer.num_experts // int(router.num_group)
        return int(router.topk_group) * per_group

    def route_from_logits(self, layer: MoELayer, logits: torch.Tensor):
        r = layer.router
        logits = logits.float()
        scores = logits.sigmoid()
        # a -inf logit (masked expert) must never be chosen, whatever its correction bias says
        choice = (scores + r.e_score_correction_bias).masked_fill(torch.isneginf(logits), float("-inf"))
        groups = int(r.num_group)
        group_scores = choice.view(-1, groups, layer.num_experts // groups).topk(2, dim=-1).values.sum(-1)
        keep_groups = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(int(r.topk_group), dim=-1).indices, 1.0)
        keep = keep_groups.repeat_interleave(layer.num_experts // groups, dim=1).bool()
        indices = choice.masked_fill(~keep, float("-inf")).topk(int(r.top_k), dim=-1).indices
        weights = scores.gather(1, indices)
        if r.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * r.routed_scaling_factor, indices


class GptOssAdapter(ArchAdapter):
    """gpt-oss: router `mlp.router` with a bias; top-k on logits, then softmax over the k chosen.
    'Probabilities over all experts' is the softmax over all logits. Experts are fused on disk.
    PEFT's ParamWrapper rejects the 1-D bias, so LoRA trains the weight only."""

    model_types = ("gpt_oss",)
    router_class_names = ("GptOssTopKRouter",)
    router_attr = "router"
    num_experts_keys = ("num_local_experts",)
    expert_disk_suffixes = None

    def route_from_logits(self, layer: MoELayer, logits: torch.Tensor):
        top, indices = torch.topk(logits, int(layer.router.top_k), dim=-1)
        return logits, torch.softmax(top, dim=1, dtype=top.dtype), indices


ADAPTERS: tuple[type[ArchAdapter], ...] = (
    Qwen3MoeAdapter,
    Qwen2MoeAdapter,
    OlmoeAdapter,
    MixtralAdapter,
    DeepseekV3Adapter,
    GptOssAdapter,
)
