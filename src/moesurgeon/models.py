"""Load a checkpoint (local directory or hub id) after checking it is a supported MoE model.

The checks run on config.json and the file listing BEFORE any weight is read, so a wrong path,
a pickle-only checkpoint, a dense model or an unknown family stops in seconds with one message.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import ArchAdapter, UnsupportedModelError, get_adapter

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model spec does not point at a loadable, supported MoE checkpoint."""


@dataclass
class ModelSpec:
    path: str
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (as stored)
    device: str = "cpu"  # cpu | cuda | cuda:N; ignored when device_map is set
    device_map: str | None = None  # e.g. "auto" to spread a large model over GPUs
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    experts_implementation: str | None = None  # grouped_mm (default) | batched_mm | eager


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def check_local_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """Validate a local model directory and return its config.json as a dict."""
    p = Path(path).expanduser()
    if not p.is_dir():
        hint = ""
        if "moesurgeon/assets" in str(p).replace("\\", "/"):
            hint = "; the embedded model is rebuilt by `python -m moesurgeon experiment=build_reference reference.install=true`"
        raise ModelLoadError(
            f"model.path={str(path)!r} is not a directory: expected a Hugging Face model directory with "
            f"config.json and *.safetensors{hint}"
        )
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"model.path={str(p)!r} has no config.json: expected a Hugging Face model directory (save_pretrained output)")
    config = json.loads(cfg_file.read_text())
    has_st = any(p.glob("*.safetensors"))
    if not has_st:
        pickles = sorted(x.name for x in p.glob("*.bin"))
        if pickles and not allow_pickle:
            raise ModelLoadError(
                f"model.path={str(p)!r} holds only pickle weights ({', '.join(pickles[:3])}); moesurgeon reads and "
                "writes safetensors. Convert it once (load with transformers and save_pretrained), or pass "
                "allow_pickle=true to accept pickle files you trust."
            )
        if not pickles:
            raise ModelLoadError(f"model.path={str(p)!r} has no *.safetensors weights: expected model.safetensors or shards with model.safetensors.index.json")
    try:
        adapter = get_adapter(config)
    except UnsupportedModelError as e:
        raise ModelLoadError(f"model.path={str(p)!r}: {e}") from None
    adapter.num_experts_from_config(config)  # a config without expert counts is dense
    return config


def load_config_dict(spec: ModelSpec) -> dict:
    if is_local(spec.path):
        return check_local_checkpoint(spec.path)
    if not _HUB_ID.match(spec.path):
        raise ModelLoadError(
            f"model.path={spec.path!r} does not exist locally and is not a hub id like 'org/name': "
            "pass the directory of a Hugging Face checkpoint"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code).to_dict()
    except OSError as e:
        raise ModelLoadError(
            f"model.path={spec.path!r}: could not fetch it from the hub ({e.__class__.__name__}). Offline? "
            "Download it once and pass the local directory instead."
        ) from None
    try:
        get_adapter(config)
    except UnsupportedModelError as e:
        raise ModelLoadError(f"model.path={spec.path!r}: {e}") from None
    return config


def load_model(spec: ModelSpec):
    """Return (model in eval mode, tokenizer, adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_config_dict(spec)
    if spec.dtype != "auto" and spec.dtype not in _DTYPES:
        raise ModelLoadError(f"model.dtype={spec.dtype!r}: expected one of {sorted(_DTYPES) + ['auto']}")
    kwargs = dict(
        dtype=_DTYPES.get(spec.dtype, "auto"),
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=True,
    )
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    log.info("loading model %s (dtype=%s, device=%s)", spec.path, spec.dtype, spec.device_map or spec.device)
    model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    if not spec.device_map:
        model.to(spec.device)
    if spec.experts_implementation:
        model.set_experts_implementation(spec.experts_implementation)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    adapter: ArchAdapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    log.info(
        "%s: %d MoE layers x %d experts, top-k %s, %.1fM parameters",
        model.config.model_type, len(layers), layers[0].num_experts,
        sorted({adapter.get_top_k(l) for l in layers}), sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model, tokenizer, adapter


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
