"""Build the embedded reference MoE from scratch, offline (corpus -> tokenizer -> training -> checkpoint).

    python -m moesurgeon experiment=build_reference                        # full build (~10 min, 2 cores)
    python -m moesurgeon experiment=build_reference reference.install=true # ... and replace the shipped assets

Writes ``out_dir/reference_model`` (sharded bf16 safetensors, tokenizer, SOURCES.md, NOTICE) and
``out_dir/reference_data`` (train.jsonl, heldout.jsonl). With ``reference.install: true`` both are
then copied over ``moesurgeon/assets/`` atomically (temporary sibling + rename).
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..reference import reference_data_dir, reference_model_dir
from ..reference.build import ReferenceBuildConfig, build_reference, copy_dir_atomic

log = logging.getLogger("moesurgeon")

# config key in `reference:` -> ReferenceBuildConfig field (identical names are mapped implicitly)
_RENAMES = {
    "layers": "num_layers",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "experts": "num_experts",
    "aux_loss_coef": "router_aux_loss_coef",
    "heldout_bytes": "heldout_bytes_per_domain",
    "train_bytes": "shipped_train_bytes_per_domain",
    "tokenizer_chars": "tokenizer_chars_per_domain",
    "max_corpus_chars": "max_corpus_chars_per_domain",
    "eval_max_tokens": "eval_max_tokens_per_domain",
}
_NOT_BUILD_KEYS = {"install"}


def build_config(ref: dict, progress: bool = True) -> ReferenceBuildConfig:
    """Typed build config from the plain ``reference:`` mapping (unknown keys are an error)."""
    names = {f.name for f in fields(ReferenceBuildConfig)}
    kwargs = {"progress": progress}
    for key, value in ref.items():
        if key in _NOT_BUILD_KEYS:
            continue
        name = _RENAMES.get(key, key)
        if name not in names:
            raise ValueError(f"unknown key reference.{key}; known: {sorted(set(_RENAMES) | names | _NOT_BUILD_KEYS)}")
        if value is not None or name in ("max_corpus_chars_per_domain", "eval_max_tokens_per_domain"):
            kwargs[name] = value
    return ReferenceBuildConfig(**kwargs)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    ref = OmegaConf.to_container(cfg.reference, resolve=True)
    assert isinstance(ref, dict)
    bcfg = build_config(ref, progress=bool(cfg.get("progress", True)))
    out_dir = Path(out_dir)
    model_out, data_out = out_dir / "reference_model", out_dir / "reference_data"
    metrics = build_reference(bcfg, model_out, data_out, log=log.info)
    metrics["installed"] = 0
    if ref.get("install", False):
        copy_dir_atomic(model_out, reference_model_dir())
        copy_dir_atomic(data_out, reference_data_dir())
        metrics["installed"] = 1
        log.info("installed reference model -> %s, data -> %s", reference_model_dir(), reference_data_dir())
    return metrics
