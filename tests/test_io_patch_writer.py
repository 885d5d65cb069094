"""write_patched_checkpoint: reuse/full modes, linking, config edits, sidecars, errors, atomicity, verification."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from helpers_io import all_tensors, make_checkpoint, tiny_moe_tensors

from moesurgeon.io import CheckpointError, CheckpointReader, Patch, write_patched_checkpoint
from moesurgeon.io import file_copy as file_copy_module
from moesurgeon.io import patch_writer as writer_module
from moesurgeon.io import shard_writer as shard_writer_module

R0, R1 = "model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"
S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """sha256, mtime_ns and size of every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture
def source(tmp_path):
    """A tiny 3-shard checkpoint; asserts after the test that no source file changed."""
    src = make_checkpoint(tmp_path / "src")
    before = snapshot(src)
    yield src
    assert snapshot(src) == before, "the source checkpoint was modified"


def new_router(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_reuse_replaces_in_affected_shard_and_links_the_rest(source, tmp_path):
    out = tmp_path / "out"
    patch = Patch(replace={R0: new_router()}, config_edits={"num_experts_per_tok": 1})
    # explicit opt-in: the default ("auto") hard-links only read-only sources (tests/test_io_files_hostile.py)
    report = write_patched_checkpoint(source, out, patch, link="hardlink")
    assert report.shards_reused == [S2, S3] and report.shards_written == [S1]
    assert report.reuse_method == {S1: "copy+patch", S2: "hardlink", S3: "hardlink"}  # ext4: no reflink
    assert os.stat(out / S2).st_ino == os.stat(source / S2).st_ino
    assert os.stat(out / S1).st_ino != os.stat(source / S1).st_ino
    assert report.bytes_changed_tensors == 64
    assert report.bytes_written_tensors == (source / S1).stat().st_size
    r = CheckpointReader(out)
    assert r.shard_of(R0) == S1 and torch.equal(r.get(R0), patch.replace[R0])
    for name, t in all_tensors(tiny_moe_tensors()).items():
        if name != R0:
            assert torch.equal(r.get(name), t)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in all_tensors(tiny_moe_tensors()).values())
    assert not leftovers(tmp_path)


def test_reflink_branch_writes_only_changed_bytes(source, tmp_path, monkeypatch):
    """Simulate a copy-on-write filesystem: the clone is free, only the router bytes are written."""
    from moesurgeon.io.file_copy import copy_range

    def fake_reflink(src_fd, dst_fd):
        copy_range(src_fd, dst_fd, 0, 0, os.fstat(src_fd).st_size)
        return True

    monkeypatch.setattr(shard_writer_module, "try_reflink", fake_reflink)
    monkeypatch.setattr(file_copy_module, "try_reflink", fake_reflink)  # untouched shards are reflinked too
    patch = Patch(replace={R0: new_router(), R1: new_router(2)})
    report = write_patched_checkpoint(source, tmp_path / "out", patch)
    assert report.reuse_method[S1] == report.reuse_method[S2] == "reflink+patch"
    assert report.bytes_written_tensors == report.bytes_changed_tensors == 128
    assert report.write_amplification == 1.0
    r = CheckpointReader(tmp_path / "out")
    assert torch.equal(r.get(R1), patch.replace[R1])


def series(n: int) -> list[str]:
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def test_added_tensors_extend_one_shard_series(source, tmp_path):
    """Reused shards and new ones form one HF series: 3 source shards + 2 new = model-0000i-of-00005."""
    add = {f"extra.{i}.weight": torch.full((100,), float(i)) for i in range(3)}  # 400 bytes each
    out = tmp_path / "out"
    report = write_patched_checkpoint(source, out, Patch(add=add), max_shard_size=900, link="hardlink")
    names = series(5)
    assert report.shards_written == names[3:] and report.shards_reused == names[:3]
    assert sorted(p.name for p in out.glob("*.safetensors")) == names
    # reused shards are the source files (hard-linked here) under their new series names
    for old, new in zip([S1, S2, S3], names[:3]):
        assert os.stat(out / new).st_ino == os.stat(source / old).st_ino
    r = CheckpointReader(out)
    assert [r.shard_of(f"extra.{i}.weight") for i in range(3)] == [names[3], names[3], names[4]]
    assert r.shard_of(R1) == names[1] and set(json.loads((out / "model.safetensors.index.json").read_text())
                                              ["weight_map"].values()) == set(names)
    assert torch.equal(r.get("extra.2.weight"), add["extra.2.weight"]) and r.header("extra.0.weight").dtype == "F32"
    assert any("named as one series" in n for n in report.notes)


