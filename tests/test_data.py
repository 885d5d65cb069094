"""Tests for moesurgeon.data: every source format, the block invariants, and each DataError.

The tokenizer is a word-level one built in memory (one token per whitespace word),
so expected block counts can be computed by hand and nothing is downloaded.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from moesurgeon.data import (
    DataError,
    DataSpec,
    Example,
    TokenBlocks,
    load_blocks,
    load_examples,
    pad_token_id,
    tokenize_blocks,
)
from helpers_data import SPECIALS, WORDS, word_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _words(n: int, word: str = "x") -> str:
    return " ".join([word] * n)


def _jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


# ------------------------------------------------------------------- sources


def test_txt_directory_one_example_per_file_labelled_by_stem(tmp_path):
    (tmp_path / "code.txt").write_text("def x return y")
    (tmp_path / "math.txt").write_text("lemma proof")
    (tmp_path / "notes.md").write_text("ignored")
    examples = load_examples(DataSpec(str(tmp_path), label_field="filename"))
    assert examples == [Example("def x return y", "code"), Example("lemma proof", "math")]
    unlabelled = load_examples(DataSpec(str(tmp_path / "code.txt")))
    assert unlabelled == [Example("def x return y", None)]


def test_jsonl_and_json_list(tmp_path):
    rows = [{"text": "def x", "domain": "code"}, {"text": "lemma", "domain": "math"}]
    assert [e.label for e in load_examples(DataSpec(_jsonl(tmp_path / "d.jsonl", rows), label_field="domain"))] == [
        "code",
        "math",
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_examples(DataSpec(str(tmp_path / "d.json"))) == [Example("def x"), Example("lemma")]


def test_disk_dataset_and_datasetdict_split(tmp_path):
    ds = datasets.Dataset.from_dict({"body": ["def x", "lemma proof"], "domain": ["code", "math"]})
    ds.save_to_disk(tmp_path / "ds")
    got = load_examples(DataSpec(str(tmp_path / "ds"), text_field="body", label_field="domain"))
    assert got == [Example("def x", "code"), Example("lemma proof", "math")]

    held = datasets.Dataset.from_dict({"body": ["hello world"], "domain": ["chat"]})
    datasets.DatasetDict({"train": ds, "heldout": held}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"split='train' was given but .* without splits; set the split to null"):
        load_examples(DataSpec(str(tmp_path / "ds"), text_field="body", split="train"))
    spec = DataSpec(str(tmp_path / "dd"), text_field="body", label_field="domain", split="heldout")
    assert load_examples(spec) == [Example("hello world", "chat")]
    with pytest.raises(DataError, match=r"splits \['train', 'heldout'\].*data.heldout.split=train"):
        load_examples(DataSpec(str(tmp_path / "dd"), text_field="body"))
    with pytest.raises(DataError, match=r"split='nope' is not a split.*splits present"):
        load_examples(DataSpec(str(tmp_path / "dd"), text_field="body", split="nope"))


def test_classlabel_ids_become_names(tmp_path):
    feats = datasets.Features({"text": datasets.Value("string"), "domain": datasets.ClassLabel(names=["code", "math"])})
    ds = datasets.Dataset.from_dict({"text": ["def", "lemma"], "domain": [1, 0]}, features=feats)
    ds.save_to_disk(tmp_path / "c")
    assert [e.label for e in load_examples(DataSpec(str(tmp_path / "c"), label_field="domain"))] == ["math", "code"]


def test_only_labels_and_max_examples(tmp_path):
    rows = [{"text": f"x {i}", "d": "code" if i % 2 else "math"} for i in range(20)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    code = load_examples(DataSpec(path, label_field="d", only_labels=["code"]))
    assert len(code) == 10 and {e.label for e in code} == {"code"}
    a = load_examples(DataSpec(path, max_examples=5, seed=3))
    b = load_examples(DataSpec(path, max_examples=5, seed=3))
    assert a == b and len(a) == 5
    order = [int(e.text.split()[1]) for e in a]
    assert order == sorted(order)  # a random subset, kept in file order
    assert load_examples(DataSpec(path, max_examples=5, seed=4)) != a


def test_empty_texts_are_dropped(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "x"}, {"text": "   "}, {"text": None}])
    assert load_examples(DataSpec(path)) == [Example("x")]


# ------------------------------------------------------------------- blocks


def test_blocks_padding_and_labels_invariants(tokenizer):
    examples = [Example(_words(10, "def"), "code"), Example(_words(3, "lemma"), "math"), Example(_words(4), None)]
    blocks = tokenize_blocks(examples, tokenizer, 4)
    # 10 tokens -> 4+4+2, 3 -> 3, 4 -> 4: never concatenated across examples.
    assert len(blocks) == 5 and blocks.block_size == 4
    assert blocks.label_names == ["code", "math"]
    assert blocks.labels.tolist() == [0, 0, 0, 1, -1]
    assert blocks.attention_mask.sum(1).tolist() == [4, 4, 2, 3, 4]
    assert blocks.num_tokens() == 17
    pad = tokenizer.pad_token_id
    assert blocks.input_ids[2].tolist()[2:] == [pad, pad]
    # padding is always on the right: mask is 1...1 0...0
    for row in blocks.attention_mask.tolist():
        assert row == sorted(row, reverse=True)
    assert blocks.input_ids.dtype == blocks.attention_mask.dtype == blocks.labels.dtype == torch.long
    # no special tokens were added
    assert not torch.isin(blocks.input_ids[blocks.attention_mask.bool()], torch.tensor([1, 2])).any()


def test_select_batches_and_given_label_names(tokenizer):
    examples = [Example(_words(5, "def"), "code"), Example(_words(2, "lemma"), "math")]
    blocks = tokenize_blocks(examples, tokenizer, 2, label_names=["math", "code", "chat"])
    assert blocks.label_names == ["math", "code", "chat"]
    code = blocks.select("code")
    assert len(code) == 3 and code.labels.tolist() == [1, 1, 1] and code.label_names == blocks.label_names
    assert len(blocks.select("chat")) == 0
    with pytest.raises(DataError, match="'law' is not one of"):
        blocks.select("law")
    batches = list(blocks.batches(3))
    assert [len(b["input_ids"]) for b in batches] == [3, 1]
    assert set(batches[0]) == {"input_ids", "attention_mask", "label_ids"}
    shuffled = torch.cat([b["label_ids"] for b in blocks.batches(2, shuffle=True, seed=1)])
    assert sorted(shuffled.tolist()) == sorted(blocks.labels.tolist())
    with pytest.raises(DataError, match=r"labels \['law'\] are not in label_names"):
        tokenize_blocks([Example("x", "law")], tokenizer, 2, label_names=["code"])


def test_pad_id_fallbacks():
    assert pad_token_id(word_tokenizer()) == 0  # <pad>
    assert pad_token_id(word_tokenizer(pad=False)) == 1  # </s>
    assert pad_token_id(word_tokenizer(pad=False, eos=False)) == 0
    blocks = tokenize_blocks([Example("x")], word_tokenizer(pad=False), 3)
    x_id = len(SPECIALS) + WORDS.index("x")
    assert blocks.input_ids[0].tolist() == [x_id, 1, 1]  # padded with </s>, masked out


def test_bos_only_when_the_tokenizer_adds_it(tokenizer):
    bos_tok = word_tokenizer(bos_template=True)
    blocks = tokenize_blocks([Example(_words(3))], bos_tok, 2)
    assert blocks.input_ids[0, 0].item() == bos_tok.bos_token_id  # once, at the example start
    assert blocks.attention_mask.sum().item() == 4
    assert tokenize_blocks([Example(_words(3))], bos_tok, 2, add_bos=False).num_tokens() == 3
    assert tokenize_blocks([Example(_words(3))], tokenizer, 2).num_tokens() == 3


def test_load_blocks_end_to_end(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": _words(7), "d": "code"}, {"text": _words(2), "d": "math"}])
    blocks = load_blocks(DataSpec(path, label_field="d", block_size=4), tokenizer, model_max_positions=16)
    assert isinstance(blocks, TokenBlocks) and len(blocks) == 3 and blocks.labels.tolist() == [0, 0, 1]


# ------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"data.path='.*nope\.jsonl' does not exist"):
        load_examples(DataSpec(str(tmp_path / "nope.jsonl")))


def test_hub_id_offline_gives_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    # Never touch the network in tests: the loader is replaced by an offline failure.
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'someone/corpus'.*hub dataset id.*ConnectionError.*save_to_disk"):
        load_examples(DataSpec("someone/corpus"))


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        load_examples(DataSpec(str(empty)))
    blank = _jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  \n"}])
    with pytest.raises(DataError, match="empty 'text'"):
        load_examples(DataSpec(blank))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="contains no .txt files"):
        load_examples(DataSpec(str(tmp_path / "dir")))


def test_missing_text_and_label_fields(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"content": "x", "domain": "code"}])
    with pytest.raises(DataError, match=r"no text field 'text'; fields present: \['content', 'domain'\]"):
        load_examples(DataSpec(path))
    with pytest.raises(DataError, match=r"no label field 'role'; fields present: \['content', 'domain'\]"):
        load_examples(DataSpec(path, text_field="content", label_field="role"))
    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError, match=r"no text field 'text'; fields present: \['content'\]"):
        load_examples(DataSpec(str(tmp_path / "ds")))
    with pytest.raises(DataError, match=r"no label field 'domain'"):
        load_examples(DataSpec(str(tmp_path / "ds"), text_field="content", label_field="domain"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="label_field=filename"):
        load_examples(DataSpec(str(tmp_path / "a.txt"), label_field="domain"))


def test_only_labels_unknown_lists_present(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "x", "d": "code"}, {"text": "y", "d": "math"}])
    with pytest.raises(DataError, match=r"\['law'\].*labels present: \['code', 'math'\]"):
        load_examples(DataSpec(path, label_field="d", only_labels=["law"]))
    with pytest.raises(DataError, match="data.label_field is null"):
        DataSpec(path, only_labels=["code"])


def test_block_size_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data.block_size=0 must be a positive integer"):
        DataSpec("x.txt", block_size=0)
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"data.block_size=64 exceeds .*\(32\); set data.block_size=32"):
        load_blocks(DataSpec(path, block_size=64), tokenizer, model_max_positions=32)
    with pytest.raises(DataError, match="must be a positive integer"):
        tokenize_blocks([Example("x")], tokenizer, -1)


def test_bad_format_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="data.format='csv' is not one of"):
        DataSpec("x", format="csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_examples(DataSpec(str(bad)))
