"""Shard sizes and names: "5GB" -> bytes, greedy split, HF file names, the index JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TypeVar

from .errors import CheckpointError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

T = TypeVar("T")


def parse_size(size: int | str) -> int:
    """Bytes for 1_000_000, "500MB", "5GB", "1.5GiB" (decimal units as in transformers, binary with 'i')."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise CheckpointError(f"max_shard_size={size!r}: expected bytes (int) or a string like '500MB' or '5GB'")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise CheckpointError(f"max_shard_size={size!r} must be positive")
    return value


def split_greedy(items: list[T], sizes: list[int], max_bytes: int) -> list[list[T]]:
    """Cut items, in order, into groups of at most max_bytes (a bigger item gets a group of its own)."""
    groups: list[list[T]] = []
    current: list[T] = []
    current_bytes = 0
    for item, size in zip(items, sizes, strict=True):
        if current and current_bytes + size > max_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += size
    if current:
        groups.append(current)
    return groups


def shard_names(count: int, prefix: str = "model") -> list[str]:
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(path: Path, weight_map: dict[str, str], metadata: dict) -> int:
    """Write model.safetensors.index.json as transformers does (metadata, then weight_map sorted by name)."""
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    text = json.dumps(index, indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))
