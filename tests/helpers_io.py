"""Tiny safetensors checkpoints written by hand for the ``moesurgeon.io`` tests (no model class needed).

``tiny_moe_tensors`` gives three shards of a 2-layer, 4-expert MoE-like state dict; ``make_checkpoint``
writes them (plus an index, config.json and sidecar files) into a directory; ``all_tensors`` flattens
the shards into one name -> tensor dict for comparisons.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["all_tensors", "make_checkpoint", "tiny_moe_tensors"]


def tiny_moe_tensors(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Three shards of a 2-layer, 4-expert MoE-like checkpoint (bf16 experts/routers, f32 norms)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    shards: dict[str, dict[str, torch.Tensor]] = {}
    for layer in range(2):
        s = {f"model.layers.{layer}.mlp.gate.weight": rnd(4, 8)}
        for e in range(4):
            s[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"] = rnd(8, 6)
        shards[f"model-0000{layer + 1}-of-00003.safetensors"] = s
    shards["model-00001-of-00003.safetensors"]["model.embed_tokens.weight"] = rnd(16, 8)
    shards["model-00003-of-00003.safetensors"] = {"model.norm.weight": rnd(8, dtype=torch.float32),
                                                  "lm_head.weight": rnd(16, 8, dtype=torch.float32)}
    return shards


def make_checkpoint(root: Path, shards: dict[str, dict[str, torch.Tensor]] | None = None, *,
                    index: bool = True, config: dict | None = None) -> Path:
    """Write shards + model.safetensors.index.json + config.json + a few sidecar files into root."""
    shards = tiny_moe_tensors() if shards is None else shards
    root.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for shard, tensors in shards.items():
        save_file(tensors, str(root / shard), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = shard
            total += t.numel() * t.element_size()
    if index:
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = config if config is not None else {"model_type": "toy_moe", "num_experts_per_tok": 2,
                                             "rope_scaling": {"type": "yarn", "factor": 4.0}, "vocab_size": 16}
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "extra").mkdir(exist_ok=True)
    (root / "extra" / "notes.txt").write_text("sidecar in a subdirectory\n")
    return root


def all_tensors(shards: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, by name."""
    return {n: t for s in shards.values() for n, t in s.items()}
