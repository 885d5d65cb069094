"""Tensors described by byte ranges of a safetensors file: renamed or row-sliced without being loaded.

A `SourceBytes` is a Patch value (`replace` or `add`) like a torch.Tensor, but it holds no data: it
says which bytes of which file, concatenated, make the tensor. A rename is one range (the whole
tensor); keeping a subset of the dim-0 rows of a row-major tensor is one range per run of
consecutive kept rows. Writers copy the ranges kernel-side (`copy_file_range`, or bounded
pread/pwrite chunks), and verification compares them chunk by chunk, so peak memory stays at one
chunk whatever the tensor size: a prune of a 60 GB model holds no expert in memory.

The bytes are read long after the value was made (the whole patch is planned first), so each value
carries the identity of its file as it was when its offsets were read (size, mtime, inode): a file
changed or replaced in between, or while it is being read, is an error instead of a silently mixed
tensor.

Build values from a reader (`tensor_source`, `rows_source`): they take offsets and the identity from
the reader's validated headers. A pickle reader has no byte ranges; there these helpers return the
(mmap-backed) tensor itself.

A `ComputedTensor` is a declared dtype and shape plus a function making the tensor (e.g. a merged
expert from its cluster's source tensors). The writer calls it when it writes that tensor, checks it
against the declaration, writes it and drops it: an export of many holds about one. Verification
does not recompute (that would read the cluster members from the source again, twice the merged bytes
or more, and redo the arithmetic): the writer records the SHA-256 of the bytes it wrote (~0.7 s/GB)
and the verifier hashes the written file's bytes chunk by chunk, which catches what a disk or writer
fault would break: the file not holding exactly the computed bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from .errors import CheckpointError
from .file_copy import copy_range, open_regular, pwrite_all
from .safetensors_format import DTYPE_NAMES, dtype_name, element_bits, expected_nbytes, tensor_bytes, torch_dtype

CHUNK = 16 << 20  # bytes per read when a source is compared or copied through user space


def file_identity(st: os.stat_result) -> tuple[int, int, int]:
    """What must not change between planning and reading a file: size, mtime (ns), inode."""
    return st.st_size, st.st_mtime_ns, st.st_ino


@dataclass(frozen=True)
class SourceBytes:
    """A tensor of `dtype` and `shape` whose bytes are `ranges` ([begin, end) absolute offsets) of `path`,
    in order. `identity`: the file's (size, mtime_ns, inode) when the ranges were taken; None stats the
    file now (for a file you just wrote and trust)."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    identity: tuple[int, int, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "ranges", tuple((int(b), int(e)) for b, e in self.ranges))
        if self.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"SourceBytes({self.path!r}): dtype {self.dtype!r} is not a safetensors dtype; "
                                  f"expected one of {', '.join(DTYPE_NAMES)}")
        if any(b < 0 or e < b for b, e in self.ranges):
            raise CheckpointError(f"SourceBytes({self.path!r}): ranges {list(self.ranges)[:4]} must be [begin, end) "
                                  "with 0 <= begin <= end")
        want = expected_nbytes(self.dtype, self.shape)
        if want != self.nbytes:
            raise CheckpointError(f"SourceBytes({self.path!r}): {self.dtype} {list(self.shape)} needs {want} bytes but "
                                  f"the ranges cover {self.nbytes}; give ranges covering exactly the tensor")
        if self.identity is None:
            object.__setattr__(self, "identity", file_identity(os.stat(self.path)))
        if self.ranges and max(e for _, e in self.ranges) > self.identity[0]:
            raise CheckpointError(f"SourceBytes({self.path!r}): ranges end at byte {max(e for _, e in self.ranges)} "
                                  f"but the file has {self.identity[0]} bytes")

    @property
    def nbytes(self) -> int:
        return sum(e - b for b, e in self.ranges)


