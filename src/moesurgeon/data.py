"""The ``data`` spec: load a corpus, label it, and tokenize it into fixed-length blocks.

Every experiment (router-usage profiling, top-k sweeps, router LoRA, expert masking)
consumes text the same way, so this module is the single place that turns a
user-supplied path into ``TokenBlocks``:

* ``DataSpec`` says where the text is and how to read it;
* ``load_examples`` returns ``Example(text, label)`` records (``iter_examples`` streams them);
* ``tokenize_blocks`` cuts each example into ``block_size``-token blocks (``TokenBlocks``);
  it and the block type live in ``moesurgeon.data_blocks`` and are re-exported here;
* ``load_blocks`` does both after checking ``block_size`` against the model.

Supported sources (``format="auto"`` picks one from the path in ``moesurgeon.data_readers``;
the readers live in ``data_files`` and ``data_datasets``, which state the encoding and line rules,
and the label rules are in ``data_records``):

* ``text``  -- a ``.txt`` file or a directory of ``.txt`` files (not recursive).
  Each file is ONE example; with ``label_field="filename"`` its label is the
  file stem, so ``code.txt`` / ``math.txt`` give two labelled domains.
* ``jsonl`` -- ``.jsonl`` (one object per line) or ``.json`` (a list of objects,
  or one object per line).
* ``disk``  -- a ``datasets`` ``Dataset``/``DatasetDict`` written by ``save_to_disk``.
* ``hub``   -- a hub dataset id; only tried when nothing exists at ``path`` locally.

Memory: records are read one at a time and tokenized in small batches; token ids are
kept as one int32 tensor per example until the output tensors are filled, so the peak
is about the output plus the largest example's tokenization, not a multiple of the corpus
(the batching is in ``moesurgeon.data_blocks``).

All input problems raise ``DataError`` (a ``ValueError``) whose message names the
offending value, what was expected, and how to fix it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .data_blocks import BlockBuilder, TokenBlocks, pad_token_id, tokenize_blocks, validate_block_size
from .data_readers import open_source
from .data_records import DataError, Example

__all__ = ["DataError", "DataSpec", "Example", "TokenBlocks", "iter_examples", "load_examples", "tokenize_blocks",
           "load_blocks", "validate_block_size", "pad_token_id"]

FORMATS = ("auto", "text", "jsonl", "disk", "hub")


@dataclass
class DataSpec:
    """Where the text is and how to read it (the ``data`` config group)."""

    path: str
    format: str = "auto"
    text_field: str = "text"
    label_field: str | None = None
    split: str | None = None
    block_size: int = 256
    max_examples: int | None = None
    only_labels: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Fail at construction so a bad config never reaches the (slow) model load.
        self.path = str(self.path)
        if self.format not in FORMATS:
            raise DataError(f"data.format={self.format!r} is not one of {list(FORMATS)}; use one of those")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise DataError(f"data.block_size={self.block_size!r} must be a positive integer, e.g. data.block_size=256")
        if self.max_examples is not None and self.max_examples <= 0:
            raise DataError(
                f"data.max_examples={self.max_examples!r} must be positive; use data.max_examples=null for all examples"
            )
        if isinstance(self.only_labels, str):
            self.only_labels = [self.only_labels]
        if self.only_labels is not None:
            self.only_labels = [str(v) for v in self.only_labels]
            if not self.only_labels:
                raise DataError("data.only_labels=[] keeps nothing; use data.only_labels=null to keep every label")
            if self.label_field is None:
                raise DataError(
                    f"data.only_labels={self.only_labels} needs a label column, but data.label_field is null; "
                    "set data.label_field (e.g. data.label_field=domain, or =filename for .txt files)"
                )



# --------------------------------------------------------------------------- loading


@dataclass
class _Seen:
    """What the filters saw during one pass, for the checks made once the data is read."""

    records: int = 0
    nonempty: int = 0
    labels: set[str] = field(default_factory=set)


def _filtered(records: Iterable[Example], spec: DataSpec, seen: _Seen) -> Iterator[Example]:
    wanted = set(spec.only_labels) if spec.only_labels is not None else None
    for ex in records:
        seen.records += 1
        # Whitespace-only texts produce no tokens and would only make empty blocks.
        # isspace() rather than strip(): strip() may copy the whole text.
        if not ex.text or ex.text.isspace():
            continue
        seen.nonempty += 1
        if ex.label is not None:
            seen.labels.add(ex.label)
        if wanted is None or ex.label in wanted:
            yield ex


def _check_seen(seen: _Seen, spec: DataSpec) -> None:
    if not seen.records:
        raise DataError(f"data.path={spec.path!r} holds no examples; point data.path at a non-empty corpus")
    if not seen.nonempty:
        raise DataError(
            f"every example in data.path={spec.path!r} has an empty {spec.text_field!r}; "
            "check data.text_field names the column that holds the text"
        )
    if spec.only_labels is not None:
        present = sorted(seen.labels)
        missing = [v for v in spec.only_labels if v not in present]
        if missing:
            raise DataError(
                f"data.only_labels asks for {missing}, absent from {spec.label_field!r} in {spec.path!r}; "
                f"labels present: {present}"
            )


def iter_examples(spec: DataSpec) -> Iterator[Example]:
    """The examples of ``load_examples``, one at a time; input errors are raised as they are met."""
    source = open_source(spec)
    seen = _Seen()
    if spec.max_examples is None:
        yield from _filtered(source(), spec, seen)
        _check_seen(seen, spec)
        return
    # A seeded random subset (kept in file order) rather than the first N, so a corpus
    # sorted by domain does not lose whole domains. The subset depends on how many
    # examples pass the filters, so the first pass counts them, holding at most
    # max_examples of them (all that is needed when there are no more than that).
    held: list[Example] | None = []
    count = 0
    for ex in _filtered(source(), spec, seen):
        count += 1
        if held is not None and count <= spec.max_examples:
            held.append(ex)
        else:
            held = None
    _check_seen(seen, spec)
    if held is not None:
        yield from held
        return
    keep = sorted(random.Random(spec.seed).sample(range(count), spec.max_examples))
    wanted, last = set(keep), keep[-1]
    records = source()
    try:
        for i, ex in zip(range(last + 1), _filtered(records, spec, _Seen())):
            if i in wanted:
                yield ex
    finally:
        records.close()  # closes the file now when the pass stops early


def load_examples(spec: DataSpec) -> list[Example]:
    """Read ``spec.path`` into labelled examples, filtered and subsampled as the spec says."""
    return list(iter_examples(spec))


# ------------------------------------------------------------------------ tokenizing


def load_blocks(spec: DataSpec, tokenizer: Any, model_max_positions: int | None = None) -> TokenBlocks:
    """``load_examples`` + ``tokenize_blocks``, checking ``block_size`` before reading anything.

    Examples stream from the reader into the tokenizer, so the texts are never all held at once.
    """
    validate_block_size(spec.block_size, model_max_positions)
    builder = BlockBuilder(tokenizer, spec.block_size, None)
    for ex in iter_examples(spec):
        builder.add(ex)
    return builder.finish(sorted(builder.labels))
