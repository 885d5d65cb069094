"""Checkpoint browser: bad input (not a checkpoint, a corrupt shard, usage files of another model), the
statistics cache, and the diff track against a pruned export and a router edit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesurgeon.browse import BrowseError, BrowseSettings, build_browser
from moesurgeon.probe import UsageStats
from tiny_models import tiny_model


def qwen3(tmp_path: Path, name: str = "ckpt", shard: str = "60KB", **overrides) -> Path:
    out = tmp_path / name
    tiny_model("qwen3_moe", **overrides).save_pretrained(out, max_shard_size=shard)
    return out


def browse(ckpt: Path, out: Path, **kw) -> tuple[dict, dict]:
    kw.setdefault("cache_dir", None)
    metrics = build_browser(ckpt, out, progress=False, **kw)
    return metrics, json.loads((out / "data.json").read_text())


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrowseError, match="not a safetensors checkpoint"):
        build_browser(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BrowseError, match="not a directory"):
        build_browser(tmp_path / "file.txt", tmp_path / "out", progress=False)


def test_corrupt_shard_keeps_the_rest(tmp_path):
    ckpt = qwen3(tmp_path)
    shards = sorted(ckpt.glob("*.safetensors"))
    assert len(shards) >= 3
    victim = shards[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # an interrupted copy
    metrics, page = browse(ckpt, tmp_path / "out")
    assert metrics["browse/unreadable_shards"] == 1
    bad = [s for s in page["shards"] if not s["ok"]]
    assert [s["name"] for s in bad] == [victim.name] and "truncated or corrupt" in bad[0]["error"]
    assert any(victim.name in p for p in page["problems"])
    t = page["tensors"]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    for i, name in enumerate(t["name"]):
        if index[name] == victim.name:
            assert t["dtype"][i] is None and t["error"][i] == f"shard {victim.name} unreadable"
        else:
            assert t["norm"][i] is not None and t["error"][i] is None
    missing = sum(len(row["missing"]) for row in page["experts"]["layers"].values())
    lost = sum(1 for n, s in index.items() if s == victim.name and ".experts." in n)
    assert missing == lost > 0
    assert (tmp_path / "out" / "index.html").is_file()


def usage_file(path: Path, layer_names: list[str], experts: int) -> Path:
    stats = UsageStats.zeros(layer_names, ["code", "prose"], experts, [2] * len(layer_names))
    stats.counts[:, 0, :] = torch.arange(experts) + 1  # expert e chosen e+1 times by "code"
    stats.counts[:, 1, 0] = 10
    stats.tokens[:] = 5
    return stats.save(path)


def test_usage_overlay_and_foreign_files(tmp_path):
    ckpt = qwen3(tmp_path)
    good = usage_file(tmp_path / "usage_stats.safetensors", ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"], 8)
    _, page = browse(ckpt, tmp_path / "out", usage=[tmp_path])  # a run directory stands for its files
    tracks = {o["name"]: o for o in page["overlays"]}
    code = tracks["usage share (code)"]["layers"]["2"]
    assert code == pytest.approx([(e + 1) / 36 for e in range(8)], rel=1e-5)  # the page keeps 6 digits
    assert tracks["usage share (all)"]["layers"]["0"][0] == pytest.approx(11 / 46, rel=1e-5)
    cases = {
        "other experts": (["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"], 16, "16 experts per layer"),
        "dense layer": (["model.layers.1.mlp.gate"], 8, "MoE layers are \\[0, 2\\]"),
        "other family": (["model.layers.0.mlp.router"], 8, "another model family"),
    }
    for label, (names, experts, message) in cases.items():
        bad = usage_file(tmp_path / f"{label}.safetensors", names, experts)
        with pytest.raises(BrowseError, match=message):
            build_browser(ckpt, tmp_path / "bad", usage=[bad], progress=False)
    with pytest.raises(BrowseError, match="no such file"):
        build_browser(ckpt, tmp_path / "bad", usage=[tmp_path / "nope.safetensors"], progress=False)
    assert good.is_file()


def test_cache_is_reused_and_invalidated_by_mtime(tmp_path):
    ckpt, cache = qwen3(tmp_path), tmp_path / "cache"
    first, page1 = browse(ckpt, tmp_path / "a", cache_dir=cache)
    shards = first["browse/shards"]
    assert first["browse/shards_read"] == shards and first["browse/shards_cached"] == 0
    second, page2 = browse(ckpt, tmp_path / "b", cache_dir=cache)
    assert second["browse/shards_read"] == 0 and second["browse/shards_cached"] == shards
    for key in ("tensors", "experts", "similarity", "router"):
        assert page1[key] == page2[key]
    victim = sorted(ckpt.glob("*.safetensors"))[0]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third, page3 = browse(ckpt, tmp_path / "c", cache_dir=cache)
    assert third["browse/shards_read"] == 1 and third["browse/shards_cached"] == shards - 1
    assert page3["experts"] == page1["experts"]


def prune(src: Path, out: Path, keep: list[int]) -> Path:
    """A hand-made pruned export of a one-file tiny qwen3 checkpoint: experts renumbered, router rows kept."""
    tensors = load_file(str(src / "model.safetensors"))
    new = {}
    for name, t in tensors.items():
        if ".mlp.experts." in name:
            head, rest = name.split(".mlp.experts.")
            e, part = rest.split(".", 1)
            if int(e) in keep:
                new[f"{head}.mlp.experts.{keep.index(int(e))}.{part}"] = t
        elif name.endswith("mlp.gate.weight"):
            new[name] = t[keep].contiguous()
        else:
            new[name] = t
    out.mkdir()
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["num_experts"] = len(keep)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_diff_against_a_pruned_export_and_a_router_edit(tmp_path):
    src = qwen3(tmp_path, "src", shard="10MB")
    keep = [0, 2, 4, 6, 7]
    pruned = prune(src, tmp_path / "pruned", keep)
    metrics, page = browse(pruned, tmp_path / "out", compare_to=src)
    diff = page["diff"]
    for layer in ("0", "2"):
        d = diff["layers"][layer]
        assert d["expert_map"] == keep and d["map_source"] == "matched by identical bytes"
        assert d["expert_equal"] == [True] * 5 and d["expert_rel"] == [0.0] * 5
        assert d["router_rows"]["weight"] == [0.0] * 5
    assert "shape [5, 32] here" in diff["uncompared"]["model.layers.0.mlp.gate.weight"]
    assert metrics["browse/diff_changed"] == 0 and metrics["browse/diff_compared"] > 0
    # the map written by expert surgery wins over matching by bytes (it says expert 4 came from source expert 5)
    (tmp_path / "expert_map.json").write_text(json.dumps({"model.layers.0.mlp.gate": [0, 2, 4, 6, 5]}))
    _, page = browse(pruned, tmp_path / "out2", compare_to=src, expert_map=tmp_path / "expert_map.json")
    d = page["diff"]["layers"]["0"]
    assert d["expert_map"] == [0, 2, 4, 6, 5] and d["expert_equal"][:4] == [True] * 4
    a, b = (load_file(str(p / "model.safetensors")) for p in (pruned, src))
    parts = ("gate_proj", "up_proj", "down_proj")
    delta = sum(((a[f"model.layers.0.mlp.experts.4.{p}.weight"] - b[f"model.layers.0.mlp.experts.5.{p}.weight"])
                 .double() ** 2).sum() for p in parts)
    ref = sum((b[f"model.layers.0.mlp.experts.5.{p}.weight"].double() ** 2).sum() for p in parts)
    assert d["expert_rel"][4] == pytest.approx(float((delta / ref).sqrt()), rel=1e-5)
    (tmp_path / "expert_map.json").unlink()  # found in the parent directory it would apply to the next diff too
    # a router edit (what a router LoRA export changes): only the router rows differ
    edited = tmp_path / "edited"
    edited.mkdir()
    t = load_file(str(src / "model.safetensors"))
    row = t["model.layers.2.mlp.gate.weight"][3].clone()
    t["model.layers.2.mlp.gate.weight"][3] += 0.5 * row
    save_file(t, str(edited / "model.safetensors"), metadata={"format": "pt"})
    (edited / "config.json").write_text((src / "config.json").read_text())
    metrics, page = browse(edited, tmp_path / "out3", compare_to=src)
    rows = page["diff"]["layers"]["2"]["router_rows"]["weight"]
    assert rows[3] == pytest.approx(0.5, rel=1e-5) and rows[:3] + rows[4:] == [0.0] * 7
    assert metrics["browse/diff_changed"] == 1
    assert page["diff"]["summary"]["largest_changes"][0][0] == "model.layers.2.mlp.gate.weight"


def test_compare_to_another_family_and_other_shapes(tmp_path):
    ckpt = qwen3(tmp_path, "a", shard="10MB")
    other = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(other)
    _, page = browse(ckpt, tmp_path / "out", compare_to=other)
    diff = page["diff"]
    assert any("mixtral checkpoint" in n for n in diff["notes"])
    assert diff["other_model_type"] == "mixtral"
    assert diff["tensors"]["model.embed_tokens.weight"]["equal"] is False  # same name and shape: compared
    assert all("compare_to" in why or "shape" in why or "not in" in why for why in diff["uncompared"].values())
    wide = qwen3(tmp_path, "wide", shard="10MB", moe_intermediate_size=24)
    _, page = browse(ckpt, tmp_path / "out2", compare_to=wide)
    why = page["diff"]["uncompared"]["model.layers.0.mlp.experts.0.gate_proj.weight"]
    assert why == "shape [16, 32] here, [24, 32] in compare_to"
    assert "model.layers.0.mlp.gate.weight" in page["diff"]["tensors"]  # same shape: compared


def test_worker_count_does_not_change_the_numbers(tmp_path):
    ckpt = qwen3(tmp_path)
    _, one = browse(ckpt, tmp_path / "one", settings=BrowseSettings(workers=1, chunk_mb=1))
    _, three = browse(ckpt, tmp_path / "three", settings=BrowseSettings(workers=3, chunk_mb=1))
    for key in ("tensors", "experts", "similarity", "router"):
        assert one[key] == three[key]


def test_sigma_steps_zero_skips_singular_values(tmp_path):
    ckpt = qwen3(tmp_path)
    _, fast = browse(ckpt, tmp_path / "fast", settings=BrowseSettings(sigma_steps=0))
    _, full = browse(ckpt, tmp_path / "full")
    row, ref = fast["experts"]["layers"]["0"], full["experts"]["layers"]["0"]
    assert all(v is None for values in row["sigma1"].values() for v in values)
    assert all(v is not None for values in ref["sigma1"].values() for v in values)
    assert row["norm"] == ref["norm"] and fast["similarity"] == full["similarity"]
    with pytest.raises(BrowseError, match="browse.sigma_steps=-1"):
        build_browser(ckpt, tmp_path / "bad", settings=BrowseSettings(sigma_steps=-1), progress=False)


def test_diff_of_fused_experts_through_the_map(tmp_path):
    """gpt_oss stores experts fused ([E, ...] tensors): a pruned copy is compared slice by slice."""
    src = tmp_path / "src"
    tiny_model("gpt_oss").save_pretrained(src)
    keep = [1, 2, 5, 6]
    tensors = load_file(str(src / "model.safetensors"))
    pruned = {n: (t[keep].contiguous() if (".experts." in n or ".router." in n) and t.shape[0] == 8 else t)
              for n, t in tensors.items()}
    pruned["model.layers.2.mlp.experts.down_proj"][3] += 1.0  # expert 3 here = expert 6 there, changed
    out = tmp_path / "pruned"
    out.mkdir()
    save_file(pruned, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["num_local_experts"] = len(keep)
    (out / "config.json").write_text(json.dumps(config))
    _, page = browse(out, tmp_path / "page", compare_to=src)
    for layer in ("0", "1"):
        d = page["diff"]["layers"][layer]
        assert d["expert_map"] == keep and d["expert_equal"] == [True] * 4
    d = page["diff"]["layers"]["2"]
    assert d["expert_map"] == keep and d["expert_equal"] == [True, True, True, False]
    a, b = pruned, tensors
    parts = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    delta = sum(((a[f"model.layers.2.mlp.experts.{p}"][3] - b[f"model.layers.2.mlp.experts.{p}"][6]).double() ** 2)
                .sum() for p in parts)
    ref = sum((b[f"model.layers.2.mlp.experts.{p}"][6].double() ** 2).sum() for p in parts)
    assert d["expert_rel"][3] == pytest.approx(float((delta / ref).sqrt()), rel=1e-5)
    assert page["diff"]["summary"]["other_experts_unmatched"]["2"] == [0, 3, 4, 7]
