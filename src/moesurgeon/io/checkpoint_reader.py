"""Lazy, validated read access to a Hugging Face checkpoint directory.

`CheckpointReader(model_dir)` reads the shard index (or the single
`model.safetensors`), parses every shard HEADER up front (a few KB per shard,
so a 600 GB model costs milliseconds and no memory), and cross-checks index and
headers so that a broken download fails here with a message that names the
file, instead of deep inside a loader. Tensor data is read only on `get()`,
through `safe_open`, with at most ONE shard handle open at a time: peak memory
is one tensor, whatever the model size.

A checkpoint is untrusted input: shard names in an index must be plain file
names, a shard that is a symbolic link must resolve inside the checkpoint or to
a hub cache blob (the `paths` rule), and no tensor may live in two shards. Every
shard is then read through its resolved real path, so a link swapped after the
check cannot redirect reads, and writers reuse the real file, never the link.

Pickle checkpoints (`pytorch_model*.bin`) can execute code when loaded and
cannot be read lazily by byte range; they are refused unless
`allow_pickle=True`, and then loaded with `torch.load(weights_only=True,
mmap=True)` as one in-memory source.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .paths import is_plain_name, resolve_member
from .safetensors_format import DuplicateJSONKey, ShardHeader, dtype_name, read_header, reject_duplicate_keys

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor. `begin`/`end` are absolute file offsets (None for pickle)."""

    dtype: str
    shape: tuple[int, ...]
    shard: str
    nbytes: int
    begin: int | None = None
    end: int | None = None


