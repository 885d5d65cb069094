"""experiment=build_reference — build the embedded reference MoE from scratch, offline.

corpus -> tokenizer -> training -> checkpoint (reference/build.py), then, with
`build_reference.install=true`, the shipped assets replaced atomically (temporary sibling + rename).

    python -m moesurgeon experiment=build_reference                                # full build (~10 min, 2 cores)
    python -m moesurgeon experiment=build_reference build_reference.install=true   # ... and replace the assets

Writes ``<run dir>/reference_model`` (sharded bf16 safetensors, tokenizer, SOURCES.md, NOTICE) and
``<run dir>/reference_data`` (train.jsonl, heldout.jsonl). Settings: `build_reference.*`
(BuildReferenceSettings, recipes/settings.py: the fields of reference/build.py's ReferenceBuildConfig
plus `install`). The run context holds no model: this experiment makes one.
"""

from __future__ import annotations

import logging
from dataclasses import fields

from ..reference import reference_data_dir, reference_model_dir
from ..reference.build import ReferenceBuildConfig, build_reference, copy_dir_atomic
from ..run_context import RunContext
from .settings import BuildReferenceSettings

log = logging.getLogger("moesurgeon")


def run(ctx: RunContext, settings: BuildReferenceSettings) -> dict:
    # ---- setup: the build's own config (everything but `install`), progress bars as the run says
    build = {f.name: getattr(settings, f.name) for f in fields(ReferenceBuildConfig)}
    bcfg = ReferenceBuildConfig(**{**build, "progress": settings.progress and ctx.progress})

    # ---- build
    model_out, data_out = ctx.out_dir / "reference_model", ctx.out_dir / "reference_data"
    metrics = build_reference(bcfg, model_out, data_out, log=log.info)

    # ---- install
    metrics["installed"] = 0
    if settings.install:
        copy_dir_atomic(model_out, reference_model_dir())
        copy_dir_atomic(data_out, reference_data_dir())
        metrics["installed"] = 1
        log.info("installed reference model -> %s, data -> %s", reference_model_dir(), reference_data_dir())
    return metrics
