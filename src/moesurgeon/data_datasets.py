"""Readers for ``datasets`` sources: a ``save_to_disk`` directory or a hub dataset id.

The dataset is opened once (``load_disk`` / ``load_hub``), its split and columns are checked
(``select_split``), and every pass reads it in batches of rows (``read_dataset``), so only one
batch of texts is held at a time. ClassLabel ids become their names. ``datasets`` is imported
only when such a source is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data_records import DataError, Example, label_text, missing_label_message

if TYPE_CHECKING:
    from .data import DataSpec

__all__ = ["load_disk", "load_hub", "read_dataset", "select_split"]

_OFFLINE_FIX = (
    "pass a local path instead: a .txt file, a directory of .txt files, a .jsonl file, "
    "or a dataset written with datasets' save_to_disk()"
)


def load_disk(path: Path, spec: DataSpec) -> Any:
    """A dataset written by ``save_to_disk``, or a ``DataError`` naming the path."""
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(
            f"data.path={spec.path!r} could not be read with datasets.load_from_disk ({type(err).__name__}: {err}); "
            "expected a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk"
        ) from err


def load_hub(spec: DataSpec) -> Any:
    """``datasets.load_dataset(spec.path, split=spec.split)``; any failure becomes one offline-aware message."""
    import datasets

    try:
        return datasets.load_dataset(spec.path, split=spec.split)
    except Exception as err:  # offline: ConnectionError / LocalEntryNotFoundError / OSError, all to one message
        raise DataError(
            f"data.path={spec.path!r} is not a local path, so it was tried as a hub dataset id and that failed "
            f"({type(err).__name__}: {str(err)[:300]}). Without network access (or with a wrong id), {_OFFLINE_FIX}"
        ) from err


def select_split(ds: Any, spec: DataSpec, *, source: str, split_applied: bool) -> Any:
    """The one split to read, with its text and label columns checked; ``split_applied``: the loader picked it."""
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


def read_dataset(ds: Any, spec: DataSpec, source: str) -> Iterator[Example]:
    """One ``Example`` per row, read in batches of 256 rows; ClassLabel ids become their names."""
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
                    raise DataError(missing_label_message(where, field, columns, f"{value} (ClassLabel's 'no label')"))
                label = names[value] if names is not None and value is not None else label_text(
                    value, field, where, columns)
            yield Example(text or "", label)
            row += 1
