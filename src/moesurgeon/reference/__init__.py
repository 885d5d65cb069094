"""The embedded reference MoE: a small, really trained Qwen3-MoE shipped with moesurgeon.

``reference_model_dir()`` and ``reference_data_dir()`` locate the shipped assets;
:mod:`moesurgeon.reference.build` rebuilds them offline:

- corpus: :mod:`.corpus` (assembly, splits, data files) from :mod:`.source_texts` (code, english,
  russian; the latter two via :mod:`.debian_packages`) and :mod:`.math_worksheets`, cut into
  documents (:mod:`.documents`) by :mod:`.chunking`;
- :mod:`.tokenizer` (byte-level BPE), :mod:`.train` (model config and training loop),
  :mod:`.evaluation` (held-out perplexity, routing specialisation), :mod:`.package` (model directory,
  SOURCES.md / NOTICE, install); :mod:`.settings` holds the typed build settings.
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
