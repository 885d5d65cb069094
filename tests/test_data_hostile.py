"""Hostile inputs for moesurgeon.data: odd line breaks, non-UTF-8 bytes, bad labels, huge lines.

Every error case checks that the message names the file, where in it, the offending
value, and the fix. Memory is checked with tracemalloc (Python allocations only, so
the numbers are exact and do not depend on timing or on what else runs on the machine).
"""

from __future__ import annotations

import json
import math
import tracemalloc

import datasets
import pytest

from moesurgeon.data import DataError, DataSpec, Example, load_blocks, load_examples, tokenize_blocks
from helpers_data import word_tokenizer

FIX_LABEL = "every record needs a label"  # shared by every "no label" message


def _write_jsonl(path, rows, *, end: str = "\n") -> str:
    path.write_text(end.join(json.dumps(r, ensure_ascii=False) for r in rows) + end, encoding="utf-8", newline="")
    return str(path)


def _peak_bytes(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------ line breaks


def test_unicode_line_breaks_inside_json_strings_stay_in_the_text(tmp_path):
    texts = ["a\u2028b", "c\u0085d\u2029e", "f\x1cg"]  # \x1c written escaped by json.dumps, the rest raw
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t, "d": "x"} for t in texts])
    raw = (tmp_path / "d.jsonl").read_bytes()
    assert "\u2028".encode() in raw and "\u0085".encode() in raw  # really raw in the file
    assert load_examples(DataSpec(path, label_field="d")) == [Example(t, "x") for t in texts]
    crlf = _write_jsonl(tmp_path / "crlf.jsonl", [{"text": t} for t in texts], end="\r\n")
    assert [e.text for e in load_examples(DataSpec(crlf))] == texts


def test_raw_control_character_is_reported_at_its_own_line(tmp_path):
    bad = tmp_path / "ctl.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "page\x0cbreak"}\n{"text": "ok"}\n')
    with pytest.raises(DataError) as err:
        load_examples(DataSpec(str(bad)))
    msg = str(err.value)
    assert f"{bad} line 2 is not valid JSON" in msg and "U+000C" in msg and "\\u000c" in msg, msg


def test_utf8_bom_at_the_start_of_a_jsonl_file_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "x y"}\n{"text": "z"}\n')
    assert load_examples(DataSpec(str(path))) == [Example("x y"), Example("z")]


# ------------------------------------------------------------------ encodings


def test_latin1_byte_in_jsonl_names_file_line_byte_and_fix(tmp_path):
    path = tmp_path / "latin.jsonl"
    lines = ['{"text": "one"}', '{"text": "two"}', '{"text": "caf\u00e9"}']
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(DataError) as err:
        load_examples(DataSpec(str(path)))
    msg = str(err.value)
    offset = len(lines[0]) + len(lines[1]) + 2 + lines[2].index("\u00e9")
    assert f"{path} line 3 " in msg and "byte 0xe9" in msg and f"byte offset {offset} " in msg, msg
    assert "iconv -f latin1 -t utf-8 latin.jsonl" in msg, msg


def test_latin1_byte_in_txt_and_json_list_names_line_and_offset(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_bytes(b"first line\nna\xefve\n")
    with pytest.raises(DataError) as err:
        load_examples(DataSpec(str(txt)))
    msg = str(err.value)
    assert f"{txt} line 2 (byte 3 of the line)" in msg and "byte 0xef at byte offset 13 " in msg, msg
    assert "iconv -f latin1 -t utf-8 notes.txt" in msg, msg
    lst = tmp_path / "list.json"
    lst.write_bytes(b'[{"text": "a"},\n {"text": "\xe9"}]')
    with pytest.raises(DataError, match=r"list\.json line 2 .*byte 0xe9.*iconv"):
        load_examples(DataSpec(str(lst)))


# ------------------------------------------------------------------ labels


def test_null_label_names_record_field_and_fix(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "domain": "code"}, {"text": "y", "domain": None}])
    with pytest.raises(DataError) as err:
        load_examples(DataSpec(path, label_field="domain"))
    msg = str(err.value)
    assert f"{path} line 2 has label field 'domain' = null" in msg and FIX_LABEL in msg, msg
    assert "data.label_field=null" in msg, msg


