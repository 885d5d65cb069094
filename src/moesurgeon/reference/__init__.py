"""The embedded reference MoE: a small, really trained Qwen3-MoE shipped with moesurgeon.

``reference_model_dir()`` and ``reference_data_dir()`` locate the shipped assets;
:mod:`moesurgeon.reference.build` rebuilds them offline.
"""

from __future__ import annotations

from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "english", "russian", "math")

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def reference_model_dir() -> Path:
    """Directory of the shipped reference model (loads with ``AutoModelForCausalLM.from_pretrained``)."""
    return _ASSETS / "reference_model"


def reference_data_dir() -> Path:
    """Directory of the shipped reference data (``train.jsonl``, ``heldout.jsonl``)."""
    return _ASSETS / "reference_data"


__all__ = ["DOMAINS", "reference_data_dir", "reference_model_dir"]
