"""A word-level tokenizer built in memory for the ``moesurgeon.data`` tests.

One token per whitespace word, so expected block counts can be computed by hand; token ids are
``SPECIALS`` first, then ``WORDS``. Nothing is downloaded.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIALS", "WORDS", "word_tokenizer"]

WORDS = "def return import class x y sum proof lemma theorem integral hello world the a".split()
SPECIALS = ["<pad>", "</s>", "<s>", "[UNK]"]


def word_tokenizer(*, pad: bool = True, eos: bool = True, bos_template: bool = False) -> PreTrainedTokenizerFast:
    """One token per whitespace word of ``WORDS`` (ids after ``SPECIALS``); the flags choose pad/eos/BOS."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"unk_token": "[UNK]"}
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
        kwargs["bos_token"] = "<s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    if eos:
        kwargs["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
