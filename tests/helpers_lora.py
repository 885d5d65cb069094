"""Router LoRA on tiny models for the tests: random token blocks and a short training run.

``random_blocks`` gives seeded ``TokenBlocks`` (the last block half padded) so nothing is
tokenized; ``train_tiny`` wraps a model's routers and trains them for a few CPU steps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moesurgeon.arch import get_adapter
from moesurgeon.data import TokenBlocks
from moesurgeon.lora import RouterLoraSpec, TrainConfig, make_accelerator, train_router_lora, wrap_routers

__all__ = ["random_blocks", "train_tiny"]


def random_blocks(n=12, length=16, seed=0) -> TokenBlocks:
    """``n`` seeded blocks of ``length`` random token ids, all labelled "x"; the last one is half padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[-1, length // 2:] = 0  # one padded block
    return TokenBlocks(torch.randint(3, 90, (n, length), generator=g), mask, torch.zeros(n, dtype=torch.long), ["x"])


def train_tiny(model, run_dir: Path, *, resume_from=None, on_step=None, **overrides):
    """Wrap `model`'s routers and train; returns the PeftModel."""
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    peft_model = wrap_routers(model, adapter, RouterLoraSpec(rank=2))
    tcfg = TrainConfig(**{"steps": 3, "lr": 1e-2, "warmup_steps": 1, "batch_size": 4, "log_every": 1, **overrides})
    train_router_lora(
        peft_model, random_blocks(), tcfg, accelerator=make_accelerator("cpu"), top_k=adapter.get_top_k(layers[0]),
        adapter=adapter, layer_names=[l.router_name for l in layers], run_dir=run_dir,
        settings={"train": tcfg.result_settings()}, resume_from=resume_from, progress=False, on_step=on_step,
    )
    return peft_model
