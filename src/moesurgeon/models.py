"""Load a checkpoint (local directory or hub id) after checking it is a supported MoE model.

The checks run on config.json and the file listing BEFORE any weight is read, so a wrong path,
a pickle-only checkpoint, a dense model or an unknown family stops in seconds with one message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import ArchAdapter, get_adapter
from .model_source import (  # noqa: F401  (re-exported: callers import these from moesurgeon.models)
    ModelLoadError, check_local_checkpoint, check_token_ids, resolve_device, resolve_source, tokenizer_source,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    path: str  # local directory or hub id (resolved to its local cache snapshot)
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (as stored)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N; ignored with device_map
    device_map: str | None = None  # e.g. "auto" to spread a large model over GPUs
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    experts_implementation: str | None = None  # grouped_mm (default) | batched_mm | eager
    tokenizer: str | None = None  # directory or hub id of the tokenizer, when the model dir has none
    allow_pickle: bool = False  # accept pytorch_model*.bin (loaded with weights_only=True)


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def local_dir(spec: ModelSpec) -> Path:
    """The checkpoint directory `spec.path` stands for (a hub id: its cache snapshot, downloaded if needed)."""
    return resolve_source(spec.path)


def check_source(spec: ModelSpec, *, tokenizer: bool = True) -> tuple[Path, dict]:
    """(local checkpoint directory, its config.json): every file-level check, before any weight is read.
    `tokenizer=False`: the run reads only the weight files (experiment=browse), so none is required."""
    model_dir = local_dir(spec)
    config = check_local_checkpoint(model_dir, allow_pickle=spec.allow_pickle)
    if tokenizer:
        tokenizer_source(model_dir, spec.tokenizer)
    if spec.dtype != "auto" and spec.dtype not in _DTYPES:
        raise ModelLoadError(f"model.dtype={spec.dtype!r}: expected one of {sorted(_DTYPES) + ['auto']}")
    if not spec.device_map:
        resolve_device(spec.device)
    return model_dir, config


def load_config_dict(spec: ModelSpec) -> dict:
    """config.json of the checked checkpoint (see `check_source`)."""
    return check_source(spec)[1]


def load_tokenizer(spec: ModelSpec, source_dir: Path | None = None):
    """The tokenizer of `model.tokenizer`, else the model directory's own (cheap: no weights are read).
    `source_dir`: the checkpoint directory `check_source` returned (saves resolving `spec.path` again)."""
    from transformers import AutoTokenizer

    tok_dir = tokenizer_source(source_dir or local_dir(spec), spec.tokenizer)
    try:
        return AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"the tokenizer in {tok_dir} cannot be loaded ({str(e)[:300]}); pass "
                             "model.tokenizer=DIR_OR_HUB_ID with a working tokenizer for this model") from None


def load_model(spec: ModelSpec, tokenizer=None, *, source_dir: Path | None = None):
    """Return (model in eval mode, tokenizer, adapter); `tokenizer` is loaded from the spec when not given.

    `source_dir`: the directory `check_source(spec)` already checked (a run context passes it, so that
    config.json is read once per run); without it the checks run here."""
    from transformers import AutoModelForCausalLM

    model_dir = source_dir if source_dir is not None else check_source(spec)[0]
    device = spec.device_map or resolve_device(spec.device)
    kwargs = dict(
        dtype=_DTYPES.get(spec.dtype, "auto"),
        trust_remote_code=spec.trust_remote_code,
        # pickle weights only where the user opted in and there is nothing else
        use_safetensors=not (spec.allow_pickle and not any(model_dir.glob("*.safetensors"))),
    )
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    log.info("loading model %s (dtype=%s, device=%s)", model_dir, spec.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not spec.device_map:
        model.to(device)
    if spec.experts_implementation:
        model.set_experts_implementation(spec.experts_implementation)
    model.eval()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec, model_dir)
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
