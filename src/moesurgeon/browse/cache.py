"""Per-shard statistics cache: a second browse of an unchanged checkpoint reads no tensor data.

One safetensors file per shard in the cache directory, named after the shard's real path; its
metadata holds the key and the statistics as JSON, its tensors the expert weight samples. The key
is the shard's real path, size and modification time plus the settings that change the numbers
(Lanczos steps, sample size, chunk size, format version): any difference is a miss and the shard
is read again. Diff results against another checkpoint live in a second file per shard whose key
also holds that checkpoint's shard keys and the expert map.

A cache that cannot be written (read-only directory, full disk) costs speed, never the run: the
failure is logged once and the browser goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .inventory import ShardInfo
from .scan import ShardResult

log = logging.getLogger("moesurgeon")
VERSION = 1


class StatsCache:
    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None
        self._warned = False

    def _file(self, shard: ShardInfo, kind: str) -> Path:
        digest = hashlib.sha1(str(shard.path).encode()).hexdigest()[:12]
        return self.directory / f"{digest}-{shard.name}.{kind}.safetensors"

    def load(self, shard: ShardInfo, settings: dict, partner_key: dict | None = None) -> ShardResult | None:
        """The cached result of `shard` (with its diff when `partner_key` is given), or None on any miss."""
        if self.directory is None or shard.path is None:
            return None
        stats = self._read(self._file(shard, "stats"), _key(shard, settings))
        if stats is None:
            return None
        meta, tensors = stats
        result = ShardResult(tensors=meta["tensors"], slices=meta["slices"], samples=tensors)
        if partner_key is not None:
            diff = self._read(self._file(shard, "diff"), _key(shard, settings, partner_key))
            if diff is None:
                return None
            result.diffs, result.slice_diffs = diff[0]["diffs"], diff[0]["slice_diffs"]
        return result

    def save(self, shard: ShardInfo, settings: dict, result: ShardResult, partner_key: dict | None = None) -> None:
        if self.directory is None or shard.path is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write(self._file(shard, "stats"), _key(shard, settings),
                        {"tensors": result.tensors, "slices": result.slices}, result.samples)
            if partner_key is not None:
                self._write(self._file(shard, "diff"), _key(shard, settings, partner_key),
                            {"diffs": result.diffs, "slice_diffs": result.slice_diffs}, {})
        except OSError as exc:
            if not self._warned:
                log.warning("statistics cache %s not written (%s); the next run reads the shards again",
                            self.directory, exc)
                self._warned = True

    @staticmethod
    def _read(path: Path, key: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if json.loads(meta.get("key", "null")) != key:
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return json.loads(meta["data"]), tensors
        except Exception as exc:  # a damaged cache file is a miss, not a failure  # noqa: BLE001
            log.warning("ignoring unreadable cache file %s (%s)", path, exc)
            return None

    @staticmethod
    def _write(path: Path, key: dict, data: dict, tensors: dict[str, torch.Tensor]) -> None:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        metadata = {"key": json.dumps(key, sort_keys=True), "data": json.dumps(data)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)


def _key(shard: ShardInfo, settings: dict, partner_key: dict | None = None) -> dict:
    key = {"version": VERSION, "shard": shard.key(), "settings": settings}
    if partner_key is not None:
        key["partner"] = partner_key
    # what json.loads gives back (tuples -> lists), so a stored key compares equal
    return json.loads(json.dumps(key, sort_keys=True))
