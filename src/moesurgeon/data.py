"""The ``data`` spec: load a corpus, label it, and tokenize it into fixed-length blocks.

Every experiment (router-usage profiling, top-k sweeps, router LoRA, expert masking)
consumes text the same way, so this module is the single place that turns a
user-supplied path into ``TokenBlocks``:

* ``DataSpec`` says where the text is and how to read it;
* ``load_examples`` returns ``Example(text, label)`` records (``iter_examples`` streams them);
* ``tokenize_blocks`` cuts each example into ``block_size``-token blocks;
* ``load_blocks`` does both after checking ``block_size`` against the model.

Supported sources (``format="auto"`` picks one from the path; the readers live in
``moesurgeon.data_readers``, which also states the encoding, line and label rules):

* ``text``  -- a ``.txt`` file or a directory of ``.txt`` files (not recursive).
  Each file is ONE example; with ``label_field="filename"`` its label is the
  file stem, so ``code.txt`` / ``math.txt`` give two labelled domains.
* ``jsonl`` -- ``.jsonl`` (one object per line) or ``.json`` (a list of objects,
  or one object per line).
* ``disk``  -- a ``datasets`` ``Dataset``/``DatasetDict`` written by ``save_to_disk``.
* ``hub``   -- a hub dataset id; only tried when nothing exists at ``path`` locally.

Memory: records are read one at a time and tokenized in small batches; token ids are
kept as one int32 tensor per example until the output tensors are filled, so the peak
is about the output plus the largest example's tokenization, not a multiple of the corpus.

All input problems raise ``DataError`` (a ``ValueError``) whose message names the
offending value, what was expected, and how to fix it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .data_readers import DataError, Example, open_source

__all__ = ["DataError", "DataSpec", "Example", "TokenBlocks", "iter_examples", "load_examples", "tokenize_blocks",
           "load_blocks", "validate_block_size", "pad_token_id"]

FORMATS = ("auto", "text", "jsonl", "disk", "hub")
# Texts are tokenized in batches of about this many characters: enough for the Rust
# tokenizer to work on many short documents at once, few enough that what it builds
# per character (~200 bytes: alignments, offsets, token strings) stays small. A longer
# text is tokenized whole (cutting it could change its tokens), so it alone sets the peak.
_BATCH_CHARS = 1 << 18


@dataclass
class TokenBlocks:
    """Fixed-length token blocks, one label per block.

    ``labels`` indexes ``label_names`` (-1 = unlabelled). Padding sits at the right
    end of a block and has ``attention_mask`` 0.
    """

    input_ids: torch.Tensor  # long [N, block_size]
    attention_mask: torch.Tensor  # long [N, block_size]
    labels: torch.Tensor  # long [N]
    label_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0]
        if self.input_ids.ndim != 2 or self.attention_mask.shape != self.input_ids.shape or self.labels.shape != (n,):
            raise ValueError(
                f"TokenBlocks shapes disagree: input_ids {tuple(self.input_ids.shape)}, attention_mask "
                f"{tuple(self.attention_mask.shape)}, labels {tuple(self.labels.shape)}; expected [N, B], [N, B], [N]"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.input_ids.shape[1])

    def num_tokens(self) -> int:
        """Real (non-padding) tokens across all blocks."""
        return int(self.attention_mask.sum())

    def select(self, label: str) -> "TokenBlocks":
        """The blocks carrying ``label``; ``label_names`` is kept so label ids stay comparable."""
        if label not in self.label_names:
            raise DataError(f"label {label!r} is not one of {self.label_names}")
        keep = self.labels == self.label_names.index(label)
        return TokenBlocks(self.input_ids[keep], self.attention_mask[keep], self.labels[keep], list(self.label_names))

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``dict(input_ids, attention_mask, label_ids)``; the last batch may be smaller."""
        if batch_size <= 0:
            raise DataError(f"batch_size={batch_size!r} must be a positive integer")
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            yield {
                "input_ids": self.input_ids[idx],
                "attention_mask": self.attention_mask[idx],
                "label_ids": self.labels[idx],
            }


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


def validate_block_size(block_size: int, model_max_positions: int | None) -> None:
    """Raise ``DataError`` unless ``0 < block_size <= model_max_positions``."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise DataError(f"data.block_size={block_size!r} must be a positive integer, e.g. data.block_size=256")
    if model_max_positions is not None and block_size > model_max_positions:
        raise DataError(
            f"data.block_size={block_size} exceeds the model's maximum positions ({model_max_positions}); "
            f"set data.block_size={model_max_positions} or smaller"
        )


def pad_token_id(tokenizer: Any) -> int:
    """Id used for padding: the tokenizer's pad token, else its EOS, else 0 (masked out either way)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):  # some configs list several EOS ids
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _wants_bos(tokenizer: Any) -> bool:
    # Blocks are cut from the middle of documents, so special tokens are not added
    # in general (no EOS, no per-block BOS). The exception: tokenizers whose default
    # encoding starts with BOS (Llama-style) were trained with a BOS at document
    # start, so each *example* gets one there, as the model saw during pretraining.
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not without or without[0] != bos)



