"""Streaming writers for safetensors shards.

`write_shard` writes a new shard whose tensors come either from raw byte ranges
of existing files (copied without deserializing: memory stays flat and it runs
at disk speed) or from in-memory tensors. It holds at most one source file and
one tensor at a time.

`clone_with_overwrites` makes a copy of a shard in which some tensors' bytes
are replaced by new values of the SAME dtype and shape: the header and every
offset stay identical, so no other byte moves. On a copy-on-write filesystem
the clone costs nothing and only the overwritten blocks are written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .file_copy import copy_range, open_for_clone, pwrite_all, try_reflink
from .safetensors_format import element_bits, encode_header, tensor_bytes


@dataclass(frozen=True)
class RawBytes:
    """Bytes [begin, end) of a file, copied verbatim."""

    path: str
    begin: int
    end: int


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard; `source` is a RawBytes range or a tensor of exactly dtype/shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: RawBytes | torch.Tensor


def alignment_order(tensors: list[OutTensor]) -> list[OutTensor]:
    """Widest elements first (stable), so every tensor starts on a multiple of its element size.

    Sizes of wider dtypes are multiples of narrower ones (8, 4, 2, 1 bytes), so
    this layout keeps all tensors aligned whatever the source order was;
    misaligned tensors would force loaders to copy instead of mmap.
    """
    return sorted(tensors, key=lambda t: -(element_bits(t.dtype) or 8))


def write_shard(path: str, tensors: list[OutTensor], metadata: dict[str, str] | None, *, fsync: bool) -> int:
    """Write a new safetensors file at path (must not exist); returns the bytes written."""
    tensors = alignment_order(tensors)
    prefix, begins = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    src_path, src_fd = None, -1
    try:
        pwrite_all(fd, prefix, 0)
        for t, begin in zip(tensors, begins, strict=True):
            if isinstance(t.source, RawBytes):
                if t.source.path != src_path:  # one source file open at a time
                    if src_fd >= 0:
                        os.close(src_fd)
                        src_fd = -1
                    src_path, src_fd = t.source.path, os.open(t.source.path, os.O_RDONLY)
                copy_range(src_fd, fd, t.source.begin, begin, t.nbytes)
            else:
                pwrite_all(fd, tensor_bytes(t.source), begin)
        total = begins[-1] + tensors[-1].nbytes if tensors else len(prefix)
        os.ftruncate(fd, total)  # exact size even when the last tensor is empty
        if fsync:
            os.fsync(fd)
    finally:
        if src_fd >= 0:
            os.close(src_fd)
        os.close(fd)
    return total


def clone_with_overwrites(
    src: str, dst: str, overwrites: list[tuple[int, torch.Tensor]], *, fsync: bool
) -> tuple[str, int]:
    """Copy src to dst with the bytes at each absolute offset replaced by a tensor's bytes.

    Returns (method, bytes written): "reflink+patch" writes only the new tensor
    bytes; "copy+patch" writes the whole file once (copying the gaps between
    the overwritten ranges, never writing any byte twice).
    """
    overwrites = sorted(overwrites, key=lambda item: item[0])
    with open_for_clone(src, dst, fsync=fsync) as (src_fd, dst_fd, size):
        if try_reflink(src_fd, dst_fd):
            written = 0
            for offset, tensor in overwrites:
                data = tensor_bytes(tensor)
                pwrite_all(dst_fd, data, offset)
                written += len(data)
            return "reflink+patch", written
        cursor = 0
        for offset, tensor in overwrites:
            copy_range(src_fd, dst_fd, cursor, cursor, offset - cursor)
            data = tensor_bytes(tensor)
            pwrite_all(dst_fd, data, offset)
            cursor = offset + len(data)
        copy_range(src_fd, dst_fd, cursor, cursor, size - cursor)
        return "copy+patch", size
