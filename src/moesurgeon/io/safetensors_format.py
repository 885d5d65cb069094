"""The safetensors file format, parsed and written by hand.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON
(`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}`),
then the data section. `data_offsets` are relative to the data section, and
the official reader rejects files whose tensors leave holes or do not cover
the data section exactly.

We parse the header ourselves (instead of only calling `safe_open`) for two
reasons: (1) to give a precise error for truncated or corrupt shards before a
loader fails somewhere deep, and (2) to know every tensor's absolute byte range,
so that the writers can copy raw bytes between files without deserializing.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

import torch

from .errors import CheckpointError

# The Rust reader refuses headers above 100 MB; so do we, which also stops a
# corrupt length prefix from making us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype name -> (torch dtype or None when this torch lacks it, bits per element)
_DTYPE_TABLE: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8),
    "U8": (torch.uint8, 8),
    "I8": (torch.int8, 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    "I16": (torch.int16, 16),
    "U16": (getattr(torch, "uint16", None), 16),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "I32": (torch.int32, 32),
    "U32": (getattr(torch, "uint32", None), 32),
    "F32": (torch.float32, 32),
    "I64": (torch.int64, 64),
    "U64": (getattr(torch, "uint64", None), 64),
    "F64": (torch.float64, 64),
    "C64": (torch.complex64, 64),
}
_NAME_OF_TORCH_DTYPE = {dt: name for name, (dt, _) in _DTYPE_TABLE.items() if dt is not None}


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name for a torch dtype ("BF16" for torch.bfloat16)."""
    try:
        return _NAME_OF_TORCH_DTYPE[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} has no safetensors encoding; cast the tensor first") from None


def element_bits(dtype: str) -> int | None:
    """Bits per element of a safetensors dtype name; None for names this module does not know."""
    entry = _DTYPE_TABLE.get(dtype)
    return entry[1] if entry else None


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    bits = element_bits(dtype)
    if bits is None:
        return None
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * bits // 8


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard header. `begin`/`end` are ABSOLUTE file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    path: str
    data_start: int  # 8 + header length
    file_size: int
    metadata: dict[str, str] | None
    entries: dict[str, TensorEntry] = field(repr=False)  # in data (offset) order


def _corrupt(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what}. The shard is truncated or corrupt (an interrupted download or copy?); "
        "re-download or re-copy this file."
    )


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and validate the header of a safetensors file; reads only the header bytes."""
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    if file_size < 8:
        raise _corrupt(path, f"file is {file_size} bytes, too short for the 8-byte header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > file_size - 8 or header_len > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length prefix says {header_len} bytes but only {file_size - 8} follow")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is JSON {type(header).__name__}, expected an object")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None)
    entries = [_parse_entry(path, name, spec, data_start) for name, spec in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    # The official reader requires the tensors to tile the data section exactly.
    cursor = data_start
    for entry in entries:
        if entry.begin != cursor:
            raise _corrupt(path, f"tensor {entry.name!r} starts at data offset {entry.begin - data_start}, "
                                 f"expected {cursor - data_start} (tensors must be contiguous)")
        cursor = entry.end
    if cursor > file_size:
        raise _corrupt(path, f"tensor data runs to byte {cursor} but the file has {file_size} bytes")
    if cursor < file_size:
        raise _corrupt(path, f"{file_size - cursor} trailing bytes after the last tensor (data ends at {cursor})")
    return ShardHeader(path, data_start, file_size, metadata, {e.name: e for e in entries})


def _parse_entry(path: str, name: str, spec: object, data_start: int) -> TensorEntry:
    try:
        dtype = spec["dtype"]  # type: ignore[index]
        shape = tuple(int(d) for d in spec["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in spec["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as exc:
        raise _corrupt(path, f"header entry for {name!r} is malformed ({exc!r}): {spec!r}") from None
    if not isinstance(dtype, str) or any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise _corrupt(path, f"header entry for {name!r} is malformed: {spec!r}")
    want = expected_nbytes(dtype, shape)
    if want is not None and want != end - begin:
        raise _corrupt(path, f"tensor {name!r} ({dtype} {list(shape)}) needs {want} bytes "
                             f"but its data_offsets span {end - begin}")
    return TensorEntry(name, dtype, shape, data_start + begin, data_start + end)


def encode_header(
    tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None
) -> tuple[bytes, list[int]]:
    """Build length prefix + JSON header for tensors (name, dtype, shape, nbytes) laid out in order.

    Returns the bytes to write first and each tensor's absolute begin offset.
    The JSON is padded with spaces to a multiple of 8 so the data section (and
    hence every tensor of an alignment-ordered layout) is 8-byte aligned for mmap.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    rel_begins = []
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        rel_begins.append(offset)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    data_start = 8 + len(blob)
    return struct.pack("<Q", len(blob)) + blob, [data_start + b for b in rel_begins]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian raw bytes of a tensor, as safetensors stores them (no copy when already contiguous on CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
