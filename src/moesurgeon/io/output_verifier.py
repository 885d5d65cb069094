"""Re-read a freshly written checkpoint and check it is exactly what was intended.

Runs inside the temporary directory, before it is renamed into place, so a
failed check leaves no output behind. The plan it checks against (`layout`:
shard -> {tensor: (dtype, shape)}, and `weight_map`) is built by the writer from
the SOURCE reader's indexed view and the patch, never from the files being
checked, so a stale or extra key in a written shard cannot agree with itself.

Checks, cheapest first:
- the written index maps exactly the planned tensors to the planned shards, and
  the plan gives every shard exactly the keys the index maps to it;
- every shard is a regular file (no links) that `safetensors.safe_open` opens
  (we never publish what the official reader rejects), and its keys agree with
  our own header parse;
- no key is stored in two shards; each shard holds exactly its planned keys
  with the planned dtype and shape;
- the bytes of the tensors the patch wrote read back equal to the intended
  values, compared one chunk at a time (a lazy `SourceBytes` value is re-read
  from its file, checked against that file's identity), so verifying a prune
  that renamed every expert holds one chunk, not the model. A `ComputedTensor`
  is not recomputed: the written bytes are hashed chunk by chunk and compared
  with the SHA-256 the writer recorded when it wrote them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from .errors import CheckpointError
from .lazy_sources import ByteComparer, PatchValue
from .safetensors_format import ShardHeader, read_header

INDEX = "model.safetensors.index.json"

# file name -> {tensor name -> (dtype, shape)}
Layout = dict[str, dict[str, tuple[str, tuple[int, ...]]]]


def _fail(out_dir: Path, what: str) -> CheckpointError:
    return CheckpointError(f"verification of the written checkpoint failed: {what} (in {out_dir}); nothing was "
                           "published. This is a bug or a failing disk: please report it with this message")


def verify_output(out_dir: Path, layout: Layout, weight_map: dict[str, str],
                  written: dict[str, PatchValue]) -> None:
    _check_index(out_dir, layout, weight_map)
    on_disk = {p.name for p in out_dir.glob("*.safetensors")}
    if on_disk != set(layout):
        raise _fail(out_dir, f"shard files {sorted(on_disk ^ set(layout))} are unexpected or missing")
    headers: dict[str, ShardHeader] = {}
    holder: dict[str, str] = {}  # tensor name -> output shard that stores it
    for shard, expected in layout.items():
        header = headers[shard] = _read_shard(out_dir, shard)
        for name in header.entries:
            if name in holder:
                raise _fail(out_dir, f"tensor {name!r} is stored in both {holder[name]} and {shard}")
            holder[name] = shard
        if set(header.entries) != set(expected):
            extra = sorted(set(header.entries) - set(expected))
            missing = sorted(set(expected) - set(header.entries))
            raise _fail(out_dir, f"{shard} holds tensors the index does not point at there {extra[:3]} "
                                 f"or lacks planned ones {missing[:3]}")
        for name, (dtype, shape) in expected.items():
            entry = header.entries[name]
            if (entry.dtype, entry.shape) != (dtype, tuple(shape)):
                raise _fail(out_dir, f"{shard}: tensor {name!r} is {entry.dtype} {list(entry.shape)}, "
                                     f"expected {dtype} {list(shape)}")
    by_shard: dict[str, list[str]] = {}
    for name in written:
        by_shard.setdefault(weight_map[name], []).append(name)
    compare = ByteComparer()
    for shard, names in by_shard.items():  # one output shard open at a time
        fd = os.open(out_dir / shard, os.O_RDONLY)
        try:
            for name in names:
                if not compare.same(written[name], fd, headers[shard].entries[name].begin):
                    raise _fail(out_dir, f"bytes of tensor {name!r} in {shard} differ from the patch value")
        finally:
            os.close(fd)


def _check_index(out_dir: Path, layout: Layout, weight_map: dict[str, str]) -> None:
    """The written index is the planned weight_map, and the plan gives each shard exactly its mapped keys."""
    index = json.loads((out_dir / INDEX).read_text(encoding="utf-8"))
    got_map = index.get("weight_map", {})
    if got_map != weight_map:
        missing = sorted(set(weight_map) - set(got_map))
        extra = sorted(set(got_map) - set(weight_map))
        moved = sorted(n for n in set(got_map) & set(weight_map) if got_map[n] != weight_map[n])
        raise _fail(out_dir, f"index weight_map differs from the plan: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}, pointing elsewhere {moved[:3]}")
    mapped: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        mapped.setdefault(shard, set()).add(name)
    for shard in sorted(set(mapped) | set(layout)):
        planned = set(layout.get(shard, {}))
        if planned != mapped.get(shard, set()):
            diff = sorted(planned ^ mapped.get(shard, set()))
            raise _fail(out_dir, f"the plan for {shard} and the index disagree on tensors {diff[:3]}")


def _read_shard(out_dir: Path, shard: str) -> ShardHeader:
    """Our header parse of a written shard, after the official reader has accepted it."""
    path = out_dir / shard
    if path.is_symlink() or not path.is_file():
        raise _fail(out_dir, f"{shard} is not a regular file (a link would tie the output to another path)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception as exc:  # SafetensorError, OSError, ...: whatever it is, loaders would fail the same way
        raise _fail(out_dir, f"safetensors.safe_open rejects {shard} ({type(exc).__name__}: {exc})") from None
    try:
        header = read_header(path)
    except CheckpointError as exc:
        raise _fail(out_dir, f"{shard} does not parse ({exc})") from None
    if keys != set(header.entries):
        raise _fail(out_dir, f"safe_open and our header parse disagree on the keys of {shard}: "
                             f"{sorted(keys ^ set(header.entries))[:3]}")
    return header
