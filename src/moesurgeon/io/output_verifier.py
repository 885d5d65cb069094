"""Re-read a freshly written checkpoint and check it is exactly what was intended.

Runs inside the temporary directory, before it is renamed into place, so a
failed check leaves no output behind. It reads every shard header (cheap),
compares each tensor's dtype/shape with the plan, checks that the index maps
exactly the planned tensor set and that no shard holds a key the index does not
point at (a stale duplicate), and reads back the bytes of the tensors the patch
wrote (small: only the changed ones) to compare them with the intended values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import CheckpointError
from .safetensors_format import read_header, tensor_bytes

INDEX = "model.safetensors.index.json"

# file name -> {tensor name -> (dtype, shape)}
Layout = dict[str, dict[str, tuple[str, tuple[int, ...]]]]


def _fail(out_dir: Path, what: str) -> CheckpointError:
    return CheckpointError(f"verification of the written checkpoint failed: {what} (in {out_dir}); nothing was "
                           "published. This is a bug or a failing disk: please report it with this message")


def verify_output(out_dir: Path, layout: Layout, weight_map: dict[str, str],
                  written: dict[str, torch.Tensor]) -> None:
    index = json.loads((out_dir / INDEX).read_text(encoding="utf-8"))
    got_map = index.get("weight_map", {})
    if got_map != weight_map:
        missing = sorted(set(weight_map) - set(got_map))
        extra = sorted(set(got_map) - set(weight_map))
        moved = sorted(n for n in set(got_map) & set(weight_map) if got_map[n] != weight_map[n])
        raise _fail(out_dir, f"index weight_map differs from the plan: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}, pointing elsewhere {moved[:3]}")
    on_disk = {p.name for p in out_dir.glob("*.safetensors")}
    if on_disk != set(layout):
        raise _fail(out_dir, f"shard files {sorted(on_disk ^ set(layout))} are unexpected or missing")
    headers = {}
    for shard, expected in layout.items():
        header = headers[shard] = read_header(out_dir / shard)  # also re-validates offsets vs file size
        if set(header.entries) != set(expected):
            diff = sorted(set(header.entries) ^ set(expected))
            raise _fail(out_dir, f"{shard} holds tensors {diff[:3]}... that differ from the plan")
        for name, (dtype, shape) in expected.items():
            entry = header.entries[name]
            if (entry.dtype, entry.shape) != (dtype, shape):
                raise _fail(out_dir, f"{shard}: tensor {name!r} is {entry.dtype} {list(entry.shape)}, "
                                     f"expected {dtype} {list(shape)}")
    for name, tensor in written.items():
        entry = headers[weight_map[name]].entries[name]
        want = tensor_bytes(tensor)
        fd = os.open(out_dir / weight_map[name], os.O_RDONLY)
        try:
            got = os.pread(fd, entry.nbytes, entry.begin)
        finally:
            os.close(fd)
        if got != want:
            raise _fail(out_dir, f"bytes of tensor {name!r} in {weight_map[name]} differ from the patch value")
