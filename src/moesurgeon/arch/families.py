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

    def moe_layer_indices(self, config: dict) -> list[int]:
        # the decoder layer's own rule: listed layers are dense, the others sparse every `step`-th layer
        dense = self.config_value(config, "mlp_only_layers")
        step = int(self.config_value(config, "decoder_sparse_step"))
        experts = self.num_experts_from_config(config)
        layers = int(self.config_value(config, "num_hidden_layers"))
        return [i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0]


class Qwen2MoeAdapter(Qwen3MoeAdapter):
    """Qwen2-MoE: Qwen3 routing and dense-layer rule, plus a shared expert with its own sigmoid gate
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
    """DeepSeek-V3: sigmoid scores; a choice-only correction bias (`e_score_correction_bias`); group-limited
    selection (config n_group / topk_group, router num_group / topk_group); optional renorm;
    `routed_scaling_factor` on the weights. The first `first_k_dense_replace` layers are dense."""

    model_types = ("deepseek_v3",)
    router_class_names = ("DeepseekV3TopkRouter",)
    scoring = "sigmoid"
    num_experts_keys = ("n_routed_experts", "num_local_experts")
    group_attrs = ("num_group", "topk_group")
    group_keys = ("n_group", "topk_group")

    def moe_layer_indices(self, config: dict) -> list[int]:
        first_sparse = int(self.config_value(config, "first_k_dense_replace"))
        return [i for i in range(int(self.config_value(config, "num_hidden_layers"))) if i >= first_sparse]

    def route_from_logits(self, layer: MoELayer, logits: torch.Tensor):
        r = layer.router
        logits = logits.float()
        scores = logits.sigmoid()
        bias = self.choice_bias(layer)
        choice = scores + bias if bias is not None else scores
        # a -inf logit (masked expert) must never be chosen, whatever its correction bias says
        choice = choice.masked_fill(torch.isneginf(logits), float("-inf"))
        limit = self.group_limit(layer)
        if limit is not None:
            groups, kept = limit
            size = layer.num_experts // groups
            group_scores = choice.view(-1, groups, size).topk(2, dim=-1).values.sum(-1)
            keep_groups = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(kept, dim=-1).indices, 1.0)
            keep = keep_groups.repeat_interleave(size, dim=1).bool()
            choice = choice.masked_fill(~keep, float("-inf"))
        indices = choice.topk(int(r.top_k), dim=-1).indices
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