@dataclass(eq=False)
class ComputedTensor:
    """A tensor of `dtype` (safetensors name or torch dtype) and `shape` that `compute()` makes when it is
    written, and that nobody keeps afterwards. `label` names it in errors. `digest`: the SHA-256 of the bytes
    the last write wrote (set by the writer, checked by verification, reset when a write starts)."""

    dtype: str
    shape: tuple[int, ...]
    compute: Callable[[], torch.Tensor]
    label: str = ""
    digest: bytes | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_name(self.dtype)
        self.shape = tuple(int(d) for d in self.shape)
        if torch_dtype(self.dtype) is None or not callable(self.compute):
            raise CheckpointError(f"ComputedTensor({self.label!r}, {self.dtype!r}, compute={self.compute!r}): expected "
                                  "a safetensors dtype torch can hold ('BF16' or torch.bfloat16) and a function of "
                                  "no arguments returning the tensor")

    @property
    def nbytes(self) -> int:
        return expected_nbytes(self.dtype, self.shape)

    def materialize(self) -> torch.Tensor:
        """compute(), checked against the declared dtype and shape (the bytes written must be what was planned)."""
        t = self.compute()
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"computed value {self.label!r} returned a {type(t).__name__}, expected a "
                                  "torch.Tensor")
        if (t.dtype, tuple(t.shape)) != (torch_dtype(self.dtype), self.shape):
            raise CheckpointError(f"computed value {self.label!r} is {t.dtype} {list(t.shape)} but was declared "
                                  f"{self.dtype} {list(self.shape)}; make compute() return exactly the declared "
                                  "dtype and shape (nothing was published)")
        return t

    def rows(self, rows: Sequence[int]) -> ComputedTensor:
        """Rows `rows` (in this order) of dim 0, still lazy: the full tensor is computed and sliced when written."""
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not self.shape or not 0 <= r < self.shape[0]]
        if bad:
            raise CheckpointError(f"rows {bad[:4]} of computed value {self.label!r} {list(self.shape)} are out of "
                                  "range of dim 0")
        index = torch.tensor(rows, dtype=torch.long)
        return ComputedTensor(self.dtype, (len(rows), *self.shape[1:]), partial(_take_rows, self, index),
                              f"{self.label}[{len(rows)} rows]")


def _take_rows(base: ComputedTensor, index: torch.Tensor) -> torch.Tensor:
    return base.materialize().index_select(0, index).contiguous()  # the full tensor is freed on return


PatchValue = torch.Tensor | SourceBytes | ComputedTensor


def value_spec(value: PatchValue) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype, shape) of a patch value."""
    if isinstance(value, (SourceBytes, ComputedTensor)):
        return value.dtype, value.shape
    return dtype_name(value.dtype), tuple(value.shape)


def value_nbytes(value: PatchValue) -> int:
    if isinstance(value, (SourceBytes, ComputedTensor)):
        return value.nbytes
    return value.numel() * value.element_size()


def write_computed(value: ComputedTensor, fd: int, offset: int) -> int:
    """Compute the value, write its bytes at `offset` of fd and record their SHA-256; the tensor is dropped on
    return. Returns the bytes written."""
    value.digest = None
    data = tensor_bytes(value.materialize())
    digest = hashlib.sha256(data).digest()
    pwrite_all(fd, data, offset)
    value.digest = digest
    return len(data)


# ---------------------------------------------------------------------------------- from a reader
def tensor_source(reader, name: str) -> PatchValue:
    """The whole tensor `name` of the reader's checkpoint, lazily (e.g. to store it under another name)."""
    info = reader.header(name)
    if info.begin is None:  # pickle: no byte ranges, the mmap-backed tensor is the value
        return reader.get(name)
    return SourceBytes(str(reader.shard_real_path(info.shard)), info.dtype, info.shape, ((info.begin, info.end),),
                       identity=reader.shard_header(info.shard).identity)


def rows_source(reader, name: str, rows: Sequence[int]) -> PatchValue:
    """Rows `rows` (in this order) of dim 0 of tensor `name`, lazily: one byte range per run of consecutive rows."""
    info = reader.header(name)
    rows = [int(r) for r in rows]
    if not info.shape:
        raise CheckpointError(f"cannot take rows of {name!r}: it is a scalar (shape [])")
    count = info.shape[0]
    bad = [r for r in rows if not 0 <= r < count]
    if bad:
        raise CheckpointError(f"rows {bad[:4]} of {name!r} are out of range: dim 0 has {count} rows (0..{count - 1})")
    if info.begin is None:
        return reader.get(name).index_select(0, torch.tensor(rows, dtype=torch.long)).contiguous()
    row_elems = 1
    for d in info.shape[1:]:
        row_elems *= d
    row_bits = row_elems * (element_bits(info.dtype) or 0)
    if row_bits % 8:
        raise CheckpointError(f"cannot take rows of {name!r} ({info.dtype} {list(info.shape)}): a row is {row_bits} "
                              "bits, not whole bytes, so rows have no byte ranges")
    step = row_bits // 8
    ranges: list[tuple[int, int]] = []
    for r in rows:
        begin = info.begin + r * step
        if ranges and ranges[-1][1] == begin:  # the next row follows the last one on disk: extend the range
            ranges[-1] = (ranges[-1][0], begin + step)
        else:
            ranges.append((begin, begin + step))
    return SourceBytes(str(reader.shard_real_path(info.shard)), info.dtype, (len(rows), *info.shape[1:]),
                       tuple(ranges), identity=reader.shard_header(info.shard).identity)


# ---------------------------------------------------------------------------------- reading
def _changed(source: SourceBytes, now: tuple[int, int, int]) -> CheckpointError:
    size, mtime, inode = source.identity
    return CheckpointError(
        f"{source.path} changed since the export was planned (size {size} -> {now[0]}, mtime_ns {mtime} -> {now[1]}, "
        f"inode {inode} -> {now[2]}): a source file must not change while an export reads it, and nothing was "
        "published. Let whatever writes it finish, then run the export again")


