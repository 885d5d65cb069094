"""File-format readers behind ``moesurgeon.data``: each turns a source into a stream of ``Example``s.

``open_source(spec)`` resolves the format and returns a *factory*: every call starts a fresh
pass over the records. Readers hold one record at a time, so a corpus of 10 MB lines costs
memory for the line being parsed, not for the whole file; ``load_examples`` uses a first pass
to count and a second to keep its seeded subset. ``DataError`` and ``Example`` are defined here
because the readers raise and produce them; ``moesurgeon.data`` re-exports both.

Rules, each enforced by a ``DataError`` that names the file, the line or row, and the fix:

* JSONL records end at b"\\n" only (a trailing "\\r" is JSON whitespace). U+2028, U+2029 and
  U+0085 are legal inside JSON strings and stay in the text; ``str.splitlines()`` would cut the
  record there. Raw control characters below U+0020 (\\x0b, \\x0c, \\x1c-\\x1e, ...) are not
  legal inside JSON strings (JSON needs them escaped, as ``json.dumps`` writes them), so a line
  holding one is reported as invalid JSON at its real line number.
* Input is UTF-8. A UTF-8 BOM at the start of a .json/.jsonl file is skipped (a .txt file's
  text is kept exactly as stored).
* Labels: a string is used as it is; a number or boolean as its Python text (3 -> "3",
  2.5 -> "2.5", true -> "True"), the same conversion ``data.only_labels`` applies to its values.
  A missing field, ``null``, NaN, or a ClassLabel -1 is "no label" (one message for all of
  them); a list or object is rejected.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data import DataSpec

Records = Callable[[], Iterator["Example"]]

_OFFLINE_FIX = (
    "pass a local path instead: a .txt file, a directory of .txt files, a .jsonl file, "
    "or a dataset written with datasets' save_to_disk()"
)
# owner/name or name, as the hub spells dataset ids; anything with a file suffix,
# a leading ./ or /, or more than one slash is a local path that is missing.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".arrow", ".parquet", ".csv")
_SHOW = reprlib.Repr()  # bounded reprs of offending values (a bad field may hold megabytes)
_SHOW.maxstring = _SHOW.maxother = 60


class DataError(ValueError):
    """A problem with the data spec or the data itself, with the fix in the message."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None = None


def open_source(spec: DataSpec) -> Records:
    """Check ``spec`` against what is at ``spec.path`` and return a factory of record passes."""
    fmt = _resolve_format(spec)
    path = Path(spec.path).expanduser()
    if fmt == "text":
        files = _text_files(path, spec)
        return lambda: _read_text(files, spec)
    if fmt == "jsonl":
        return lambda: _read_jsonl(path, spec)
    if fmt == "disk":
        ds = _select_split(_load_disk(path, spec), spec, source=str(path), split_applied=False)
        source = str(path)
    else:
        source = f"hub dataset {spec.path!r}"
        # load_dataset(split=...) already picked the split when one was named.
        ds = _select_split(_load_hub(spec), spec, source=source, split_applied=spec.split is not None)
    return lambda: _read_dataset(ds, spec, source)


def _resolve_format(spec: DataSpec) -> str:
    path = Path(spec.path).expanduser()
    if spec.format == "hub":
        return "hub"
    if not path.exists():
        if spec.format == "auto" and _looks_like_hub_id(spec.path):
            return "hub"
        raise DataError(
            f"data.path={spec.path!r} does not exist (resolved to {path.resolve()}); expected a .txt/.jsonl/.json "
            "file, a directory of .txt files, a save_to_disk dataset directory, or a hub dataset id; fix the path"
        )
    if spec.format != "auto":
        return spec.format
    if path.is_dir():
        if any((path / marker).exists() for marker in ("dataset_dict.json", "state.json", "dataset_info.json")):
            return "disk"
        return "text"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".txt":
        return "text"
    raise DataError(
        f"cannot tell the format of data.path={spec.path!r} from its suffix {suffix!r}; expected .txt, .jsonl "
        "or .json, or set data.format=text|jsonl|disk"
    )


def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not path.lower().endswith(_LOCAL_SUFFIXES)


# ------------------------------------------------------------------ text and JSON files


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


def _text_files(path: Path, spec: DataSpec) -> list[Path]:
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


def _read_text(files: list[Path], spec: DataSpec) -> Iterator[Example]:
    for file in files:
        text = _decode_file(file, file.read_bytes())
        yield Example(text, file.stem if spec.label_field == "filename" else None)


def _read_jsonl(path: Path, spec: DataSpec) -> Iterator[Example]:
    if path.suffix.lower() == ".json" and _starts_with_bracket(path):
        raw = _decode_file(path, path.read_bytes(), skip_bom=True)
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err}); expected a list of objects") from err
        del raw
        for pos, rec in enumerate(items, start=1):
            yield _record_example(rec, spec, f"{path} item {pos}")
        return
    for lineno, rec in _json_lines(path):
        yield _record_example(rec, spec, f"{path} line {lineno}")


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


