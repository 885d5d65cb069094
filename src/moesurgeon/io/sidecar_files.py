"""Everything in a checkpoint directory that is not a weight: copied, and config.json edited as JSON.

Sidecar files (tokenizer, chat template, generation_config.json, README,
subdirectories) are real copies, never hard links: people edit chat templates
and tokenizer configs in place, and a hard link would carry that edit back
into the source checkpoint.

Weight files of OTHER formats at the top level (a `pytorch_model.bin` next to
the safetensors, `consolidated.safetensors`, unindexed `.safetensors`, GGUF)
are skipped and reported: they hold the UNPATCHED weights, and a loader that
prefers them would silently ignore the patch.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil
from pathlib import Path

from .errors import CheckpointError

CONFIG = "config.json"
_OTHER_WEIGHT_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json",
    "consolidated*.pth", "consolidated*.pt", "tf_model*.h5", "flax_model*.msgpack", "*.gguf",
)


def copy_sidecar_files(src_dir: Path, dst_dir: Path, weight_files: set[str]) -> tuple[list[str], list[str]]:
    """Copy every file except weights and config.json; returns (copied, skipped) relative paths."""
    copied, skipped = [], []
    for root, dirs, files in os.walk(src_dir, followlinks=True):
        dirs.sort()
        rel_root = Path(root).relative_to(src_dir)
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            if rel in weight_files or rel == CONFIG:
                continue
            if rel_root == Path(".") and any(fnmatch.fnmatch(name, p) for p in _OTHER_WEIGHT_PATTERNS):
                skipped.append(rel)
                continue
            target = dst_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / name, target)  # follows symlinks (HF cache snapshots link to blobs)
            copied.append(rel)
    return copied, skipped


def merge_config(config: dict, edits: dict) -> dict:
    """Return config with edits applied: nested dicts merge key by key, anything else is set as given.

    Unedited keys keep their values and order; new keys go at the end of their object.
    """
    merged = copy.deepcopy(config)
    for key, value in edits.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_config(src_dir: Path, dst_dir: Path, edits: dict) -> bool:
    """Write dst_dir/config.json: a byte-for-byte copy when there are no edits. Returns whether one was written."""
    src = src_dir / CONFIG
    if not src.is_file():
        if edits:
            raise CheckpointError(f"{src} does not exist, so config_edits {sorted(edits)} cannot be applied; "
                                  "drop config_edits or add the config.json")
        return False
    if not edits:
        shutil.copy2(src, dst_dir / CONFIG)
        return True
    try:
        config = json.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{src} is not valid JSON ({exc}); fix it before applying config_edits") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{src} holds a JSON {type(config).__name__}, expected an object")
    text = json.dumps(merge_config(config, edits), indent=2, ensure_ascii=False) + "\n"
    (dst_dir / CONFIG).write_text(text, encoding="utf-8")
    return True
