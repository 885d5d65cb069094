"""CheckpointReader: index/single-file discovery, lazy one-shard-open reads, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from moesurgeon.io import CheckpointError, CheckpointReader, read_header
from moesurgeon.io import checkpoint_reader as reader_module
from helpers_io import all_tensors, make_checkpoint, tiny_moe_tensors


def test_reads_index_headers_and_tensors(tmp_path):
    shards = tiny_moe_tensors()
    ckpt = make_checkpoint(tmp_path / "ckpt", shards)
    with CheckpointReader(ckpt) as r:
        assert r.shards() == sorted(shards)
        assert set(r.tensor_names()) == set(all_tensors(shards))
        assert r.shard_of("model.layers.1.mlp.gate.weight") == "model-00002-of-00003.safetensors"
        info = r.header("model.layers.0.mlp.gate.weight")
        assert (info.dtype, info.shape, info.nbytes) == ("BF16", (4, 8), 64)
        assert r.header("lm_head.weight").dtype == "F32"
        for name, t in all_tensors(shards).items():
            assert torch.equal(r.get(name), t)
        got = dict(r.iter_shard("model-00003-of-00003.safetensors"))
        assert set(got) == {"model.norm.weight", "lm_head.weight"}
        with pytest.raises(CheckpointError, match="no tensor named"):
            r.header("nope")


def test_single_file_checkpoint(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.float16)}, str(d / "model.safetensors"))
    r = CheckpointReader(d)
    assert r.shards() == ["model.safetensors"]
    assert r.header("b").dtype == "F16" and r.shard_of("a") == "model.safetensors"
    assert torch.equal(r.get("a"), torch.ones(3))


def test_at_most_one_shard_open(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    live, peak = set(), [0]
    real_safe_open = reader_module.safe_open

    class CountingHandle:
        def __init__(self, path, framework):
            self.inner, self.path = real_safe_open(path, framework=framework), path

        def __enter__(self):
            live.add(id(self))
            peak[0] = max(peak[0], len(live))
            return self

        def __exit__(self, *exc):
            live.discard(id(self))

        def get_tensor(self, name):
            return self.inner.get_tensor(name)

    monkeypatch.setattr(reader_module, "safe_open", CountingHandle)
    r = CheckpointReader(ckpt)
    assert not live  # headers are parsed without safe_open
    names = r.tensor_names()
    for name in names + names[::-1]:  # alternate shards forwards and backwards
        r.get(name)
        assert len(live) == 1
    r.close()
    assert peak[0] == 1 and not live


def test_missing_shard_file(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors.*does not exist"):
        CheckpointReader(ckpt)


def test_index_names_tensor_missing_from_shard(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.gate.weight"] = "model-00001-of-00003.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.mlp\.gate\.weight.*out of sync"):
        CheckpointReader(ckpt)


def test_truncated_shard(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    shard = ckpt / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003\.safetensors.*truncated or corrupt"):
        CheckpointReader(ckpt)


@pytest.mark.parametrize("damage", ["length_beyond_file", "bad_json", "trailing_bytes", "too_short"])
def test_corrupt_header(tmp_path, damage):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    shard = ckpt / "model-00003-of-00003.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if damage == "length_beyond_file":
        raw = struct.pack("<Q", len(raw) * 2) + raw[8:]
    elif damage == "bad_json":
        raw = raw[:8] + b"#" + raw[9:]
    elif damage == "trailing_bytes":
        raw = raw + b"\0" * 4
    else:
        raw = raw[:5]
    shard.write_bytes(raw)
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors") as exc:
        CheckpointReader(ckpt)
    assert "re-download" in str(exc.value)


def test_header_offsets_are_absolute(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    header = read_header(ckpt / "model-00003-of-00003.safetensors")
    entry = header.entries["model.norm.weight"]
    raw = (ckpt / "model-00003-of-00003.safetensors").read_bytes()
    assert torch.equal(torch.frombuffer(bytearray(raw[entry.begin:entry.end]), dtype=torch.float32),
                       CheckpointReader(ckpt).get("model.norm.weight"))


def test_several_files_without_index(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", index=False)
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        CheckpointReader(ckpt)


def test_pickle_refused_unless_allowed(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        CheckpointReader(d)
    r = CheckpointReader(d, allow_pickle=True)
    assert r.format == "pickle" and r.shards() == ["pytorch_model.bin"]
    assert r.header("b").dtype == "BF16" and r.header("w").shape == (2, 3)
    assert torch.equal(r.get("w"), state["w"])


def test_no_weights_at_all(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        CheckpointReader(tmp_path)


def test_unindexed_key_in_shard_warns(tmp_path):
    shards = tiny_moe_tensors()
    ckpt = make_checkpoint(tmp_path / "ckpt", shards)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="model.norm.weight"):
        r = CheckpointReader(ckpt)
    assert "model.norm.weight" not in r and "lm_head.weight" in r