def test_fully_dropped_shard_leaves_no_gap_in_the_series(source, tmp_path):
    """Dropping every tensor of the middle shard gives model-00001/00002-of-00002, not a hole at 2 of 3."""
    drop = set(tiny_moe_tensors()[S2])
    report = write_patched_checkpoint(source, tmp_path / "out", Patch(drop=drop))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == series(2)
    r = CheckpointReader(tmp_path / "out")
    assert r.shard_of("lm_head.weight") == series(2)[1] and not any(n in r for n in drop)
    assert any(f"{S2}: every tensor dropped" in n for n in report.notes)


def test_drop_trims_the_shard(source, tmp_path):
    dropped = "model.layers.1.mlp.experts.3.down_proj.weight"
    patch = Patch(replace={R1: new_router()}, drop={dropped})
    report = write_patched_checkpoint(source, tmp_path / "out", patch)
    assert report.reuse_method[S2] == "trimmed"
    r = CheckpointReader(tmp_path / "out")
    assert dropped not in r and dropped not in r.shard_header(S2).entries
    assert torch.equal(r.get(R1), patch.replace[R1])
    assert torch.equal(r.get("model.layers.1.mlp.experts.2.down_proj.weight"),
                       tiny_moe_tensors()[S2]["model.layers.1.mlp.experts.2.down_proj.weight"])


def test_full_mode_rewrites_with_hf_names(source, tmp_path):
    patch = Patch(replace={R1: new_router()}, add={"extra.bias": torch.ones(3, dtype=torch.float16)})
    report = write_patched_checkpoint(source, tmp_path / "out", patch, mode="full", max_shard_size="400B")
    n = len(report.shards_written)
    assert n > 3 and report.shards_written[0] == f"model-00001-of-{n:05d}.safetensors"
    assert not report.shards_reused
    r = CheckpointReader(tmp_path / "out")
    expected = {**all_tensors(tiny_moe_tensors()), R1: patch.replace[R1], "extra.bias": torch.ones(3).half()}
    assert set(r.tensor_names()) == set(expected)
    for name, t in expected.items():
        assert torch.equal(r.get(name), t) and r.get(name).dtype == t.dtype


@pytest.mark.parametrize("link", ["copy", "hardlink"])
def test_link_option(source, tmp_path, link):
    report = write_patched_checkpoint(source, tmp_path / "out", Patch(replace={R0: new_router()}), link=link)
    same_inode = os.stat(tmp_path / "out" / S3).st_ino == os.stat(source / S3).st_ino
    assert same_inode == (link == "hardlink")
    assert report.reuse_method[S3] in ({"hardlink"} if link == "hardlink" else {"copy", "reflink"})


def test_config_edits_merge_and_keep_other_keys(source, tmp_path):
    edits = {"num_experts_per_tok": 1, "rope_scaling": {"factor": 8.0}, "new_key": [1, 2]}
    write_patched_checkpoint(source, tmp_path / "out", Patch(config_edits=edits))
    before = json.loads((source / "config.json").read_text())
    after = json.loads((tmp_path / "out" / "config.json").read_text())
    assert list(after) == list(before) + ["new_key"]
    assert after["num_experts_per_tok"] == 1 and after["rope_scaling"] == {"type": "yarn", "factor": 8.0}
    assert {k: v for k, v in after.items() if k not in edits} == {k: v for k, v in before.items() if k not in edits}


def test_sidecars_copied_and_stale_weights_skipped(source, tmp_path):
    out = tmp_path / "out"
    report = write_patched_checkpoint(source, out, Patch())  # no edits: config copied byte for byte
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert sorted(report.files_copied) == ["extra/notes.txt", "tokenizer.json"]
    assert (out / "extra" / "notes.txt").read_text() == "sidecar in a subdirectory\n"
    assert os.stat(out / "tokenizer.json").st_ino != os.stat(source / "tokenizer.json").st_ino  # a real copy


