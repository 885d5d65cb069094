"""Byte-level BPE tokenizer for the reference MoE.

* GPT-2 style byte-level BPE trained with ``tokenizers`` (default 4096 entries
  including the special tokens); every digit is its own pre-token, so numbers
  are always split one digit per token.
* ``<|endoftext|>`` is the eos token (also used as document separator),
  ``<|pad|>`` the pad token; no bos is prepended.
* Role tags ``<|role=code|>``, ``<|role=english|>``, ``<|role=russian|>``,
  ``<|role=math|>`` are reserved as special tokens (one id each) for a
  role-aware router feature; they never occur in the training text.
* Trained on :func:`tokenizer_texts`: an evenly strided sample of each domain's train split.
* Saved as a standard ``PreTrainedTokenizerFast`` directory
  (``tokenizer.json`` + ``tokenizer_config.json``), loadable with
  ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from . import DOMAINS
from .documents import Corpus

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS: dict[str, str] = {d: f"<|role={d}|>" for d in DOMAINS}
SPECIAL_TOKENS: list[str] = [EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS.values()]


def tokenizer_texts(corpus: Corpus, chars_per_domain: int) -> list[str]:
    """Train texts for BPE, capped per domain so no single domain dominates the merges."""
    out: list[str] = []
    for dom in DOMAINS:
        docs = corpus.domain_docs("train", dom)
        size = sum(len(d.text) for d in docs)
        stride = max(1, math.ceil(size / max(1, chars_per_domain)))  # spread over the whole domain
        out += [d.text for d in docs[::stride]]
    return out


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``texts`` (deterministic for a fixed input order)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok, model_max_length=model_max_length)


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
    make_config_portable(Path(out_dir) / "tokenizer_config.json")


def make_config_portable(config_path: Path) -> None:
    """Rewrite transformers-5-only keys of tokenizer_config.json in the form older runtimes read.

    transformers 5 writes `extra_special_tokens` as a list and a `backend` key; transformers 4.x
    expects a dict there and fails on load (experiments/compat). `additional_special_tokens` is
    read by both versions; the tokens themselves live in tokenizer.json either way.
    """
    config = json.loads(config_path.read_text())
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif extra is not None:
        config["extra_special_tokens"] = extra
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[int]:
    """Concatenate ``texts`` into one id stream, each document followed by eos."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    backend = tokenizer.backend_tokenizer
    for enc in backend.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return ids
