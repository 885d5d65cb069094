"""Shared fixtures: tiny models of every family, a tiny tokenizer, saved checkpoints in tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from tiny_models import FAMILY_CONFIGS, tiny_model, tiny_tokenizer  # noqa: E402

FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: save a tiny random model of `model_type` as a multi-shard checkpoint, return its dir."""

    def make(model_type: str = "qwen3_moe", max_shard_size: str = "40KB", **overrides) -> Path:
        model = tiny_model(model_type, **overrides)
        out = tmp_path / f"{model_type}-ckpt"
        model.save_pretrained(out, max_shard_size=max_shard_size)
        tiny_tokenizer().save_pretrained(out)
        return out

    return make
