"""The safetensors file format, parsed and written by hand.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON
(`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}`),
then the data section. `data_offsets` are relative to the data section, and
the official reader rejects files whose tensors leave holes or do not cover
the data section exactly.

We parse the header ourselves (instead of only calling `safe_open`) for two
reasons: (1) to give a precise error for truncated, corrupt or hostile shards
before a loader fails somewhere deep, and (2) to know every tensor's absolute
byte range, so that the writers can copy raw bytes between files without
deserializing.

A checkpoint is untrusted input, so `read_header` applies the format's rules as
the Rust reader (safetensors 0.8, serde) does: nothing that `safe_open` rejects
passes here. Where we are STRICTER, on purpose:
- duplicate JSON keys anywhere in the header (serde keeps the last tensor or
  metadata value silently; which one a tool sees would depend on its parser);
- empty tensor names;
- shape dimensions above 2**63 - 1 (safe_open accepts them, torch cannot build
  the tensor).
Python's JSON leniencies are turned off to match serde: `NaN`/`Infinity` and an
integer `-0` are refused. Like the Rust reader we ignore unknown fields inside a tensor entry, and accept
the sub-byte dtypes F4/F6_* (safe_open opens such files; only its torch
frontend cannot build F6 tensors, while our raw byte copies carry them fine).
The dtype list is safetensors 0.8's: an older library may refuse F4, F6_* or
the FNUZ float8 names that we accept.
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
_USIZE_MAX = 2**64 - 1  # serde reads shape and offsets as usize (64-bit)
_DIM_MAX = 2**63 - 1  # torch sizes are int64

# safetensors dtype name -> (torch dtype or None when torch cannot hold it element-wise, bits per element);
# the names and their order are those of the Rust `Dtype` enum (safetensors 0.8).
_DTYPE_TABLE: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8),
    "F4": (None, 4),  # torch only has the packed float4_e2m1fn_x2, whose shape differs
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
    "U8": (torch.uint8, 8),
    "I8": (torch.int8, 8),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8),
    "I16": (torch.int16, 16),
    "U16": (getattr(torch, "uint16", None), 16),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "I32": (torch.int32, 32),
    "U32": (getattr(torch, "uint32", None), 32),
    "F32": (torch.float32, 32),
    "C64": (torch.complex64, 64),
    "F64": (torch.float64, 64),
    "I64": (torch.int64, 64),
    "U64": (getattr(torch, "uint64", None), 64),
}
DTYPE_NAMES = tuple(_DTYPE_TABLE)
_NAME_OF_TORCH_DTYPE = {dt: name for name, (dt, _) in _DTYPE_TABLE.items() if dt is not None}


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name for a torch dtype ("BF16" for torch.bfloat16)."""
    try:
        return _NAME_OF_TORCH_DTYPE[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} has no safetensors encoding; cast the tensor first") from None


