"""What a corpus record becomes: ``Example``, ``DataError``, and the rules for reading a label.

Every reader (text files, JSON lines, ``datasets`` sources) yields ``Example``s and raises
``DataError``; ``moesurgeon.data`` re-exports both. Label rules, the same for every source:

* a string is used as it is; a number or boolean as its Python text (3 -> "3", 2.5 -> "2.5",
  true -> "True"), the same conversion ``data.only_labels`` applies to its values;
* a missing field, ``null``, NaN, or a ClassLabel -1 is "no label" (one message for all of them);
* a list or object is rejected.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data import DataSpec

__all__ = ["DataError", "Example", "Records", "label_text", "missing_label_message", "record_example"]

Records = Callable[[], Iterator["Example"]]

_SHOW = reprlib.Repr()  # bounded reprs of offending values (a bad field may hold megabytes)
_SHOW.maxstring = _SHOW.maxother = 60


class DataError(ValueError):
    """A problem with the data spec or the data itself, with the fix in the message."""


@dataclass(frozen=True)
class Example:
    """One corpus record: its text, and its label as text (None: unlabelled)."""

    text: str
    label: str | None = None


def record_example(rec: Any, spec: DataSpec, where: str) -> Example:
    """A parsed JSON object as an ``Example``; ``where`` (file and line) goes into every error."""
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
            raise DataError(missing_label_message(where, spec.label_field, sorted(rec)))
        label = label_text(rec[spec.label_field], spec.label_field, where, sorted(rec))
    text = rec[spec.text_field]
    if text is not None and not isinstance(text, str):
        raise DataError(
            f"{where}: field {spec.text_field!r} holds a {type(text).__name__} ({_SHOW.repr(text)}), expected a string"
        )
    return Example(text or "", label)


def missing_label_message(where: str, field: str, fields: list[str], value: str | None = None) -> str:
    """The one message for a record without a usable label (missing field, null, NaN, ClassLabel -1)."""
    has = f"has no label field {field!r}" if value is None else f"has label field {field!r} = {value}"
    return (
        f"{where} {has}; fields present: {fields}; with data.label_field set, every record needs a label: "
        f"give each record a {field!r} value (or drop the unlabelled ones), set data.label_field to the field "
        "that holds the label, or data.label_field=null for unlabelled data"
    )


def label_text(value: Any, field: str, where: str, fields: list[str]) -> str:
    """A record's label as text: strings as they are, numbers and booleans as ``str(value)``."""
    if value is None:
        raise DataError(missing_label_message(where, field, fields, "null"))
    if isinstance(value, float) and math.isnan(value):
        raise DataError(missing_label_message(where, field, fields, "NaN"))
    if isinstance(value, (list, tuple, dict)):
        raise DataError(
            f"{where}: label field {field!r} holds a {type(value).__name__} ({_SHOW.repr(value)}); expected one "
            "label per record, a string (a number is used as its text, 3 -> '3'); give each record a single "
            "label, or set data.label_field to another field"
        )
    return str(value)