class _Open:
    """The source's file, opened and checked against its identity; checked again on close (a write during the
    read changes the mtime)."""

    def __init__(self, source: SourceBytes):
        self.source = source

    def __enter__(self) -> int:
        self.fd = open_regular(self.source.path)
        now = file_identity(os.fstat(self.fd))
        if now != self.source.identity:
            os.close(self.fd)
            raise _changed(self.source, now)
        return self.fd

    def __exit__(self, exc_type, *exc) -> None:
        try:
            now = file_identity(os.fstat(self.fd))
        finally:
            os.close(self.fd)
        if exc_type is None and now != self.source.identity:
            raise _changed(self.source, now)


def copy_source(source: SourceBytes, dst_fd: int, dst_offset: int) -> int:
    """Write the source's bytes at dst_offset of dst_fd (kernel-side where possible); returns the bytes written."""
    with _Open(source) as fd:
        for begin, end in source.ranges:
            copy_range(fd, dst_fd, begin, dst_offset, end - begin)
            dst_offset += end - begin
    return source.nbytes


def prefetch(value: PatchValue) -> None:
    """Start reading a SourceBytes' ranges into the page cache without waiting (posix_fadvise WILLNEED), so the
    disk reads the next tensor while the current one is copied; a hint only: any failure is ignored."""
    if not isinstance(value, SourceBytes) or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(value.path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        for begin, end in value.ranges:
            os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def iter_source(source: SourceBytes, chunk: int | None = None) -> Iterator[bytes]:
    """The source's bytes in order, at most `chunk` (default CHUNK) at a time."""
    chunk = chunk or CHUNK
    with _Open(source) as fd:
        for begin, end in source.ranges:
            while begin < end:
                data = os.pread(fd, min(chunk, end - begin), begin)
                if not data:
                    raise CheckpointError(f"{source.path} ended at byte {begin}, before the tensor's end at {end} "
                                          "(truncated while we were reading it?)")
                begin += len(data)
                yield data


def _fill(fd: int, buf: bytearray, count: int, offset: int, path: str) -> None:
    """Read exactly `count` bytes at `offset` into the start of buf (reused: no allocation per chunk)."""
    view, done = memoryview(buf), 0
    while done < count:
        n = os.preadv(fd, [view[done:count]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path} ended at byte {offset + done}, {count - done} bytes early (truncated "
                                  "while we were reading it?)")
        done += n


class ByteComparer:
    """Compares patch values with bytes of open files, one chunk at a time, through reused buffers.

    Buffers are kept per piece size (at most two sizes, so at most four chunks are held): a prune
    verifies thousands of same-sized experts, and a fresh buffer per tensor (allocated, faulted in,
    freed, trimmed) cost ten times the comparison itself. Equal-sized buffers compare with one memcmp.
    """

    def __init__(self, chunk: int | None = None):
        self.chunk = chunk or CHUNK
        self._pairs: dict[int, tuple[bytearray, bytearray]] = {}

    def _pair(self, n: int) -> tuple[bytearray, bytearray]:
        pair = self._pairs.get(n)
        if pair is None:
            if len(self._pairs) >= 2:
                del self._pairs[next(iter(self._pairs))]
            pair = self._pairs[n] = (bytearray(n), bytearray(n))
        return pair

    def same(self, value: PatchValue, fd: int, offset: int) -> bool:
        """Whether the bytes at `offset` of open file `fd` equal the value's."""
        out = f"the output file (fd {fd})"
        if isinstance(value, ComputedTensor):  # never recomputed: the written bytes' hash against the write's
            if value.digest is None:
                return False
            h, size = hashlib.sha256(), value.nbytes
            for i in range(0, size, self.chunk):
                n = min(self.chunk, size - i)
                got = self._pair(n)[0]
                _fill(fd, got, n, offset + i, out)
                h.update(memoryview(got)[:n])
            return h.digest() == value.digest
        if not isinstance(value, SourceBytes):
            whole = tensor_bytes(value)  # already in memory: compared slice by slice, never read back whole
            for i in range(0, len(whole), self.chunk):
                piece = whole[i:i + self.chunk]
                got = self._pair(len(piece))[0]
                _fill(fd, got, len(piece), offset + i, out)
                if got != piece:
                    return False
            return True
        with _Open(value) as src:
            for begin, end in value.ranges:
                while begin < end:
                    n = min(self.chunk, end - begin)
                    want, got = self._pair(n)
                    _fill(src, want, n, begin, value.path)
                    _fill(fd, got, n, offset, out)
                    if got != want:
                        return False
                    begin, offset = begin + n, offset + n
        return True


def same_bytes(value: PatchValue, fd: int, offset: int, chunk: int | None = None) -> bool:
    """Whether the bytes at `offset` of open file `fd` equal the value's (one-off `ByteComparer`)."""
    return ByteComparer(chunk).same(value, fd, offset)
