"""The tensor inventory of a checkpoint from its shard headers alone (milliseconds, whatever its size).

First `io.CheckpointReader` validates the whole checkpoint (index, every header, no tensor in two
shards, links that stay inside). When it refuses, the browser still shows what it can: each shard
named by the index (or each `*.safetensors` file) is parsed on its own with `io.read_header`, a
shard that fails is marked unreadable with the reason, and the tensors the index maps to it are
listed without shape. Only a directory holding no safetensors weights at all is refused outright.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io import CheckpointError, CheckpointReader, read_header
from ..io.paths import is_plain_name, resolve_member
from .errors import BrowseError

INDEX = "model.safetensors.index.json"


@dataclass
class ShardInfo:
    name: str
    path: Path | None  # the checked real file (None when it could not be resolved)
    size: int = 0
    mtime_ns: int = 0
    error: str | None = None  # why this shard could not be read; None when its header is valid

    @property
    def ok(self) -> bool:
        return self.error is None

    def key(self) -> dict:
        """What the statistics cache compares: the file it read, its size and its modification time."""
        return {"path": str(self.path), "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shard: str
    dtype: str | None = None  # None: the shard's header could not be read
    shape: tuple[int, ...] | None = None
    begin: int | None = None  # absolute file offsets of the data
    end: int | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.begin is None or self.end is None else self.end - self.begin


@dataclass
class Inventory:
    root: Path
    shards: dict[str, ShardInfo]
    tensors: dict[str, TensorMeta]  # in storage order: shard by shard, by offset
    config: dict | None
    problems: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards.values())

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        """{name: shape}; None for the tensors of a shard whose header could not be read."""
        return {n: t.shape for n, t in self.tensors.items()}


def read_inventory(checkpoint_dir: Path) -> Inventory:
    """Headers of every shard -> Inventory; refuses only a directory with no safetensors weights."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise BrowseError(f"{root}: not a directory; pass a checkpoint directory (the one holding config.json "
                          "and model*.safetensors)")
    config, problems = _read_config(root)
    try:
        with CheckpointReader(root) as reader:
            if reader.format != "safetensors":  # pragma: no cover - the reader refuses pickle without allow_pickle
                raise CheckpointError("pickle checkpoint")
            shards = {s: _shard_info(s, reader.shard_real_path(s)) for s in reader.shards()}
            tensors = {}
            for name in reader.tensor_names():
                info = reader.header(name)
                tensors[name] = TensorMeta(name, info.shard, info.dtype, tuple(info.shape), info.begin, info.end)
        return Inventory(root, shards, tensors, config, problems)
    except CheckpointError as exc:
        problems.append(f"the checkpoint reader refused this directory: {exc}")
    shards, tensors = _tolerant_scan(root, problems)
    return Inventory(root, shards, tensors, config, problems)


def _read_config(root: Path) -> tuple[dict | None, list[str]]:
    path = root / "config.json"
    if not path.exists():
        return None, [f"{path} is missing: the model family is unknown, so only the tensor inventory is shown"]
    real = resolve_member(root, path)
    if real is None:
        return None, [f"{path} is a link that leaves the checkpoint or not a regular file: not read"]
    try:
        config = json.loads(real.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, [f"{path} is unreadable ({exc}); only the tensor inventory is shown"]
    if not isinstance(config, dict):
        return None, [f"{path} holds a JSON {type(config).__name__}, not an object; only the inventory is shown"]
    return config, []


def _shard_info(name: str, real: Path | None, error: str | None = None) -> ShardInfo:
    info = ShardInfo(name, real, error=error)
    if real is not None:
        st = os.stat(real)
        info.size, info.mtime_ns = st.st_size, st.st_mtime_ns
    return info


def _tolerant_scan(root: Path, problems: list[str]) -> tuple[dict[str, ShardInfo], dict[str, TensorMeta]]:
    """Each shard on its own: what can be read is listed, what cannot is marked with the reason."""
    weight_map = _index_map(root, problems)
    if weight_map is None:
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise BrowseError(f"{root}: no {INDEX} and no *.safetensors file: not a safetensors checkpoint. Pass the "
                              "directory that holds model.safetensors (or its shards and index); pickle "
                              "checkpoints (pytorch_model*.bin) must be converted to safetensors first")
        names: dict[str, list[str]] = {f: [] for f in files}
    else:
        names = {}
        for tensor, shard in weight_map.items():
            names.setdefault(shard, []).append(tensor)
    shards: dict[str, ShardInfo] = {}
    tensors: dict[str, TensorMeta] = {}
    for shard in sorted(names):
        path = root / shard
        real = resolve_member(root, path) if is_plain_name(shard) else None
        if real is None:
            why = "missing" if not path.exists() and not path.is_symlink() else "not a regular file inside the checkpoint"
            shards[shard] = _shard_info(shard, None, f"{path}: {why}")
        else:
            try:
                header = read_header(real, label=str(path))
            except (CheckpointError, OSError) as exc:
                shards[shard] = _shard_info(shard, real, str(exc))
            else:
                shards[shard] = _shard_info(shard, real)
                mapped = set(names[shard]) if weight_map is not None else None
                for e in header.entries.values():
                    if mapped is None or e.name in mapped:
                        if e.name in tensors:
                            problems.append(f"tensor {e.name!r} is stored in {tensors[e.name].shard!r} and {shard!r}")
                            continue
                        tensors[e.name] = TensorMeta(e.name, shard, e.dtype, tuple(e.shape), e.begin, e.end)
                continue
        for tensor in names[shard]:  # listed by the index, not readable: shown without shape
            tensors.setdefault(tensor, TensorMeta(tensor, shard))
    bad = [s for s in shards.values() if not s.ok]
    for s in bad:
        problems.append(f"shard {s.name} could not be read: {s.error}")
    return shards, tensors


def _index_map(root: Path, problems: list[str]) -> dict[str, str] | None:
    path = root / INDEX
    if not path.exists():
        return None
    real = resolve_member(root, path)
    try:
        if real is None:
            raise OSError("a link that leaves the checkpoint, or not a regular file")
        weight_map = json.loads(real.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"{path} is unreadable ({exc}); every *.safetensors file is listed instead")
        return None
    return {str(k): str(v) for k, v in weight_map.items()}
