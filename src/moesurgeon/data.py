"""The ``data`` spec: load a corpus, label it, and tokenize it into fixed-length blocks.

Every experiment (router-usage profiling, top-k sweeps, router LoRA, expert masking)
consumes text the same way, so this module is the single place that turns a
user-supplied path into ``TokenBlocks``:

* ``DataSpec`` says where the text is and how to read it;
* ``load_examples`` returns ``Example(text, label)`` records;
* ``tokenize_blocks`` cuts each example into ``block_size``-token blocks;
* ``load_blocks`` does both after checking ``block_size`` against the model.

Supported sources (``format="auto"`` picks one from the path):

* ``text``  -- a ``.txt`` file or a directory of ``.txt`` files (not recursive).
  Each file is ONE example; with ``label_field="filename"`` its label is the
  file stem, so ``code.txt`` / ``math.txt`` give two labelled domains.
* ``jsonl`` -- ``.jsonl`` (one object per line) or ``.json`` (a list of objects,
  or one object per line).
* ``disk``  -- a ``datasets`` ``Dataset``/``DatasetDict`` written by ``save_to_disk``.
* ``hub``   -- a hub dataset id; only tried when nothing exists at ``path`` locally.

All input problems raise ``DataError`` (a ``ValueError``) whose message names the
offending value, what was expected, and how to fix it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DataError", "DataSpec", "Example", "TokenBlocks", "load_examples", "tokenize_blocks", "load_blocks",
           "validate_block_size", "pad_token_id"]

FORMATS = ("auto", "text", "jsonl", "disk", "hub")
_OFFLINE_FIX = (
    "pass a local path instead: a .txt file, a directory of .txt files, a .jsonl file, "
    "or a dataset written with datasets' save_to_disk()"
)
# owner/name or name, as the hub spells dataset ids; anything with a file suffix,
# a leading ./ or /, or more than one slash is a local path that is missing.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".arrow", ".parquet", ".csv")


class DataError(ValueError):
    """A problem with the data spec or the data itself, with the fix in the message."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None = None


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


def load_examples(spec: DataSpec) -> list[Example]:
    """Read ``spec.path`` into labelled examples, filtered and subsampled as the spec says."""
    fmt = _resolve_format(spec)
    path = Path(spec.path).expanduser()
    if fmt == "text":
        examples = _read_text(path, spec)
    elif fmt == "jsonl":
        examples = _read_jsonl(path, spec)
    elif fmt == "disk":
        examples = _read_dataset(_load_disk(path, spec), spec, source=str(path), split_applied=False)
    else:
        # load_dataset(split=...) already picked the split when one was named.
        examples = _read_dataset(
            _load_hub(spec), spec, source=f"hub dataset {spec.path!r}", split_applied=spec.split is not None
        )

    if not examples:
        raise DataError(f"data.path={spec.path!r} holds no examples; point data.path at a non-empty corpus")
    # Whitespace-only texts produce no tokens and would only make empty blocks.
    examples = [ex for ex in examples if ex.text.strip()]
    if not examples:
        raise DataError(
            f"every example in data.path={spec.path!r} has an empty {spec.text_field!r}; "
            "check data.text_field names the column that holds the text"
        )
    if spec.only_labels is not None:
        present = sorted({ex.label for ex in examples if ex.label is not None})
        missing = [v for v in spec.only_labels if v not in present]
        if missing:
            raise DataError(
                f"data.only_labels asks for {missing}, absent from {spec.label_field!r} in {spec.path!r}; "
                f"labels present: {present}"
            )
        wanted = set(spec.only_labels)
        examples = [ex for ex in examples if ex.label in wanted]
    if spec.max_examples is not None and len(examples) > spec.max_examples:
        # A seeded random subset (kept in file order) rather than the first N, so a
        # corpus sorted by domain does not lose whole domains.
        keep = sorted(random.Random(spec.seed).sample(range(len(examples)), spec.max_examples))
        examples = [examples[i] for i in keep]
    return examples


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


def _read_text(path: Path, spec: DataSpec) -> list[Example]:
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
    examples = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{file} is not valid UTF-8 ({err}); re-encode it as UTF-8") from err
        examples.append(Example(text, file.stem if spec.label_field == "filename" else None))
    return examples