class _BlockBuilder:
    """Tokenizes examples a batch at a time and fills the block tensors once at the end.

    A batch's ids are kept as one int32 tensor plus a length per example (Python lists
    cost 8 bytes an id, or ~36 with the int objects) and are copied by ``finish`` into
    the preallocated [N, block_size] tensors, each batch freed once copied. Examples are
    never concatenated, so every block has exactly one label.
    """

    def __init__(self, tokenizer: Any, block_size: int, add_bos: bool | None) -> None:
        self.tokenizer, self.block_size = tokenizer, block_size
        if add_bos is None:
            add_bos = _wants_bos(tokenizer)
        self.bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
        self.pad = pad_token_id(tokenizer)
        self.examples = 0
        self.labels: set[str] = set()
        self._pending: list[Example] = []
        self._pending_chars = 0
        self._batches: list[tuple[torch.Tensor, list[int], list[str | None]] | None] = []

    def add(self, ex: Example) -> None:
        self.examples += 1
        if ex.label is not None:
            self.labels.add(ex.label)
        self._pending.append(ex)
        self._pending_chars += len(ex.text)
        if self._pending_chars >= _BATCH_CHARS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        # verbose=False: long documents exceed model_max_length by design (we cut them).
        encoded = self.tokenizer(
            [ex.text for ex in self._pending], add_special_tokens=False, verbose=False,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]
        parts, lengths = [], []
        for i in range(len(encoded)):
            lengths.append(len(encoded[i]))
            if lengths[-1]:
                parts.append(torch.tensor(encoded[i], dtype=torch.int32))
            encoded[i] = None  # drop each Python list once it is a tensor
        ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
        self._batches.append((ids, lengths, [ex.label for ex in self._pending]))
        self._pending, self._pending_chars = [], 0

    def finish(self, label_names: list[str]) -> TokenBlocks:
        self._flush()
        size, lead = self.block_size, int(self.bos is not None)
        # An example with no tokens gets no block (and no BOS-only block).
        rows = sum(-(-(lead + n) // size) for _, lengths, _ in self._batches for n in lengths if n)
        if not rows:
            raise DataError(
                f"the {self.examples} example(s) produced no tokens with this tokenizer; "
                "check the text field is not empty"
            )
        index = {name: i for i, name in enumerate(label_names)}
        input_ids = torch.full((rows, size), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((rows, size), dtype=torch.long)
        labels = torch.empty(rows, dtype=torch.long)
        # An example's blocks are consecutive rows, so in the flat view its tokens are one
        # run starting at its first row and the last block's padding simply follows them.
        flat_ids, flat_mask = input_ids.view(-1), attention_mask.view(-1)
        row = 0
        batches, self._batches = self._batches, []
        for b in range(len(batches)):
            ids, lengths, names = batches[b]
            batches[b] = None  # free each batch's ids once copied
            pos = 0
            for n, label in zip(lengths, names):
                if not n:
                    continue
                start, count = row * size, -(-(lead + n) // size)
                if lead:
                    flat_ids[start] = self.bos
                flat_ids[start + lead : start + lead + n] = ids[pos : pos + n]
                flat_mask[start : start + lead + n] = 1
                labels[row : row + count] = index[label] if label is not None else -1
                row, pos = row + count, pos + n
        return TokenBlocks(input_ids, attention_mask, labels, list(label_names))


def tokenize_blocks(
    examples: list[Example],
    tokenizer: Any,
    block_size: int,
    *,
    label_names: list[str] | None = None,
    add_bos: bool | None = None,
) -> TokenBlocks:
    """Tokenize each example separately and cut it into ``block_size``-token blocks.

    Examples are never concatenated, so every block has exactly one label. The last
    partial block of an example is right-padded (``attention_mask`` 0 there).
    ``add_bos=None`` prepends BOS to each example only when the tokenizer's own
    default encoding does (see ``_wants_bos``); ``True``/``False`` force it.
    """
    validate_block_size(block_size, None)
    if label_names is None:
        label_names = sorted({ex.label for ex in examples if ex.label is not None})
    else:
        label_names = list(label_names)
    known = set(label_names)
    unknown = sorted({ex.label for ex in examples if ex.label is not None and ex.label not in known})
    if unknown:
        raise DataError(f"labels {unknown} are not in label_names={label_names}; add them or filter those examples")
    builder = _BlockBuilder(tokenizer, block_size, add_bos)
    for ex in examples:
        builder.add(ex)
    return builder.finish(label_names)


def load_blocks(spec: DataSpec, tokenizer: Any, model_max_positions: int | None = None) -> TokenBlocks:
    """``load_examples`` + ``tokenize_blocks``, checking ``block_size`` before reading anything.

    Examples stream from the reader into the tokenizer, so the texts are never all held at once.
    """
    validate_block_size(spec.block_size, model_max_positions)
    builder = _BlockBuilder(tokenizer, spec.block_size, None)
    for ex in iter_examples(spec):
        builder.add(ex)
    return builder.finish(sorted(builder.labels))
