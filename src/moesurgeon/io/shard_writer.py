"""Streaming writers for safetensors shards.

`write_shard` writes a new shard whose tensors come either from byte ranges of
existing files (`lazy_sources.SourceBytes`: copied kernel-side without
deserializing, so memory stays flat and it runs at disk speed), from
in-memory tensors, or from `lazy_sources.ComputedTensor`s, computed when their
turn comes and dropped once written. It holds at most one source file and one
tensor at a time.

`clone_with_overwrites` makes a copy of a shard in which some tensors' bytes
are replaced by new values of the SAME dtype and shape: the header and every
offset stay identical, so no other byte moves. On a copy-on-write filesystem
the clone costs nothing and only the overwritten blocks are written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .file_copy import copy_range, open_for_clone, pwrite_all, start_writeback, try_reflink
from .lazy_sources import ComputedTensor, PatchValue, SourceBytes, copy_source, prefetch, write_computed
from .safetensors_format import element_bits, encode_header, tensor_bytes


def put_value(fd: int, value: PatchValue, offset: int) -> int:
    """Write a patch value's bytes at `offset` of fd; returns the bytes written. A SourceBytes is streamed
    range by range (its file checked against its identity), a ComputedTensor computed now (its bytes' hash
    recorded for verification) and released on return, a tensor written from memory."""
    if isinstance(value, SourceBytes):
        return copy_source(value, fd, offset)
    if isinstance(value, ComputedTensor):
        return write_computed(value, fd, offset)
    data = tensor_bytes(value)
    pwrite_all(fd, data, offset)
    return len(data)


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard; `source` is a SourceBytes, a ComputedTensor or a tensor of exactly
    dtype/shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: PatchValue


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
    try:
        pwrite_all(fd, prefix, 0)
        for i, (t, begin) in enumerate(zip(tensors, begins, strict=True)):
            if i + 1 < len(tensors):  # the disk reads the next source tensor while this one is copied
                prefetch(tensors[i + 1].source)
            put_value(fd, t.source, begin)  # one source file open at a time, one range or tensor in flight
            if fsync:
                start_writeback(fd, begin, t.nbytes)
        total = begins[-1] + tensors[-1].nbytes if tensors else len(prefix)
        os.ftruncate(fd, total)  # exact size even when the last tensor is empty
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return total


def clone_with_overwrites(
    src: str, dst: str, overwrites: list[tuple[int, PatchValue]], *, fsync: bool
) -> tuple[str, int]:
    """Copy src to dst with the bytes at each absolute offset replaced by a value's bytes (any patch value).

    Returns (method, bytes written): "reflink+patch" writes only the new tensor
    bytes; "copy+patch" writes the whole file once (copying the gaps between
    the overwritten ranges, never writing any byte twice).
    """
    overwrites = sorted(overwrites, key=lambda item: item[0])
    with open_for_clone(src, dst, fsync=fsync) as (src_fd, dst_fd, size):
        if try_reflink(src_fd, dst_fd):
            written = 0
            for offset, value in overwrites:
                written += put_value(dst_fd, value, offset)
            return "reflink+patch", written
        cursor = 0
        for offset, value in overwrites:
            copy_range(src_fd, dst_fd, cursor, cursor, offset - cursor, writeback=fsync)
            cursor = offset + put_value(dst_fd, value, offset)
        copy_range(src_fd, dst_fd, cursor, cursor, size - cursor, writeback=fsync)
        return "copy+patch", size