class CheckpointReader:
    def __init__(self, model_dir: str | os.PathLike, *, allow_pickle: bool = False):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a directory; pass the checkpoint directory")
        self._open: tuple[str, object] | None = None  # (shard, entered safe_open handle): the one cached handle
        self._pickle_tensors: dict[str, torch.Tensor] | None = None
        self._pickle_files: list[str] = []
        self.index_metadata: dict = {}
        self.index_file: str | None = None
        self._real_paths: dict[str, Path] = {}  # shard name -> resolved, checked file
        weight_map = self._locate_weights(allow_pickle)
        self._weight_map = weight_map
        self._shards = sorted(set(weight_map.values())) or self._pickle_files
        self._headers: dict[str, ShardHeader] = {}
        self._infos: dict[str, TensorInfo] = {}
        if self.format == "safetensors":
            self._validate_safetensors()
        else:
            self._load_pickle()

    # -- discovery -------------------------------------------------------------------------
    def _locate_weights(self, allow_pickle: bool) -> dict[str, str]:
        d = self.model_dir
        if _present(d / SAFETENSORS_INDEX):
            self.format, self.index_file = "safetensors", SAFETENSORS_INDEX
            return self._read_index(SAFETENSORS_INDEX)
        if _present(d / SAFETENSORS_SINGLE):
            self.format = "safetensors"
            names = self._read_shard_header(SAFETENSORS_SINGLE).entries
            return {name: SAFETENSORS_SINGLE for name in names}
        loose = sorted(p.name for p in d.glob("*.safetensors"))
        if len(loose) == 1:  # e.g. a tool that named its only file differently
            self.format = "safetensors"
            return {name: loose[0] for name in self._read_shard_header(loose[0]).entries}
        if loose:
            raise CheckpointError(
                f"{d}: {len(loose)} .safetensors files but no {SAFETENSORS_INDEX}; "
                "the index says which tensor lives where: restore it from the original checkpoint")
        pickle_files = sorted(p.name for p in d.glob("pytorch_model*.bin"))
        if not pickle_files:
            raise CheckpointError(
                f"{d}: no {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE} or pytorch_model*.bin; "
                "is this the checkpoint directory (the one holding config.json)?")
        if not allow_pickle:
            raise CheckpointError(
                f"{d}: only pickle weights ({pickle_files[0]}...) found. Pickle files can run code when "
                "loaded and cannot be read lazily; pass allow_pickle=True to load them with "
                "torch.load(weights_only=True, mmap=True), or convert the checkpoint to safetensors first.")
        self.format = "pickle"
        if _present(d / PICKLE_INDEX):
            self.index_file = PICKLE_INDEX
            return self._read_index(PICKLE_INDEX)
        self._pickle_files = pickle_files  # no index: every pickle file is a shard; names come from loading
        return {}

    def _read_index(self, index_file: str) -> dict[str, str]:
        path = self._member(index_file, "index file")
        try:
            index = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=reject_duplicate_keys)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
        except DuplicateJSONKey as exc:
            raise CheckpointError(
                f"{self.model_dir / index_file}: {exc}; a tensor mapped twice has no single shard. Restore the "
                "index from the original checkpoint (or regenerate it from the shard headers)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: unreadable shard index ({exc!r}); expected JSON with a "
                                  "'weight_map' object; restore the file from the original checkpoint") from None
        for name, shard in weight_map.items():
            # a path here would make us read (and an export link or copy) a file outside the checkpoint
            if not is_plain_name(shard):
                raise CheckpointError(
                    f"{self.model_dir / index_file} maps tensor {name!r} to shard {shard!r}, which is not a plain "
                    "file name inside the checkpoint directory; expected a name like "
                    "model-00001-of-00002.safetensors (no '/', '..' or absolute path). Refusing to read outside "
                    "the checkpoint: restore the index from the original checkpoint, or fix that entry by hand")
        metadata = index.get("metadata")
        self.index_metadata = dict(metadata) if isinstance(metadata, dict) else {}
        return dict(weight_map)

    def _member(self, name: str, what: str) -> Path:
        """The checked real path of file `name` of the checkpoint (a link must stay inside it or be a hub blob)."""
        path = self.model_dir / name
        real = resolve_member(self.model_dir, path)
        if real is not None:
            return real
        if path.is_symlink():
            raise CheckpointError(
                f"{what} {path} is a symbolic link to {os.readlink(path)!r}, which "
                f"{'does not exist' if not path.exists() else 'leaves the checkpoint directory'} (only links "
                "inside the checkpoint or into a huggingface_hub cache blob store are followed). Refusing to "
                "read it: replace the link with the real file, or re-download the checkpoint")
        raise CheckpointError(f"{what} {path} is not a regular file inside {self.model_dir} (a directory, a "
                              "device, or reached through a linked directory); replace it with the real file")

    def shard_real_path(self, shard: str) -> Path:
        """The resolved, checked file behind `shard`: what to open, link or copy (never the link itself)."""
        real = self._real_paths.get(shard)
        if real is None:
            real = self._real_paths[shard] = self._member(shard, "shard")
        return real

    def _read_shard_header(self, shard: str) -> ShardHeader:
        real, path = self.shard_real_path(shard), self.model_dir / shard
        # errors name the shard as the user knows it, and the blob it links to
        label = f"{path} (-> {real})" if path.is_symlink() else str(path)
        return read_header(real, label=label)

    def _validate_safetensors(self) -> None:
        by_shard: dict[str, list[str]] = {s: [] for s in self._shards}
        for name, shard in self._weight_map.items():
            by_shard[shard].append(name)
        holder: dict[str, str] = {}  # tensor name -> first shard whose header holds it
        for shard, names in by_shard.items():
            path = self.model_dir / shard
            if not _present(path):
                raise CheckpointError(
                    f"{self.index_file} names shard {shard!r} (holding {len(names)} tensors, e.g. {names[0]!r}) "
                    f"but {path} does not exist; the download is incomplete: fetch the missing shard")
            header = self._read_shard_header(shard)
            self._headers[shard] = header
            for name in header.entries:
                # loaders that read every key of every shard would keep one copy or the other, by file order
                if name in holder:
                    raise CheckpointError(
                        f"{self.model_dir}: tensor {name!r} is stored in two shards, {holder[name]!r} and "
                        f"{shard!r}; which copy a loader uses depends on its file order. Remove it from one shard "
                        "(the one the index does not map it to) or regenerate the checkpoint")
                holder[name] = shard
            missing = [n for n in names if n not in header.entries]
            if missing:
                raise CheckpointError(
                    f"{self.index_file} maps tensor {missing[0]!r} ({len(missing)} missing in all) to {shard!r}, "
                    f"but that shard's header has no such tensor (it holds {len(header.entries)}); index and "
                    "shards are out of sync: regenerate the index or re-download the shard")
            extra = [n for n in header.entries if self._weight_map.get(n) != shard]
            if extra:
                warnings.warn(f"{path}: {len(extra)} tensors not mapped to this shard by the index "
                              f"(e.g. {extra[0]!r}); index-driven loaders ignore them", stacklevel=3)
            for name, e in header.entries.items():
                if self._weight_map.get(name) == shard:
                    self._infos[name] = TensorInfo(e.dtype, e.shape, shard, e.nbytes, e.begin, e.end)

    def _load_pickle(self) -> None:
        tensors: dict[str, torch.Tensor] = {}
        weight_map: dict[str, str] = {}
        for shard in self._shards:
            path = self.model_dir / shard
            if not _present(path):
                raise CheckpointError(f"{path}: pickle shard named by the index does not exist; re-download it")
            path = self.shard_real_path(shard)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad/legacy pickles
                raise CheckpointError(f"{path}: torch.load(weights_only=True, mmap=True) failed ({exc}); "
                                      "convert this checkpoint to safetensors with the tool that made it") from None
            for name, t in state.items():
                if isinstance(t, torch.Tensor):
                    if name in weight_map:
                        raise CheckpointError(
                            f"{self.model_dir}: tensor {name!r} is stored in two pickle shards, "
                            f"{weight_map[name]!r} and {shard!r}; remove it from one of them or re-save the "
                            "checkpoint")
                    tensors[name] = t
                    weight_map[name] = shard
        missing = [n for n in self._weight_map if n not in tensors]
        if missing:
            raise CheckpointError(f"{self.index_file} names tensor {missing[0]!r} but no pickle shard holds it; "
                                  "regenerate the index or re-download the shards")
        self._weight_map, self._pickle_tensors = weight_map, tensors
        self._shards = sorted(set(weight_map.values()))
        for name, t in tensors.items():
            self._infos[name] = TensorInfo(dtype_name(t.dtype), tuple(t.shape), weight_map[name],
                                           t.numel() * t.element_size())

    # -- queries ---------------------------------------------------------------------------
    def shards(self) -> list[str]:
        return list(self._shards)

    def tensor_names(self) -> list[str]:
        """All indexed tensor names, in storage order (shard by shard, by byte offset)."""
        return [n for shard in self._shards for n in self.names_in_shard(shard)]

    def names_in_shard(self, shard: str) -> list[str]:
        if self.format == "pickle":
            return [n for n, s in self._weight_map.items() if s == shard]
        return [n for n in self._headers[shard].entries if self._weight_map.get(n) == shard]

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def shard_of(self, name: str) -> str:
        return self.header(name).shard

    def header(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.model_dir}: no tensor named {name!r} "
                                  f"(the checkpoint has {len(self._infos)} tensors)") from None

    def shard_header(self, shard: str) -> ShardHeader:
        """The parsed safetensors header of a shard (all its entries, indexed or not)."""
        return self._headers[shard]

    def shard_path(self, shard: str) -> Path:
        """Where to read `shard`: its checked real path (see shard_real_path)."""
        return self.shard_real_path(shard)

    def weight_files(self) -> set[str]:
        """File names (relative to model_dir) that hold weights or the weight index."""
        return set(self._shards) | ({self.index_file} if self.index_file else set())

    # -- data ------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        info = self.header(name)
        if self._pickle_tensors is not None:
            return self._pickle_tensors[name]
        return self._handle(info.shard).get_tensor(name)

    def iter_shard(self, shard: str) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names_in_shard(shard):
            yield name, self.get(name)

    def _handle(self, shard: str):
        if self._open is not None and self._open[0] == shard:
            return self._open[1]
        self.close()  # close the previous shard BEFORE opening the next: never two open at once
        handle = safe_open(str(self.shard_real_path(shard)), framework="pt")
        handle.__enter__()
        self._open = (shard, handle)
        return handle

    def close(self) -> None:
        if self._open is not None:
            _, handle = self._open
            self._open = None
            handle.__exit__(None, None, None)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _present(path: Path) -> bool:
    """Something is there (a file, or a link even if dangling): then the member rule decides, not 'missing'."""
    return path.is_file() or path.is_symlink()
