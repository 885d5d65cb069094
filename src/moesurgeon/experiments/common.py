"""Steps every experiment shares: seeding, threads, loading the model and the data blocks."""

from __future__ import annotations

import logging
import random

import torch
from omegaconf import DictConfig

from ..config import data_spec, model_spec
from ..data import TokenBlocks, load_blocks
from ..models import load_model, max_positions

log = logging.getLogger("moesurgeon")


def setup(cfg: DictConfig) -> None:
    seed = int(cfg.get("seed", 0))
    random.seed(seed)
    torch.manual_seed(seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))


def load_model_and_data(cfg: DictConfig, splits=("heldout",), only_labels=None):
    """Return (model, tokenizer, adapter, {split: TokenBlocks})."""
    model, tokenizer, adapter = load_model(model_spec(cfg))
    blocks: dict[str, TokenBlocks] = {}
    for split in splits:
        spec = data_spec(cfg, split, only_labels=only_labels if split == "train" else None)
        blocks[split] = load_blocks(spec, tokenizer, max_positions(model))
        log.info("data %s: %d blocks, %d tokens, labels %s", split, len(blocks[split]),
                 blocks[split].num_tokens(), blocks[split].label_names or "-")
    return model, tokenizer, adapter, blocks


def layer_short_names(layer_names: list[str]) -> list[str]:
    """'model.layers.3.mlp.gate' -> 'L3' for plot axes (files keep the full names)."""
    out = []
    for name in layer_names:
        parts = name.split(".")
        idx = next((p for p in parts if p.isdigit()), name)
        out.append(f"L{idx}")
    return out
