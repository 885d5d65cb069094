"""Where a ``DataSpec`` is read from: ``open_source`` picks the format and returns a record factory.

``open_source(spec)`` resolves the format (``text``, ``jsonl``, ``disk``, ``hub``; ``auto`` picks
one from what is at ``spec.path``) and returns a *factory*: every call starts a fresh pass over the
records. Readers hold one record at a time, so ``load_examples`` uses a first pass to count and a
second to keep its seeded subset. The readers themselves live in ``moesurgeon.data_files`` (.txt,
.jsonl, .json: encoding and line rules) and ``moesurgeon.data_datasets`` (``datasets`` sources);
``Example``, ``DataError`` and the label rules in ``moesurgeon.data_records``. Every problem
raises a ``DataError`` that names the file, the line or row, and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .data_datasets import load_disk, load_hub, read_dataset, select_split
from .data_files import read_jsonl, read_text, text_files
from .data_records import DataError, Example, Records

if TYPE_CHECKING:
    from .data import DataSpec

__all__ = ["DataError", "Example", "Records", "open_source"]

# owner/name or name, as the hub spells dataset ids; anything with a file suffix,
# a leading ./ or /, or more than one slash is a local path that is missing.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".arrow", ".parquet", ".csv")


def open_source(spec: DataSpec) -> Records:
    """Check ``spec`` against what is at ``spec.path`` and return a factory of record passes."""
    fmt = _resolve_format(spec)
    path = Path(spec.path).expanduser()
    if fmt == "text":
        files = text_files(path, spec)
        return lambda: read_text(files, spec)
    if fmt == "jsonl":
        return lambda: read_jsonl(path, spec)
    if fmt == "disk":
        ds = select_split(load_disk(path, spec), spec, source=str(path), split_applied=False)
        source = str(path)
    else:
        source = f"hub dataset {spec.path!r}"
        # load_dataset(split=...) already picked the split when one was named.
        ds = select_split(load_hub(spec), spec, source=source, split_applied=spec.split is not None)
    return lambda: read_dataset(ds, spec, source)


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