def _read_jsonl(path: Path, spec: DataSpec) -> list[Example]:
    raw = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and raw.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(raw), start=1))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err}); expected a list of objects") from err
        where = "item"
    else:
        records = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path} line {lineno} is not valid JSON ({err}); expected one object per line"
                ) from err
        where = "line"
    for pos, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{path} {where} {pos} is a {type(rec).__name__}, expected a JSON object")
    return [_record_example(rec, spec, f"{path} {where} {pos}") for pos, rec in records]


def _record_example(rec: dict[str, Any], spec: DataSpec, where: str) -> Example:
    if spec.text_field not in rec:
        raise DataError(
            f"{where} has no text field {spec.text_field!r}; fields present: {sorted(rec)}; "
            "set data.text_field to one of them"
        )
    if spec.label_field is not None and rec.get(spec.label_field) is None:
        raise DataError(
            f"{where} has no label field {spec.label_field!r}; fields present: {sorted(rec)}; "
            "set data.label_field to one of them, or data.label_field=null for unlabelled data"
        )
    text = rec[spec.text_field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {spec.text_field!r} holds a {type(text).__name__}, expected a string")
    return Example(text or "", None if spec.label_field is None else str(rec[spec.label_field]))


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


def _read_dataset(ds: Any, spec: DataSpec, *, source: str, split_applied: bool) -> list[Example]:
    from datasets import ClassLabel, DatasetDict

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
    texts = list(ds[spec.text_field])
    for i, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            raise DataError(f"{source} row {i}: {spec.text_field!r} holds a {type(text).__name__}, expected a string")
    if spec.label_field is None:
        return [Example(t or "") for t in texts]
    feature = ds.features[spec.label_field]
    # Integer class ids are meaningless in plots; ClassLabel knows their names.
    names = feature.names if isinstance(feature, ClassLabel) else None
    labels = []
    for i, value in enumerate(ds[spec.label_field]):
        if value is None:
            raise DataError(
                f"{source} row {i} has no value for label field {spec.label_field!r}; fill or drop such rows"
            )
        labels.append(names[value] if names is not None else str(value))
    return [Example(t or "", lab) for t, lab in zip(texts, labels)]


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
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({ex.label for ex in examples if ex.label is not None and ex.label not in index})
    if unknown:
        raise DataError(f"labels {unknown} are not in label_names={label_names}; add them or filter those examples")
    if add_bos is None:
        add_bos = _wants_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    pad = pad_token_id(tokenizer)

    # verbose=False: long documents exceed model_max_length by design (we cut them).
    encoded = tokenizer([ex.text for ex in examples], add_special_tokens=False, verbose=False)["input_ids"]
    ids_rows: list[list[int]] = []
    mask_rows: list[list[int]] = []
    label_rows: list[int] = []
    for ex, ids in zip(examples, encoded):
        if not ids:
            continue
        ids = ([bos] if bos is not None else []) + list(ids)
        label = index[ex.label] if ex.label is not None else -1
        for start in range(0, len(ids), block_size):
            chunk = ids[start : start + block_size]
            n_pad = block_size - len(chunk)
            ids_rows.append(chunk + [pad] * n_pad)
            mask_rows.append([1] * len(chunk) + [0] * n_pad)
            label_rows.append(label)
    if not ids_rows:
        raise DataError(
            f"the {len(examples)} example(s) produced no tokens with this tokenizer; check the text field is not empty"
        )
    return TokenBlocks(
        input_ids=torch.tensor(ids_rows, dtype=torch.long),
        attention_mask=torch.tensor(mask_rows, dtype=torch.long),
        labels=torch.tensor(label_rows, dtype=torch.long),
        label_names=label_names,
    )


def load_blocks(spec: DataSpec, tokenizer: Any, model_max_positions: int | None = None) -> TokenBlocks:
    """``load_examples`` + ``tokenize_blocks``, checking ``block_size`` before reading anything."""
    validate_block_size(spec.block_size, model_max_positions)
    examples = load_examples(spec)
    return tokenize_blocks(examples, tokenizer, spec.block_size)