def test_stale_pickle_weights_next_to_safetensors_are_skipped(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    torch.save({"x": torch.ones(1)}, src / "pytorch_model.bin")
    report = write_patched_checkpoint(src, tmp_path / "out", Patch())
    assert report.files_skipped == ["pytorch_model.bin"] and not (tmp_path / "out" / "pytorch_model.bin").exists()


@pytest.mark.parametrize("bad, match", [
    (Patch(replace={R0: new_router().float()}), r"model\.layers\.0\.mlp\.gate\.weight.*F32 \[4, 8\].*BF16 \[4, 8\]"),
    (Patch(replace={R0: torch.zeros(5, 8, dtype=torch.bfloat16)}), r"BF16 \[5, 8\].*stores BF16 \[4, 8\]"),
    (Patch(replace={"model.layers.7.mlp.gate.weight": new_router()}), "cannot replace.*no such tensor"),
    (Patch(drop={"nope.weight"}), "cannot drop 'nope.weight'"),
    (Patch(add={R0: new_router()}), "already has it"),
    (Patch(replace={R0: new_router()}, drop={R0}), "both replaced and dropped"),
])
def test_patch_errors(source, tmp_path, bad, match):
    with pytest.raises(CheckpointError, match=match):
        write_patched_checkpoint(source, tmp_path / "out", bad)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_out_dir_exists_refused_or_overwritten(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        write_patched_checkpoint(source, out, Patch())
    assert (out / "old.txt").exists()
    write_patched_checkpoint(source, out, Patch(), overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").exists()
    assert not leftovers(tmp_path)


def test_nested_out_dir_refused(source, tmp_path):
    for out in (source, source / "patched"):
        with pytest.raises(CheckpointError, match="inside the source"):
            write_patched_checkpoint(source, out, Patch())
    with pytest.raises(CheckpointError, match="would delete it"):
        write_patched_checkpoint(source, tmp_path, Patch(), overwrite=True)


def test_failure_midway_leaves_nothing(source, tmp_path, monkeypatch):
    calls = []
    real = writer_module.link_or_copy

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "link_or_copy", flaky)
    with pytest.raises(OSError, match="simulated"):
        write_patched_checkpoint(source, tmp_path / "out", Patch(replace={R0: new_router()}))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_failed_overwrite_keeps_previous_output(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_patched_checkpoint(source, out, Patch())
    before = snapshot(out)
    monkeypatch.setattr(writer_module, "write_index", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        write_patched_checkpoint(source, out, Patch(), overwrite=True)
    assert snapshot(out) == before and not leftovers(tmp_path)


def test_verification_catches_corrupted_shard(source, tmp_path, monkeypatch):
    real = writer_module.clone_with_overwrites

    def corrupting(src, dst, overwrites, **kwargs):
        result = real(src, dst, overwrites, **kwargs)
        with open(dst, "r+b") as f:  # flip one byte of the freshly written router
            f.seek(overwrites[0][0])
            byte = f.read(1)
            f.seek(overwrites[0][0])
            f.write(bytes([byte[0] ^ 0xFF]))
        return result

    monkeypatch.setattr(writer_module, "clone_with_overwrites", corrupting)
    with pytest.raises(CheckpointError, match=r"verification.*model\.layers\.0\.mlp\.gate\.weight"):
        write_patched_checkpoint(source, tmp_path / "out", Patch(replace={R0: new_router()}))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_verification_catches_truncated_new_shard(source, tmp_path, monkeypatch):
    real = writer_module.write_shard

    def truncating(path, *args, **kwargs):
        n = real(path, *args, **kwargs)
        os.truncate(path, n - 2)
        return n

    monkeypatch.setattr(writer_module, "write_shard", truncating)
    with pytest.raises(CheckpointError, match="model-00004-of-00004.safetensors"):
        write_patched_checkpoint(source, tmp_path / "out", Patch(add={"x": torch.ones(4)}))
    assert not (tmp_path / "out").exists()


def test_single_file_source_gets_an_index(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "single"
    src.mkdir()
    save_file({"a": torch.ones(3), "b": torch.zeros(2)}, str(src / "model.safetensors"))
    write_patched_checkpoint(src, tmp_path / "out", Patch(replace={"a": torch.full((3,), 2.0)}))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    only = "model-00001-of-00001.safetensors"  # the same series naming as every other export
    assert index == {"metadata": {"total_size": 20}, "weight_map": {"a": only, "b": only}}
    assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == [only]
    assert torch.equal(CheckpointReader(tmp_path / "out").get("a"), torch.full((3,), 2.0))


def test_pickle_source_refused_or_converted(tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    torch.save({"w": torch.ones(2, 2), "r": torch.zeros(3, dtype=torch.bfloat16)}, src / "pytorch_model.bin")
    (src / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        write_patched_checkpoint(src, tmp_path / "out", Patch())
    patch = Patch(replace={"r": torch.ones(3, dtype=torch.bfloat16)})
    report = write_patched_checkpoint(src, tmp_path / "out", patch, allow_pickle=True)
    assert report.mode == "full" and report.shards_written == ["model-00001-of-00001.safetensors"]
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    r = CheckpointReader(tmp_path / "out")
    assert torch.equal(r.get("r"), patch.replace["r"]) and torch.equal(r.get("w"), torch.ones(2, 2))


def test_patched_qwen3_moe_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    src = tmp_path / "qwen"
    model.save_pretrained(src, max_shard_size="20KB")
    assert len(list(src.glob("*.safetensors"))) > 2
    routers = {f"model.layers.{i}.mlp.gate.weight": torch.randn(4, 32) for i in range(2)}
    report = write_patched_checkpoint(src, tmp_path / "out", Patch(replace=routers,
                                                                   config_edits={"num_experts_per_tok": 3}))
    assert report.shards_reused, "untouched shards should be reused"
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate.weight.copy_(routers[f"model.layers.{i}.mlp.gate.weight"])
            layer.mlp.gate.top_k = 3  # config edits after init change nothing in memory
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_experts_per_tok == 3 and loaded.model.layers[0].mlp.gate.top_k == 3
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_patch_of_a_patch_stays_one_series(source, tmp_path):
    write_patched_checkpoint(source, tmp_path / "p1", Patch(add={"x": torch.ones(2)}))
    report = write_patched_checkpoint(tmp_path / "p1", tmp_path / "p2", Patch(add={"y": torch.zeros(2)}))
    assert report.shards_written == ["model-00005-of-00005.safetensors"]
    assert sorted(p.name for p in (tmp_path / "p2").glob("*.safetensors")) == series(5)
    r = CheckpointReader(tmp_path / "p2")
    assert r.shard_of("x") == "model-00004-of-00005.safetensors" and torch.equal(r.get("y"), torch.zeros(2))
    assert torch.equal(r.get("x"), torch.ones(2)) and torch.equal(r.get(R0), tiny_moe_tensors()[S1][R0])


def test_parse_size():
    from moesurgeon.io import parse_size

    assert parse_size(1234) == 1234 and parse_size("500MB") == 500 * 10**6 and parse_size("5GB") == 5 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("20KB") == 20_000
    for bad in ("5XB", "-1", 0, "GB"):
        with pytest.raises(CheckpointError, match="max_shard_size"):
            parse_size(bad)


def test_output_directory_has_ordinary_permissions(tmp_path):
    """mkdtemp's private 0700 must not leak into the published directory (other users serve it)."""
    import os
    import stat

    from moesurgeon.io.atomic_dir import atomic_output_dir

    out = tmp_path / "published"
    with atomic_output_dir(out, overwrite=False, fsync=False) as tmp:
        (tmp / "f").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_single_file_source_with_added_tensors_loads_every_tensor(tmp_path):
    """transformers reads model.safetensors before any index: beside new shards it must be renamed (into the
    series, like every export)."""
    import torch
    from safetensors.torch import save_file

    from moesurgeon.io import CheckpointReader, Patch, write_patched_checkpoint

    src = tmp_path / "single"
    src.mkdir()
    save_file({"a": torch.ones(3), "b": torch.zeros(2)}, str(src / "model.safetensors"))
    out = tmp_path / "out"
    write_patched_checkpoint(src, out, Patch(add={"c": torch.full((4,), 2.0)}))
    assert not (out / "model.safetensors").exists()
    reader = CheckpointReader(out)
    assert sorted(reader.tensor_names()) == ["a", "b", "c"]
    assert torch.equal(reader.get("c"), torch.full((4,), 2.0)) and torch.equal(reader.get("a"), torch.ones(3))
    assert sorted(p.name for p in out.glob("*.safetensors")) == series(2)
    assert reader.shard_of("a") == series(2)[0] and reader.shard_of("c") == series(2)[1]
