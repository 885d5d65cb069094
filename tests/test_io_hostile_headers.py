"""Hostile checkpoints: index shard names, links, duplicate/orphan keys, malformed headers, verification.

Every case writes a real hostile file into tmp_path and checks both the error type and that the message
names the offending value. Hand-made shards are written with struct + json, so the header text is
exactly what the test says; `test_agrees_with_safe_open` checks each hand-made case against the real
safetensors reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from helpers_io import all_tensors, make_checkpoint, tiny_moe_tensors

from moesurgeon.io import CheckpointError, CheckpointReader, Patch, read_header, write_patched_checkpoint
from moesurgeon.io import patch_writer as writer_module
from moesurgeon.io.shard_writer import OutTensor

R0 = "model.layers.0.mlp.gate.weight"
S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
INDEX = "model.safetensors.index.json"
GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def write_raw(path: Path, header: dict | str, data: bytes = b"\0" * 8) -> Path:
    """A safetensors file with exactly this header text (a dict is dumped as is, a str written verbatim)."""
    text = header if isinstance(header, str) else json.dumps(header)
    blob = text.encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def edit_index(ckpt: Path, edit) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    edit(index["weight_map"])
    (ckpt / INDEX).write_text(json.dumps(index))


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# -- index shard names and links -------------------------------------------------------------------


def test_traversal_shard_name_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    shutil.copy(ckpt / S3, tmp_path / "x.safetensors")  # a readable file is waiting outside the checkpoint
    edit_index(ckpt, lambda wm: wm.update({"model.norm.weight": "../x.safetensors"}))
    with pytest.raises(CheckpointError, match=re.escape("'../x.safetensors'")) as exc:
        CheckpointReader(ckpt)
    msg = str(exc.value)
    assert INDEX in msg and "model.norm.weight" in msg and "model-00001-of-00002.safetensors" in msg
    assert "restore the index" in msg


def test_absolute_shard_name_refused_and_nothing_copied(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    outside = shutil.copy(ckpt / S3, tmp_path / "secret.safetensors")
    edit_index(ckpt, lambda wm: wm.update({"lm_head.weight": str(outside)}))
    for mode in ("full", "reuse"):
        with pytest.raises(CheckpointError, match=re.escape(repr(str(outside)))):
            write_patched_checkpoint(ckpt, tmp_path / "out", Patch(), mode=mode)
        assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_pickle_index_traversal_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model-00001-of-00001.bin")
    torch.save({"evil": torch.ones(2)}, tmp_path / "evil.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"w": "pytorch_model-00001-of-00001.bin", "evil": "../evil.bin"}}))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json.*'\.\./evil\.bin'"):
        CheckpointReader(d, allow_pickle=True)


def test_index_with_duplicate_weight_map_key_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    text = (ckpt / INDEX).read_text()
    dup = f'"weight_map": {{\n    "{R0}": "{S3}",'
    (ckpt / INDEX).write_text(text.replace('"weight_map": {', dup, 1))
    with pytest.raises(CheckpointError, match=re.escape(f"duplicate JSON key {R0!r}")):
        CheckpointReader(ckpt)


def test_shard_symlink_leaving_checkpoint_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    target = tmp_path / "elsewhere" / S2
    target.parent.mkdir()
    (ckpt / S2).rename(target)
    (ckpt / S2).symlink_to(target)
    with pytest.raises(CheckpointError, match="leaves the checkpoint") as exc:
        CheckpointReader(ckpt)
    assert str(ckpt / S2) in str(exc.value) and repr(str(target)) in str(exc.value)


@pytest.mark.parametrize("name", ["model.safetensors", "weights.safetensors"])
def test_single_and_loose_file_links_leaving_checkpoint_refused(tmp_path, name):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_raw(tmp_path / "outside.safetensors", {"a": GOOD})
    (ckpt / name).symlink_to("../outside.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt / name} is a symbolic link to "
                                                        "'../outside.safetensors'")):
        CheckpointReader(ckpt)


def test_dangling_shard_link_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / S1).unlink()
    (ckpt / S1).symlink_to("gone.safetensors")
    with pytest.raises(CheckpointError, match=r"'gone\.safetensors', which does not exist"):
        CheckpointReader(ckpt)


def make_hub_snapshot(tmp_path: Path) -> Path:
    """A huggingface_hub cache layout: every snapshot file is a relative link into ../../blobs/<sha256>."""
    staging = make_checkpoint(tmp_path / "staging")
    repo = tmp_path / "hub" / "models--org--tiny-moe"
    snapshot = repo / "snapshots" / ("ab" * 20)
    (repo / "blobs").mkdir(parents=True)
    for f in sorted(p for p in staging.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        link = snapshot / f.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    shutil.rmtree(staging)
    return snapshot


def test_hub_snapshot_layout_reads(tmp_path):
    snapshot = make_hub_snapshot(tmp_path)
    assert os.readlink(snapshot / S1).startswith("../../blobs/")
    with CheckpointReader(snapshot) as r:
        assert r.shard_real_path(S1).parent.name == "blobs"
        for name, t in all_tensors(tiny_moe_tensors()).items():
            assert torch.equal(r.get(name), t)


@pytest.mark.parametrize("link", ["auto", "copy"])
def test_hub_snapshot_export_has_no_symlinks_and_reloads(tmp_path, link):
    snapshot = make_hub_snapshot(tmp_path)
    out = tmp_path / "out"
    new = torch.full((4, 8), 0.5, dtype=torch.bfloat16)
    write_patched_checkpoint(snapshot, out, Patch(replace={R0: new}), link=link)
    assert [p for p in out.rglob("*") if p.is_symlink()] == []
    expected = {**all_tensors(tiny_moe_tensors()), R0: new}
    with CheckpointReader(out) as r:
        assert set(r.tensor_names()) == set(expected)
        for name, t in expected.items():
            assert torch.equal(r.get(name), t)
    for shard in (S1, S2, S3):  # and the official reader loads every file
        assert set(load_file(out / shard)) == set(tiny_moe_tensors()[shard])


# -- keys in two shards, keys in no shard ---------------------------------------------------------


def test_duplicate_key_across_shards_refused(tmp_path):
    shards = tiny_moe_tensors()
    shards[S3][R0] = torch.zeros(4, 8, dtype=torch.bfloat16)  # a stale second copy
    ckpt = make_checkpoint(tmp_path / "ckpt", shards)
    edit_index(ckpt, lambda wm: wm.update({R0: S1}))
    with pytest.raises(CheckpointError, match=re.escape(f"{R0!r} is stored in two shards, {S1!r} and {S3!r}")) \
            as exc:
        CheckpointReader(ckpt)
    assert "Remove it from one shard" in str(exc.value)


def test_orphan_key_trimmed_from_export(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    edit_index(ckpt, lambda wm: wm.pop("model.norm.weight"))
    with pytest.warns(UserWarning, match="model.norm.weight"):
        report = write_patched_checkpoint(ckpt, tmp_path / "out", Patch())
    assert report.reuse_method[S3] == "trimmed" and S3 in report.shards_written
    assert any("model.norm.weight" in note and S3 in note for note in report.notes)
    assert set(read_header(tmp_path / "out" / S3).entries) == {"lm_head.weight"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the export itself has no orphan left
        r = CheckpointReader(tmp_path / "out")
    assert "model.norm.weight" not in r
    assert torch.equal(r.get("lm_head.weight"), tiny_moe_tensors()[S3]["lm_head.weight"])


# -- header rules ---------------------------------------------------------------------------------

# case -> (header, regex the message must match: the offending value, data bytes after the header)
BAD_HEADERS = {
    "unknown_dtype": ({"a": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}, '"F128"', 8),
    "float_shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, r"\[2\.0\]", 8),
    "fractional_shape": ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, r"\[2\.5\]", 8),
    "bool_shape": ({"a": {"dtype": "BOOL", "shape": [True], "data_offsets": [0, 1]}}, r"\[true\]", 1),
    "string_shape": ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, r'\["2"\]', 8),
    "nested_shape": ({"a": {"dtype": "F32", "shape": [[2]], "data_offsets": [0, 8]}}, r"\[\[2\]\]", 8),
    "negative_zero_shape": ('{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', r"\[-0\.0\]", 0),
    "three_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, r"\[0, 8, 8\]", 8),
    "float_offset": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, r"\[0, 8\.0\]", 8),
    "begin_after_end": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, r"\[8, 0\]", 8),
    "metadata_int_value": ({"__metadata__": {"format": 1}, "a": GOOD}, r"__metadata__\['format'\] is 1", 8),
    "metadata_list": ({"__metadata__": ["pt"], "a": GOOD}, r'__metadata__ is \["pt"\]', 8),
    "duplicate_tensor_key": ('{"a": %s, "a": %s}' % (json.dumps(GOOD), json.dumps(GOOD)),
                             "duplicate JSON key 'a'", 8),
    "empty_name": ({"": GOOD}, "empty name ''", 8),
    "sub_byte_tail": ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, "12 bits", 2),
    "nan_dim": ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "NaN", 8),
    "deep_nesting": ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "RecursionError", 8),
}
# cases whose message cannot name tensor 'a' (the header is not parsed that far, or the fault is elsewhere)
NOT_ABOUT_A_TENSOR = {"duplicate_tensor_key", "empty_name", "nan_dim", "deep_nesting", "metadata_list",
                      "metadata_int_value"}
# where we refuse a header on purpose although safe_open (safetensors 0.8) reads it
STRICTER_THAN_SAFE_OPEN = {"duplicate_tensor_key", "empty_name"}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_hostile_header_refused_by_reader(tmp_path, case):
    header, offending, nbytes = BAD_HEADERS[case]
    ckpt = make_checkpoint(tmp_path / "ckpt")
    write_raw(ckpt / S3, header, b"\0" * nbytes)
    with pytest.raises(CheckpointError, match=offending) as exc:
        CheckpointReader(ckpt)
    msg = str(exc.value)
    assert S3 in msg and "re-download" in msg
    if case not in NOT_ABOUT_A_TENSOR:
        assert "tensor 'a'" in msg


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_agrees_with_safe_open(tmp_path, case):
    """Every hand-made hostile header: we refuse it, and so does the official reader (unless listed stricter)."""
    header, _, nbytes = BAD_HEADERS[case]
    path = write_raw(tmp_path / "t.safetensors", header, b"\0" * nbytes)
    with pytest.raises(CheckpointError):
        read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:
        assert case not in STRICTER_THAN_SAFE_OPEN, "safe_open now refuses it too: drop it from the list"
    else:
        assert case in STRICTER_THAN_SAFE_OPEN, "safe_open accepts a header we refuse: list it as stricter"


@pytest.mark.parametrize("header", [
    {"__metadata__": None, "a": GOOD},
    {"a": {**GOOD, "extra_field": 1}},  # unknown fields are ignored, as serde does
    {"a": {"dtype": "F8_E4M3FNUZ", "shape": [8], "data_offsets": [0, 8]}},
    {"a": {"dtype": "F4", "shape": [16], "data_offsets": [0, 8]}},
], ids=["null_metadata", "unknown_field_ignored", "fnuz_float8", "f4_sub_byte"])
def test_valid_edge_headers_accepted_like_safe_open(tmp_path, header):
    path = write_raw(tmp_path / "t.safetensors", header)
    entry = read_header(path).entries["a"]
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["a"] and entry.nbytes == 8


# -- output verification --------------------------------------------------------------------------


def test_verification_rejects_shard_safe_open_cannot_open(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    real = writer_module.write_shard

    def corrupting(path, *args, **kwargs):
        n = real(path, *args, **kwargs)
        raw = Path(path).read_bytes()
        Path(path).write_bytes(raw.replace(b'"dtype":"F32"', b'"dtype":"X32"', 1))  # same length
        return n

    monkeypatch.setattr(writer_module, "write_shard", corrupting)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"safe_open rejects model-00004-of-00004\.safetensors.*X32"):
        write_patched_checkpoint(ckpt, out, Patch(add={"x": torch.ones(4)}))
    assert not out.exists() and not leftovers(tmp_path)


def test_verification_catches_a_stale_extra_key(tmp_path, monkeypatch):
    """The plan comes from the source index, so a key the writer slipped into a shard is caught."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    real = writer_module.write_shard

    def leaking(path, tensors, metadata, **kwargs):
        stale = OutTensor("stale.weight", "F32", (1,), 4, torch.zeros(1))
        return real(path, [*tensors, stale], metadata, **kwargs)

    monkeypatch.setattr(writer_module, "write_shard", leaking)
    out = tmp_path / "out"
    dropped = "model.layers.1.mlp.experts.3.down_proj.weight"
    with pytest.raises(CheckpointError, match=rf"{S2} holds tensors the index does not point at.*stale\.weight"):
        write_patched_checkpoint(ckpt, out, Patch(drop={dropped}))
    assert not out.exists() and not leftovers(tmp_path)
