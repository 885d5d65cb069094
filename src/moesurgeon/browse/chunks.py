"""Read a checkpoint's tensors once, in bounded chunks, on a background thread.

A *unit* is what the statistics look at in one go: a whole tensor, one expert's slice of a fused
`[E, ...]` tensor, or a block of rows of a tensor too large for one chunk (embeddings, LM head).
Units are read in file order with plain `readinto` into a small pool of reusable buffers (no mmap:
page faults would count against the resident memory, and a reused buffer costs no allocation),
so peak memory is a few chunks whatever the checkpoint size, and reading overlaps computing:
the reader thread fills the next buffer while the caller works on the current one (file reads and
torch kernels both release the GIL).

One file is open at a time per checkpoint. A unit that cannot be read (short file, I/O error) comes
back with its error instead of data; the rest of the shard is still read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.safetensors_format import element_bits, torch_dtype

# safetensors dtype -> torch dtype for the floating dtypes whose statistics we compute (little-endian on
# disk, as on every platform torch supports for these); the table itself is io's
_STATS_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
TORCH_DTYPES: dict[str, torch.dtype] = {name: torch_dtype(name) for name in _STATS_DTYPES if torch_dtype(name)}
_ITEMSIZE = {name: element_bits(name) // 8 for name in TORCH_DTYPES}


@dataclass(frozen=True)
class Span:
    """Bytes [begin, end) of one file, holding `shape` elements of `dtype`."""

    path: Path
    begin: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Unit:
    tensor: str
    kind: str  # "whole" | "slice" (expert `index` of a fused tensor) | "rows" (block `index` of a large tensor)
    index: int
    span: Span
    partner: Span | None = None  # the matching bytes of the other checkpoint (diff), if any


def split_tensor(path: Path, begin: int, dtype: str, shape: tuple[int, ...], *, fused: bool,
                 max_bytes: int) -> list[tuple[str, int, Span]]:
    """(kind, index, span) pieces of one tensor: expert slices when fused, row blocks when too large."""
    item = _ITEMSIZE[dtype]
    numel = 1
    for d in shape:
        numel *= d
    if fused and len(shape) >= 2:
        per = numel // shape[0] * item
        if per <= max_bytes:
            return [("slice", e, Span(path, begin + e * per, begin + (e + 1) * per, dtype, tuple(shape[1:])))
                    for e in range(shape[0])]
    if numel * item <= max_bytes or not shape:
        return [("whole", 0, Span(path, begin, begin + numel * item, dtype, tuple(shape)))]
    row = numel // shape[0] * item if len(shape) > 1 else item
    rows = max(1, max_bytes // max(row, 1))
    pieces = []
    for i, start in enumerate(range(0, shape[0], rows)):
        stop = min(shape[0], start + rows)
        pieces.append(("rows", i, Span(path, begin + start * row, begin + stop * row, dtype,
                                       (stop - start, *shape[1:]))))
    return pieces


class Batch:
    """Units read into one buffer: `items()` gives `(unit, tensor, partner tensor, error)`; the tensors are views
    of the buffer, valid until `release()` hands it back to the reader (call it exactly once)."""

    def __init__(self, entries: list[tuple[Unit, int]], buf: bytearray, errors: list[str | None], free: queue.Queue):
        self.entries, self._buf, self._errors, self._free = entries, buf, errors, free

    @property
    def nbytes(self) -> int:
        return sum(_unit_bytes(unit) for unit, _ in self.entries)

    def items(self) -> Iterator[tuple[Unit, torch.Tensor | None, torch.Tensor | None, str | None]]:
        for (unit, offset), error in zip(self.entries, self._errors):
            data = partner = None
            if error is None:
                data = _view(self._buf, offset, unit.span)
                if unit.partner is not None:
                    partner = _view(self._buf, offset + unit.span.nbytes, unit.partner)
            yield unit, data, partner, error

    def release(self) -> None:
        if self._buf is not None:
            self._free.put(self._buf)
            self._buf = None


class ChunkReader:
    """Iterate `Batch`es of units, read ahead on a thread into a fixed pool of buffers.

    Consecutive small units are read as one batch into one buffer (one hand-over between threads per
    batch, not per tensor: a checkpoint has thousands of small norms and biases). The reader stops
    when every buffer is out: memory is the pool, whatever the checkpoint size.
    """

    def __init__(self, units: list[Unit], *, max_bytes: int, pool: list[bytearray] | None = None):
        self.batches: list[list[tuple[Unit, int]]] = []  # (unit, offset in the buffer)
        size = used = 0
        for unit in units:
            need = _aligned(_unit_bytes(unit))
            if not self.batches or used + need > max_bytes:
                self.batches.append([])
                used = 0
            self.batches[-1].append((unit, used))
            used += need
            size = max(size, used)
        pool = pool if pool is not None else new_pool(size)
        if any(len(b) < size for b in pool):
            raise ValueError(f"buffer pool too small for a batch of {size} bytes")
        self._free: queue.Queue = queue.Queue()
        for buf in pool:
            self._free.put(buf)
        self._ready: queue.Queue = queue.Queue(maxsize=len(pool))
        self._stop = threading.Event()

    def __iter__(self) -> Iterator[Batch]:
        if not self.batches:
            return
        thread = threading.Thread(target=self._read_all, name="browse-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = self._ready.get()
                if item is None:
                    break
                batch = Batch(*item, self._free)
                yield batch
        finally:
            self._stop.set()
            while thread.is_alive():  # unblock the reader if the consumer stopped early
                try:
                    item = self._ready.get_nowait()
                    if item is not None:
                        self._free.put(item[1])
                except queue.Empty:
                    pass
                thread.join(0.05)

    def _read_all(self) -> None:
        files: dict[int, tuple[Path, object]] = {}  # slot 0: this checkpoint, 1: the other (diff)
        try:
            for batch in self.batches:
                while True:  # wait for a free buffer, but notice a consumer that gave up
                    if self._stop.is_set():
                        return
                    try:
                        buf = self._free.get(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
                view = memoryview(buf)
                errors: list[str | None] = []
                for unit, offset in batch:
                    try:
                        end = offset + unit.span.nbytes
                        _read_into(files, 0, unit.span, view[offset:end])
                        if unit.partner is not None:
                            _read_into(files, 1, unit.partner, view[end:end + unit.partner.nbytes])
                        errors.append(None)
                    except OSError as exc:
                        errors.append(f"read failed: {exc}")
                del view
                self._ready.put((batch, buf, errors))
        finally:
            for _, handle in files.values():
                handle.close()
            self._ready.put(None)


def new_pool(size: int, buffers: int = 3) -> list[bytearray]:
    """Buffers for a ChunkReader: reuse one pool for every shard (fresh 32 MB buffers per shard fragment
    the heap and raise the resident size). At least one per compute worker, one being read, one ready."""
    return [bytearray(max(size, 1)) for _ in range(buffers)]


def batch_bytes(unit: Unit) -> int:
    """Bytes a unit takes in a batch buffer (its data, its partner's, alignment)."""
    return _aligned(_unit_bytes(unit))


def _unit_bytes(unit: Unit) -> int:
    return unit.span.nbytes + (unit.partner.nbytes if unit.partner else 0)


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64  # every unit starts on a cache line (and any element size)


def _read_into(files: dict, slot: int, span: Span, out: memoryview) -> None:
    current = files.get(slot)
    if current is None or current[0] != span.path:
        if current is not None:
            current[1].close()  # one file open per checkpoint: close before opening the next shard
        files[slot] = (span.path, open(span.path, "rb", buffering=0))  # noqa: SIM115 - closed in _read_all
    handle = files[slot][1]
    handle.seek(span.begin)
    done = 0
    while done < len(out):
        n = handle.readinto(out[done:])
        if not n:
            raise OSError(f"{span.path} ends at byte {span.begin + done}, inside a tensor that runs to {span.end}")
        done += n


def _view(buf: bytearray, offset: int, span: Span) -> torch.Tensor:
    dtype = TORCH_DTYPES[span.dtype]
    count = span.nbytes // _ITEMSIZE[span.dtype]
    if count == 0:
        return torch.empty(span.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(span.shape)


def readable(dtype: str | None) -> bool:
    """True for the dtypes whose statistics the browser computes (floating point)."""
    return dtype in TORCH_DTYPES


def read_whole(span: Span) -> torch.Tensor:
    """One small tensor (a router), read directly and returned as a float32 copy."""
    buf = bytearray(max(span.nbytes, 1))
    files: dict = {}
    try:
        _read_into(files, 0, span, memoryview(buf)[: span.nbytes])
    finally:
        for _, handle in files.values():
            handle.close()
    return _view(buf, 0, span).float().clone()