def _record_example(rec: Any, spec: DataSpec, where: str) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where} is a {type(rec).__name__} ({_SHOW.repr(rec)}), expected a JSON object")
    if spec.text_field not in rec:
        raise DataError(
            f"{where} has no text field {spec.text_field!r}; fields present: {sorted(rec)}; "
            "set data.text_field to one of them"
        )
    label = None
    if spec.label_field is not None:
        if spec.label_field not in rec:
            raise DataError(_no_label(where, spec.label_field, sorted(rec)))
        label = label_text(rec[spec.label_field], spec.label_field, where, sorted(rec))
    text = rec[spec.text_field]
    if text is not None and not isinstance(text, str):
        raise DataError(
            f"{where}: field {spec.text_field!r} holds a {type(text).__name__} ({_SHOW.repr(text)}), expected a string"
        )
    return Example(text or "", label)


def _no_label(where: str, field: str, fields: list[str], value: str | None = None) -> str:
    has = f"has no label field {field!r}" if value is None else f"has label field {field!r} = {value}"
    return (
        f"{where} {has}; fields present: {fields}; with data.label_field set, every record needs a label: "
        f"give each record a {field!r} value (or drop the unlabelled ones), set data.label_field to the field "
        "that holds the label, or data.label_field=null for unlabelled data"
    )


def label_text(value: Any, field: str, where: str, fields: list[str]) -> str:
    """A record's label as text: strings as they are, numbers and booleans as ``str(value)``."""
    if value is None:
        raise DataError(_no_label(where, field, fields, "null"))
    if isinstance(value, float) and math.isnan(value):
        raise DataError(_no_label(where, field, fields, "NaN"))
    if isinstance(value, (list, tuple, dict)):
        raise DataError(
            f"{where}: label field {field!r} holds a {type(value).__name__} ({_SHOW.repr(value)}); expected one "
            "label per record, a string (a number is used as its text, 3 -> '3'); give each record a single "
            "label, or set data.label_field to another field"
        )
    return str(value)


# --------------------------------------------------------------------- datasets sources


def _load_disk(path: Path, spec: DataSpec) -> Any:
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(
            f"data.path={spec.path!r} could not be read with datasets.load_from_disk ({type(err).__name__}: {err}); "
            "expected a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk"
        ) from err


def _load_hub(spec: DataSpec) -> Any:
    import datasets

    try:
        return datasets.load_dataset(spec.path, split=spec.split)
    except Exception as err:  # offline: ConnectionError / LocalEntryNotFoundError / OSError, all to one message
        raise DataError(
            f"data.path={spec.path!r} is not a local path, so it was tried as a hub dataset id and that failed "
            f"({type(err).__name__}: {str(err)[:300]}). Without network access (or with a wrong id), {_OFFLINE_FIX}"
        ) from err


def _select_split(ds: Any, spec: DataSpec, *, source: str, split_applied: bool) -> Any:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        splits = list(ds)
        if spec.split is None and len(splits) == 1:
            ds = ds[splits[0]]
        elif spec.split is None:
            raise DataError(
                f"{source} has splits {splits}; choose one, e.g. data.heldout.split={splits[0]} "
                "(split=<name>; data.train.split for the training data)"
            )
        elif spec.split not in ds:
            raise DataError(f"split={spec.split!r} is not a split of {source}; splits present: {splits}")
        else:
            ds = ds[spec.split]
    elif spec.split is not None and not split_applied:
        # Not ignored: train and heldout pointing at one split-less dataset would overlap.
        raise DataError(
            f"split={spec.split!r} was given but {source} is a single Dataset without splits; "
            "set the split to null (e.g. data.heldout.split=null) or save a DatasetDict"
        )
    columns = list(ds.column_names)
    if spec.text_field not in columns:
        raise DataError(
            f"{source} has no text field {spec.text_field!r}; fields present: {columns}; "
            "set data.text_field to one of them"
        )
    if spec.label_field is not None and spec.label_field not in columns:
        raise DataError(
            f"{source} has no label field {spec.label_field!r}; fields present: {columns}; "
            "set data.label_field to one of them, or data.label_field=null"
        )
    return ds


def _read_dataset(ds: Any, spec: DataSpec, source: str) -> Iterator[Example]:
    from datasets import ClassLabel

    columns = list(ds.column_names)
    field = spec.label_field
    feature = ds.features[field] if field is not None else None
    # Integer class ids are meaningless in plots; ClassLabel knows their names.
    names = feature.names if isinstance(feature, ClassLabel) else None
    wanted = [spec.text_field] + ([field] if field not in (None, spec.text_field) else [])
    row = 0
    # Batches of rows rather than whole columns: only one batch of texts is held at a time.
    for batch in ds.select_columns(wanted).iter(batch_size=256):
        texts = batch[spec.text_field]
        values = batch[field] if field is not None else [None] * len(texts)
        for text, value in zip(texts, values):
            where = f"{source} row {row}"
            if text is not None and not isinstance(text, str):
                raise DataError(f"{where}: {spec.text_field!r} holds a {type(text).__name__}, expected a string")
            label = None
            if field is not None:
                if names is not None and value is not None and value < 0:
                    raise DataError(_no_label(where, field, columns, f"{value} (ClassLabel's 'no label')"))
                label = names[value] if names is not None and value is not None else label_text(
                    value, field, where, columns)
            yield Example(text or "", label)
            row += 1