def torch_dtype(dtype: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name; None when torch has none (or the name is unknown)."""
    entry = _DTYPE_TABLE.get(dtype)
    return entry[0] if entry else None


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
    # (size, mtime_ns, inode) of the file whose header this is: a writer reading tensor bytes later
    # checks it, so a file changed in between is an error instead of a mixed tensor (lazy_sources.py)
    identity: tuple[int, int, int] | None = field(default=None, compare=False)


def _corrupt(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what}. The shard is truncated or corrupt (an interrupted download or copy?); "
        "re-download or re-copy this file."
    )


def _invalid(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what}. This header breaks the safetensors format (safe_open or other loaders would refuse "
        "or misread it); re-download the file, or re-create it with safetensors.torch.save_file."
    )


class DuplicateJSONKey(ValueError):
    """A JSON object names the same key twice (Python's json, and serde for maps, silently keep the last value)."""

    def __init__(self, key: str):
        super().__init__(f"duplicate JSON key {key!r}")
        self.key = key


def reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json `object_pairs_hook` that raises DuplicateJSONKey instead of keeping the last value."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateJSONKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")


def _parse_int(text: str) -> int | float:
    # serde parses "-0" as the float -0.0 (and so refuses it where an integer is due); Python would make it 0
    return -0.0 if text == "-0" else int(text)


def load_json_strict(raw: str) -> object:
    """json.loads as serde reads a header: NaN/Infinity refused, duplicate keys raise DuplicateJSONKey."""
    return json.loads(raw, object_pairs_hook=reject_duplicate_keys, parse_constant=_reject_constant,
                      parse_int=_parse_int)


def read_header(path: str | os.PathLike, *, label: str | None = None) -> ShardHeader:
    """Parse and validate the header of a safetensors file; reads only the header bytes.

    `label` names the file in error messages (e.g. the shard link a user knows, where `path` is a blob).
    """
    real_path = os.fspath(path)
    path = label or real_path  # from here on `path` is what messages say; reads use real_path
    # O_NONBLOCK: a FIFO must not hang the open (it then fails as too short); no effect on regular files
    with open(os.open(real_path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        st = os.fstat(f.fileno())  # the opened file's: a file swapped after a stat cannot lend its size
        file_size, identity = st.st_size, (st.st_size, st.st_mtime_ns, st.st_ino)
        if file_size < 8:
            raise _corrupt(path, f"file is {file_size} bytes, too short for the 8-byte header length")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > file_size - 8 or header_len > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length prefix says {header_len} bytes but only {file_size - 8} follow")
        raw = f.read(header_len)
    try:
        header = load_json_strict(raw.decode("utf-8"))
    except DuplicateJSONKey as exc:
        raise _invalid(path, f"the header has a {exc}; which of the two values counts would depend on the "
                             "loader's JSON parser") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting: serde stops at 128 levels
        raise _corrupt(path, f"header is not valid UTF-8 JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is JSON {type(header).__name__}, expected an object")
    data_start = 8 + header_len
    metadata = _check_metadata(path, header.pop("__metadata__", None))
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
    return ShardHeader(real_path, data_start, file_size, metadata, {e.name: e for e in entries}, identity)


def _check_metadata(path: str, metadata: object) -> dict[str, str] | None:
    """`__metadata__` is absent, null, or an object of strings (the Rust reader's HashMap<String, String>)."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise _invalid(path, f"__metadata__ is {json.dumps(metadata)[:80]} (a JSON {type(metadata).__name__}); "
                             "expected an object mapping strings to strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _invalid(path, f"__metadata__[{key!r}] is {json.dumps(value)[:80]}, a JSON "
                                 f"{type(value).__name__}; metadata values must be strings")
    return metadata


def _is_uint(value: object, limit: int) -> bool:
    # bool is an int subclass in Python, but `true` is no JSON integer; floats (2.0) are no integers either
    return type(value) is int and 0 <= value <= limit


def _parse_entry(path: str, name: str, spec: object, data_start: int) -> TensorEntry:
    where = f"tensor {name!r}"
    if not name:
        raise _invalid(path, "a tensor has an empty name ''; tensor names must be non-empty strings")
    if not isinstance(spec, dict):
        raise _invalid(path, f"{where}: header entry is {json.dumps(spec)[:80]}; expected an object with "
                             "'dtype', 'shape' and 'data_offsets'")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in spec]
    if missing:
        raise _invalid(path, f"{where}: header entry {json.dumps(spec)[:120]} lacks {missing}")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_TABLE:
        raise _invalid(path, f"{where}: unknown dtype {json.dumps(dtype)[:80]}; expected one of "
                             f"{', '.join(DTYPE_NAMES)}")
    if not isinstance(shape, list) or not all(_is_uint(d, _DIM_MAX) for d in shape):
        raise _invalid(path, f"{where}: shape {json.dumps(shape)[:80]} is not a list of non-negative JSON "
                             f"integers (no floats like 2.0, booleans, strings or nested lists; each <= {_DIM_MAX})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(x, _USIZE_MAX) for x in offsets):
        raise _invalid(path, f"{where}: data_offsets {json.dumps(offsets)[:80]} must be exactly two "
                             "non-negative JSON integers [begin, end]")
    begin, end = offsets
    if begin > end:
        raise _invalid(path, f"{where}: data_offsets [{begin}, {end}] begin after they end")
    # The Rust reader multiplies dims left to right with overflow checks, then by the element bits.
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > _USIZE_MAX:
            raise _invalid(path, f"{where}: shape {shape} has more elements than a 64-bit size can count")
    bits = numel * _DTYPE_TABLE[dtype][1]
    if bits > _USIZE_MAX:
        raise _invalid(path, f"{where}: {dtype} {shape} needs more bits than a 64-bit size can count")
    if bits % 8:
        raise _invalid(path, f"{where}: {dtype} {shape} is {bits} bits, which does not end on a byte boundary")
    if bits // 8 != end - begin:
        raise _corrupt(path, f"tensor {name!r} ({dtype} {shape}) needs {bits // 8} bytes "
                             f"but its data_offsets span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


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
