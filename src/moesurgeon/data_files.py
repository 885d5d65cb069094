"""Readers for text and JSON files: ``.txt`` (one example per file) and ``.jsonl`` / ``.json``.

Rules, each enforced by a ``DataError`` that names the file, the line and the fix:

* JSONL records end at b"\\n" only (a trailing "\\r" is JSON whitespace). U+2028, U+2029 and
  U+0085 are legal inside JSON strings and stay in the text; ``str.splitlines()`` would cut the
  record there. Raw control characters below U+0020 (\\x0b, \\x0c, \\x1c-\\x1e, ...) are not
  legal inside JSON strings (JSON needs them escaped, as ``json.dumps`` writes them), so a line
  holding one is reported as invalid JSON at its real line number.
* Input is UTF-8. A UTF-8 BOM at the start of a .json/.jsonl file is skipped (a .txt file's
  text is kept exactly as stored).

JSON lines are read one at a time, so a corpus of 10 MB lines costs memory for the line being
parsed, not for the whole file. How a JSON object becomes an ``Example`` (text and label
fields) is in ``moesurgeon.data_records``.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data_records import DataError, Example, record_example

if TYPE_CHECKING:
    from .data import DataSpec

__all__ = ["read_jsonl", "read_text", "text_files"]


def _utf8_error(path: Path, data: bytes, err: UnicodeDecodeError, *, where: str, file_offset: int) -> DataError:
    bad = " ".join(f"0x{b:02x}" for b in data[err.start : err.end])
    near = data[max(0, err.start - 24) : err.end + 24]
    return DataError(
        f"{where} is not valid UTF-8: byte {bad} at byte offset {file_offset} of the file ({err.reason}), "
        f"near {near!r}. Only UTF-8 is read: re-encode the file, e.g. "
        f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}` "
        "(give -f the encoding it was written in: latin1, cp1252, utf-16, ...)"
    )


def _decode_file(path: Path, data: bytes, *, skip_bom: bool = False) -> str:
    """A whole file's bytes as text; an error names the line and byte offset."""
    try:
        return data.decode("utf-8-sig" if skip_bom else "utf-8")
    except UnicodeDecodeError as err:
        pos = err.start + (3 if skip_bom and data.startswith(codecs.BOM_UTF8) else 0)  # utf-8-sig counts after it
        line = data.count(b"\n", 0, pos) + 1
        column = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
        err.start, err.end = pos, pos + err.end - err.start
        raise _utf8_error(path, data, err, where=f"{path} line {line} (byte {column} of the line)",
                          file_offset=pos) from err


def text_files(path: Path, spec: DataSpec) -> list[Path]:
    """The .txt files to read (a file, or a directory's top-level .txt files, sorted)."""
    if spec.label_field not in (None, "filename"):
        raise DataError(
            f"data.label_field={spec.label_field!r} cannot apply to .txt files, which have no fields; "
            "use data.label_field=filename (label = file stem) or a .jsonl file with a label column"
        )
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(
            f"directory data.path={spec.path!r} contains no .txt files (subdirectories are not searched); "
            "put one .txt file per example there, or point data.path at a .jsonl file"
        )
    return files


def read_text(files: list[Path], spec: DataSpec) -> Iterator[Example]:
    """One ``Example`` per file; with ``label_field=filename`` its label is the file stem."""
    for file in files:
        text = _decode_file(file, file.read_bytes())
        yield Example(text, file.stem if spec.label_field == "filename" else None)


def read_jsonl(path: Path, spec: DataSpec) -> Iterator[Example]:
    """One ``Example`` per JSON object: a .json list, or one object per line."""
    if path.suffix.lower() == ".json" and _starts_with_bracket(path):
        raw = _decode_file(path, path.read_bytes(), skip_bom=True)
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err}); expected a list of objects") from err
        del raw
        for pos, rec in enumerate(items, start=1):
            yield record_example(rec, spec, f"{path} item {pos}")
        return
    for lineno, rec in _json_lines(path):
        yield record_example(rec, spec, f"{path} line {lineno}")


def _starts_with_bracket(path: Path) -> bool:
    """Whether a .json file holds one JSON list (else: one object per line), reading only its start."""
    with open(path, "rb") as f:
        head = f.read(3)
        if head != codecs.BOM_UTF8:
            f.seek(0)
        while chunk := f.read(1 << 16):
            chunk = chunk.lstrip()
            if chunk:
                return chunk.startswith(b"[")
    return False


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` per non-blank line, reading one line at a time."""
    with open(path, "rb") as f:  # binary: readline() splits on b"\n" only
        offset = lineno = 0
        # A counter, not enumerate(): enumerate keeps its last tuple, which would pin the
        # previous line's bytes while the next one is read.
        while raw := f.readline():
            lineno += 1
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[3:], start + 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(path, raw, err, where=f"{path} line {lineno} (byte {err.start + 1} of the line)",
                                  file_offset=start + err.start) from err
            # Drop the bytes before parsing: a long line is then held as text plus the parsed
            # value, never three times. The line end ("\n", "\r\n") is JSON whitespace.
            del raw
            if not line or line.isspace():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(_json_error(path, lineno, line, err)) from err
            del line
            yield lineno, rec


def _json_error(path: Path, lineno: int, line: str, err: json.JSONDecodeError) -> str:
    near = line[max(0, err.pos - 30) : err.pos + 30]
    msg = f"{path} line {lineno} is not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno}, near {near!r})"
    if err.msg.startswith("Invalid control character") and err.pos < len(line):
        code = ord(line[err.pos])
        msg += (
            f"; a raw control character U+{code:04X} may not appear inside a JSON string: write it escaped "
            f"(\\u{code:04x}), as json.dumps does, or remove it"
        )
    return msg + "; expected one JSON object per line"