def test_missing_label_gets_the_same_message_and_fix(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "domain": "code"}, {"text": "y"}])
    with pytest.raises(DataError) as err:
        load_examples(DataSpec(path, label_field="domain"))
    msg = str(err.value)
    assert f"{path} line 2 has no label field 'domain'; fields present: ['text']" in msg and FIX_LABEL in msg, msg
    assert "data.label_field=null" in msg, msg
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"text": "x", "domain": NaN}\n')  # what json.dumps writes for a pandas gap
    with pytest.raises(DataError, match=r"line 1 has label field 'domain' = NaN.*every record needs a label"):
        load_examples(DataSpec(str(nan), label_field="domain"))


def test_number_labels_become_text_and_lists_are_rejected(tmp_path):
    rows = [{"text": "a", "d": 3}, {"text": "b", "d": 2.5}, {"text": "c", "d": True}, {"text": "e", "d": "3"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    assert [e.label for e in load_examples(DataSpec(path, label_field="d"))] == ["3", "2.5", "True", "3"]
    # the conversion only_labels applies to its values, so an int in a config selects int labels
    assert [e.text for e in load_examples(DataSpec(path, label_field="d", only_labels=[3]))] == ["a", "e"]
    listed = _write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "d": ["code", "math"]}])
    with pytest.raises(DataError) as err:
        load_examples(DataSpec(listed, label_field="d"))
    msg = str(err.value)
    assert "line 1: label field 'd' holds a list (['code', 'math'])" in msg and "single label" in msg, msg


def test_dataset_null_and_classlabel_minus_one_are_missing_labels(tmp_path):
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": ["x", "y"], "d": ["code", None]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError, match=r"ds row 1 has label field 'd' = null; fields present: \['text', 'd'\]"):
        load_examples(DataSpec(str(tmp_path / "ds"), label_field="d"))
    feats = datasets.Features({"text": datasets.Value("string"), "d": datasets.ClassLabel(names=["code", "math"])})
    datasets.Dataset.from_dict({"text": ["x", "y"], "d": [1, -1]}, features=feats).save_to_disk(tmp_path / "cl")
    with pytest.raises(DataError, match=r"cl row 1 has label field 'd' = -1 \(ClassLabel's 'no label'\)"):
        load_examples(DataSpec(str(tmp_path / "cl"), label_field="d"))


# ------------------------------------------------------------------ memory


def test_20mb_line_is_read_with_bounded_memory(tmp_path):
    size = 20_000_000
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "x " * (size // 2), "d": "big"}) + "\n" + '{"text": "y", "d": "small"}\n')
    examples, peak = _peak_bytes(lambda: load_examples(DataSpec(str(path), label_field="d")))
    assert [len(e.text) for e in examples] == [size, 1] and examples[0].label == "big"
    # The text itself is 1x; reading + decoding + parsing one line may add one more copy at a time.
    assert peak < 2.5 * size, f"peak Python allocations {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB line"


def test_max_examples_reads_a_big_file_without_holding_it(tmp_path):
    line_chars, lines = 2_500_000, 8
    path = tmp_path / "many.jsonl"
    with open(path, "w") as f:
        for i in range(lines):
            f.write(json.dumps({"text": f"{i} " + "x " * (line_chars // 2)}) + "\n")
    examples, peak = _peak_bytes(lambda: load_examples(DataSpec(str(path), max_examples=1, seed=0)))
    assert len(examples) == 1
    # One line being parsed plus the kept one; the whole file (20 MB) is never in memory.
    assert peak < 4 * line_chars, f"peak {peak / 1e6:.1f} MB; one line is {line_chars / 1e6:.1f} MB"


def test_tokenizing_keeps_no_python_list_per_block(tmp_path):
    tokenizer = word_tokenizer()
    examples = [Example(" ".join(["x", "def", "lemma"] * 10_000), "code") for _ in range(6)]
    per_example = len(examples[0].text.split())
    total = per_example * len(examples)
    blocks, peak = _peak_bytes(lambda: tokenize_blocks(examples, tokenizer, 64))
    assert blocks.num_tokens() == total and len(blocks) == len(examples) * math.ceil(per_example / 64)
    # A Python list of ids costs 8 bytes a token: the whole corpus as one such list would
    # already exceed the bound; only one batch of examples is ever held as lists.
    assert peak < 8 * total, f"peak {peak / 1e6:.2f} MB for {total} tokens"
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": e.text, "d": e.label} for e in examples])
    streamed = load_blocks(DataSpec(path, label_field="d", block_size=64), tokenizer)
    assert streamed.input_ids.equal(blocks.input_ids) and streamed.label_names == ["code"]
