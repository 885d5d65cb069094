"""Tiny random models of every supported MoE family, built from config (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)

FAMILY_CONFIGS: dict[str, dict] = {
    # layer 1 dense through mlp_only_layers: adapters must skip it
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                      norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16),
    # first layer dense, group-limited routing
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, n_group=2, topk_group=2, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        n_shared_experts=1, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}

# MoE layer indices each tiny config yields
EXPECTED_MOE_LAYERS = {
    "qwen3_moe": [0, 2], "qwen2_moe": [0, 1, 2], "mixtral": [0, 1, 2],
    "olmoe": [0, 1, 2], "deepseek_v3": [1, 2], "gpt_oss": [0, 1, 2],
}


def tiny_config(model_type: str, **overrides):
    kwargs = {**_BASE, **FAMILY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # random init leaves routers at zeros in some families: give them real scores
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.normal_(0, 0.5)
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
    return model.eval()


TINY_TEXTS = {
    "code": ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "class A:\n    pass\n"],
    "prose": ["the quick brown fox jumps over the lazy dog", "a tale of two cities was written long ago",
              "she sells sea shells by the sea shore"],
}


def tiny_tokenizer():
    """A 90-token character/BPE tokenizer trained on a few lines (ids 0..2 = pad, bos, eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    corpus = [t for texts in TINY_TEXTS.values() for t in texts] * 4
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=128)


def write_tiny_jsonl(path, label_field: str = "domain", repeat: int = 4):
    import json

    with open(path, "w") as f:
        for label, texts in TINY_TEXTS.items():
            for text in texts * repeat:
                f.write(json.dumps({"text": text * 3, label_field: label}) + "\n")
    return path
