"""Text examples -> fixed-length ``TokenBlocks``: the tokenizing half of ``moesurgeon.data``.

``tokenize_blocks`` tokenizes each example on its own and cuts it into ``block_size``-token blocks;
``moesurgeon.data.load_blocks`` streams a corpus through the same ``BlockBuilder``. Examples are
never concatenated, so every block has exactly one label; an example's last block is right-padded
(``attention_mask`` 0 there), and a BOS is put at the start of each example only when the
tokenizer's own default encoding starts with one (see ``_wants_bos``).

Memory: examples are tokenized in batches of about ``_BATCH_CHARS`` characters, and each batch's
ids are kept as one int32 tensor until ``BlockBuilder.finish`` copies them into the preallocated
output, so the peak is about the output plus the largest example's tokenization.

This module depends on ``data_records`` (``DataError``, ``Example``) but not on ``data``, which
re-exports every public name here; import them from ``moesurgeon.data``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .data_records import DataError, Example

__all__ = ["BlockBuilder", "TokenBlocks", "pad_token_id", "tokenize_blocks", "validate_block_size"]

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


class BlockBuilder:
    """Tokenizes examples a batch at a time and fills the block tensors once at the end.

    A batch's ids are kept as one int32 tensor plus a length per example (Python lists
    cost 8 bytes an id, or ~36 with the int objects) and are copied by ``finish`` into
    the preallocated [N, block_size] tensors, each batch freed once copied. Examples are
    never concatenated, so every block has exactly one label. Public because ``data.load_blocks``
    feeds it a stream of examples whose labels are only known at the end.
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
    builder = BlockBuilder(tokenizer, block_size, add_bos)
    for ex in examples:
        builder.add(ex)
    return builder.finish(label_names)
