"""Everything in a checkpoint directory that is not a weight: copied, and config.json edited as JSON.

Sidecar files (tokenizer, chat template, generation_config.json, README,
subdirectories) are real copies (or reflinks), never hard links: people edit
chat templates and tokenizer configs in place, and a hard link would carry that
edit back into the source checkpoint.

A downloaded checkpoint is untrusted input, and the export is often uploaded, so
nothing from outside the checkpoint may ride along (see `paths.resolve_member`):
- a symbolic link to a DIRECTORY is never followed (an `assets -> /home/me` link
  would otherwise export a home directory);
- a symbolic link to a file is copied as a regular file with the target's
  contents only when the target is a member of the checkpoint (inside it, or a
  hub cache blob); `README.md -> /etc/shadow` is skipped;
- FIFOs, sockets and device files are skipped (never opened: a FIFO would hang).

Weight files are not sidecars:
- other formats at the top level (a `pytorch_model.bin` next to the safetensors,
  `consolidated.safetensors`, unindexed `.safetensors`, GGUF) are always skipped:
  they hold the UNPATCHED weights, and a loader that prefers them would silently
  ignore the patch;
- weight files in subdirectories (gpt-oss `original/*.safetensors`, `metal/model.bin`)
  are skipped unless `include_subdir_weights=True`: they too are unpatched, and
  often as large as the model.

Every skip is returned with its reason and logged once at WARNING.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import stat
from pathlib import Path

from .errors import CheckpointError
from .file_copy import copy_file
from .paths import resolve_member

log = logging.getLogger("moesurgeon")

CONFIG = "config.json"
_OTHER_WEIGHT_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json",
    "consolidated*.pth", "consolidated*.pt", "tf_model*.h5", "flax_model*.msgpack", "*.gguf",
)
_SUBDIR_WEIGHT_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pth", "*.pt", "*.gguf",
    "*.ckpt", "*.h5", "*.msgpack", "*.npz", "*.onnx", "*.onnx_data",
)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _special_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return f"not a regular file (mode {stat.filemode(mode)})"


def copy_sidecar_files(src_dir: Path, dst_dir: Path, weight_files: set[str], *,
                       include_subdir_weights: bool = False) -> tuple[list[str], dict[str, str]]:
    """Copy every member file except weights and config.json.

    Returns (copied relative paths, {skipped relative path: reason}); each skip is also logged.
    """
    src_dir = Path(src_dir)
    copied: list[str] = []
    skipped: dict[str, str] = {}

    def walk(rel_dir: str) -> None:
        with os.scandir(src_dir / rel_dir if rel_dir else src_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            reason = _classify(src_dir, entry, rel, rel_dir, weight_files, include_subdir_weights)
            if reason == "dir":
                walk(rel)
            elif reason == "handled":
                continue
            elif reason:
                skipped[rel] = reason
            else:
                _copy_member(src_dir, Path(entry.path), dst_dir / rel)
                copied.append(rel)

    walk("")
    for rel, reason in skipped.items():
        log.warning("not exported from %s: %s (%s)", src_dir, rel, reason)
    return copied, skipped


def _classify(src_dir: Path, entry: os.DirEntry, rel: str, rel_dir: str, weight_files: set[str],
              include_subdir_weights: bool) -> str | None:
    """'dir' to descend, 'handled' for files written elsewhere, a skip reason, or None to copy."""
    if entry.is_symlink():
        target = os.readlink(entry.path)
        if os.path.isdir(entry.path):
            return f"symbolic link to the directory {target}; directory links are never followed"
        if rel in weight_files or rel == CONFIG:
            return "handled"
        if resolve_member(src_dir, Path(entry.path)) is None:
            if not os.path.exists(entry.path):
                return f"dangling symbolic link to {target}"
            return (f"symbolic link to {target}, which is outside the checkpoint (or not a regular file); "
                    "only links to files inside it or to hub cache blobs are followed")
    elif entry.is_dir(follow_symlinks=False):
        return "dir"
    elif not entry.is_file(follow_symlinks=False):
        return _special_kind(entry.stat(follow_symlinks=False).st_mode)
    if rel in weight_files or rel == CONFIG:
        return "handled"
    if not rel_dir and _matches(entry.name, _OTHER_WEIGHT_PATTERNS):
        return "weight file of another format beside the indexed shards; it holds the unpatched weights"
    if rel_dir and not include_subdir_weights and _matches(entry.name, _SUBDIR_WEIGHT_PATTERNS):
        return ("weight file in a subdirectory, not a sidecar (it holds unpatched weights); "
                "pass include_subdir_weights=True to copy it")
    return None


def _copy_member(src_dir: Path, path: Path, dst: Path) -> None:
    """Copy one member file (a link is replaced by its target's contents) to dst, keeping its mtime."""
    real = resolve_member(src_dir, path) if path.is_symlink() else path
    if real is None:  # the link changed since it was classified
        raise CheckpointError(f"{path} changed while exporting (now a link leaving the checkpoint); retry")
    dst.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW on the final component: a file swapped for a link after the check is refused, not followed
    copy_file(str(real), str(dst), fsync=False, follow_symlinks=False)
    st = real.stat()
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


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


def _config_source(src_dir: Path) -> Path | None:
    """The real config.json of the checkpoint, None when there is none; refuses a link leaving it."""
    src = src_dir / CONFIG
    if not os.path.lexists(src):
        return None
    real = resolve_member(src_dir, src)
    if real is None:
        where = f"a symbolic link to {os.readlink(src)}" if src.is_symlink() else "not a regular file"
        raise CheckpointError(f"{src} is {where}, outside the checkpoint; refusing to read or export it: "
                              "replace it with the model's own config.json")
    return real


def read_json_object(path: Path, *, label: Path | str | None = None, fix: str = "restore it") -> dict:
    """A JSON file that must hold one object (config.json and friends); CheckpointError naming the file."""
    label = label or path
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{label} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{label} holds a JSON {type(value).__name__}, expected an object; {fix}")
    return value


def write_config(src_dir: Path, dst_dir: Path, edits: dict) -> bool:
    """Write dst_dir/config.json: a byte-for-byte copy when there are no edits. Returns whether one was written."""
    src = src_dir / CONFIG
    real = _config_source(src_dir)
    if real is None:
        if edits:
            raise CheckpointError(f"{src} does not exist, so config_edits {sorted(edits)} cannot be applied; "
                                  "drop config_edits or add the config.json")
        return False
    if not edits:
        copy_file(str(real), str(dst_dir / CONFIG), fsync=False)
        return True
    config = read_json_object(real, label=src, fix="fix it before applying config_edits")
    text = json.dumps(merge_config(config, edits), indent=2, ensure_ascii=False) + "\n"
    (dst_dir / CONFIG).write_text(text, encoding="utf-8")
    return True
