"""Exported checkpoints reload in transformers with the in-memory model's logits, for every family."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moesurgeon.arch import get_adapter
from moesurgeon.export import ExportOptions, export_patched_model
from moesurgeon.io import CheckpointError, CheckpointReader


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_router_and_topk_patch_reloads_with_equal_logits(tiny_checkpoint, family, tmp_path):
    src = tiny_checkpoint(family)
    before = tree_digest(src)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    with torch.no_grad():  # a surgery: perturb every router, change top-k
        for layer in layers:
            layer.router.weight.add_(torch.randn_like(layer.router.weight) * 0.3)
    adapter.set_top_k(model, 3)
    out = tmp_path / "patched"
    ids = torch.randint(3, 90, (2, 7))
    report = export_patched_model(model, adapter, src, out, ExportOptions(verify_reload=True),
                                  config_edits=adapter.top_k_config_edit(3), probe_input_ids=ids)
    assert report["export/verified_reload"] and report["export/max_abs_logit_diff"] <= 1e-4
    assert report["export/tensors_replaced"] == len(layers)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    # only router tensors and the top-k key differ; on-disk key format kept
    src_reader, out_reader = CheckpointReader(src), CheckpointReader(out)
    assert set(src_reader.tensor_names()) == set(out_reader.tensor_names())
    router_names = {d for l in layers for d in adapter.router_tensor_names(l).values()}
    for name in src_reader.tensor_names():
        same = torch.equal(src_reader.get(name), out_reader.get(name))
        assert same != (name in router_names and name.endswith("weight")), name
    src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (src, out))
    assert out_cfg.pop("num_experts_per_tok") == 3 and src_cfg.pop("num_experts_per_tok") == 2
    assert src_cfg == out_cfg
    assert (out / "tokenizer.json").is_file()
    assert tree_digest(src) == before, "the source checkpoint was modified"


def test_config_only_patch_writes_no_tensor(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    adapter = get_adapter(model)
    adapter.set_top_k(model, 1)
    # with the hard-link opt-in a config-only patch writes no tensor byte at all
    report = export_patched_model(model, adapter, src, tmp_path / "k1", ExportOptions(verify_reload=True, link="hardlink"),
                                  config_edits={"num_experts_per_tok": 1}, probe_input_ids=torch.randint(3, 90, (1, 5)))
    assert report["export/tensors_replaced"] == 0 and report["export/bytes_written_tensors"] == 0
    assert report["export/shards_written"] == 0
    # the default on a writable source: the reused shards are independent files, not the source's inodes
    report = export_patched_model(model, adapter, src, tmp_path / "k1b", ExportOptions(verify_reload=True),
                                  config_edits={"num_experts_per_tok": 1}, probe_input_ids=torch.randint(3, 90, (1, 5)))
    assert report["export/tensors_replaced"] == 0 and report["export/shards_written"] == 0
    for shard in src.glob("*.safetensors"):
        assert (tmp_path / "k1b" / shard.name).stat().st_ino != shard.stat().st_ino


def test_export_refuses_existing_or_nested_output_and_leaves_nothing(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    adapter = get_adapter(model)
    before = tree_digest(src)
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        export_patched_model(model, adapter, src, taken, ExportOptions())
    with pytest.raises(CheckpointError, match="inside the source"):
        export_patched_model(model, adapter, src, src / "out", ExportOptions())
    assert tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "taken"])


def test_failed_verification_leaves_no_output(tiny_checkpoint, tmp_path, monkeypatch):
    import moesurgeon.export as export_mod

    src = tiny_checkpoint("olmoe")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    monkeypatch.setattr(export_mod, "verify_reload", lambda *a, **k: 1.0)
    with pytest.raises(export_mod.ExportVerificationError, match="differ"):
        export_patched_model(model, get_adapter(model), src, tmp_path / "bad", ExportOptions(verify_reload=True),
                             probe_input_ids=torch.randint(3, 90, (1, 4)))
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_extra_patch_decides_the_router_tensors_it_names(tiny_checkpoint, tmp_path):
    """A router the extra patch drops and re-adds (a prune's or merge's rows) gets no replacement from the in-memory
    model, whose rows differ from disk: the extra patch's value is written, the other routers are replaced."""
    from moesurgeon.io import Patch

    src = tiny_checkpoint("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.router.weight.add_(1.0)
    first = adapter.router_tensor_names(layers[0])[f"{layers[0].router_name}.weight"]
    rows = torch.full_like(CheckpointReader(src).get(first), 0.125)
    extra = Patch(drop={first}, add={first: rows})
    report = export_patched_model(model, adapter, src, tmp_path / "out", ExportOptions(verify_reload=False),
                                  extra=extra)
    assert report["export/tensors_replaced"] == len(layers) - 1
    out = CheckpointReader(tmp_path / "out")
    assert torch.equal(out.get(first), rows)
    for layer in layers[1:]:
        name = adapter.router_tensor_names(layer)[f"{layer.router_name}.weight"]
        assert torch.equal(out.get(name), layer.router.weight.detach())
