"""experiment=expert_transplant on tiny checkpoints: the donor's bytes for exactly the chosen experts, checks first."""

import json
import shutil

import pytest
import torch

from moesurgeon.arch import get_adapter
from moesurgeon.io import CheckpointReader
from moesurgeon.runner import run_experiment
from helpers_hydra import compose_cfg
from tiny_models import tiny_model, write_tiny_jsonl


def overrides(tmp_path, ckpt, *extra):
    data = write_tiny_jsonl(tmp_path / "data.jsonl", repeat=1)
    return ["experiment=expert_transplant", f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}",
            "data.label_field=domain", "data.block_size=32", "data.batch_size=8", "progress=false", "threads=1",
            *extra]


def make_donor(tmp_path, family: str, name: str = "donor", **config) -> str:
    """The target's model with EVERY weight perturbed (so a tensor copied by mistake shows), saved with other
    shard boundaries than the target."""
    model = tiny_model(family, **config)
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and "rotary" not in n:
                t.add_(0.3 * torch.randn_like(t))
    out = tmp_path / name
    model.save_pretrained(out, max_shard_size="60KB")
    return str(out)


def tensors(path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return {n: r.get(n) for n in r.tensor_names()}


CASES = [  # family, experts (every MoE layer, or per layer), routers
    ("qwen3_moe", [1, 6], False),
    ("qwen2_moe", [0, 3], True),
    ("mixtral", [2, 5], True),                       # block_sparse_moe on disk
    ("olmoe", {0: [7], 2: [1, 4]}, False),
    ("deepseek_v3", {2: [0, 7]}, True),              # weight rows and the choice-only correction bias
    ("gpt_oss", [1, 3], True),                       # fused on disk: dim-0 rows; router weight and logit bias
    ("gpt_oss", [4], False),
]


@pytest.mark.parametrize("family,experts,routers", CASES)
def test_transplant_writes_donor_bytes_for_exactly_the_chosen_experts(tiny_checkpoint, tmp_path, family, experts,
                                                                      routers):
    ckpt = tiny_checkpoint(family)
    donor = make_donor(tmp_path, family)
    out = tmp_path / "run"
    metrics = run_experiment(compose_cfg(overrides(tmp_path, ckpt, f"expert_transplant.donor={donor}",
                                                   f"expert_transplant.experts={experts}".replace(" ", ""),
                                                   f"expert_transplant.routers={str(routers).lower()}")), out)
    assert metrics["success"] and metrics["export/done"] and metrics["export/verified_reload"]
    assert metrics["export/max_abs_logit_diff"] < 1e-5
    assert metrics["transplant/max_abs_logit_diff_vs_target"] > 1e-3  # the donor's experts do change the model
    adapter = get_adapter(json.loads((ckpt / "config.json").read_text()))
    chosen = experts if isinstance(experts, dict) else \
        {i: experts for i in adapter.moe_layer_indices(json.loads((ckpt / "config.json").read_text()))}
    assert {int(k): v for k, v in metrics["experts"].items()} == chosen

    target, theirs, export = tensors(ckpt), tensors(donor), tensors(out / "checkpoint")
    assert set(export) == set(target)
    from_donor = 0
    for name, got in export.items():
        layer = next((i for i in chosen if name.startswith(f"{adapter.disk_block_prefix(i)}.")), None)
        rows = None  # which dim-0 rows come from the donor: None = none, "all" = the whole tensor
        if layer is not None:
            parsed = adapter.split_expert_name(name, layer)
            if parsed is not None:
                rows = "all" if parsed[0] in chosen[layer] else None
            elif name.startswith(adapter.expert_disk_prefix(layer)) and got.shape[0] == 8:
                rows = chosen[layer]  # a fused expert tensor
            elif routers and name.startswith(adapter.router_disk_prefix(layer)) and got.shape[0] == 8:
                rows = chosen[layer]  # router weight rows, per-expert router biases
        if rows is None:
            assert torch.equal(got, target[name]), name
        elif rows == "all":
            assert torch.equal(got, theirs[name]), name
            from_donor += 1
        else:
            others = [e for e in range(8) if e not in rows]
            assert torch.equal(got[rows], theirs[name][rows]) and torch.equal(got[others], target[name][others]), name
            from_donor += 1
    assert from_donor == metrics["transplant/tensors_replaced"] == metrics["export/tensors_replaced"]
    if routers and family == "deepseek_v3":  # the choice-only correction bias (a buffer) travels with the rows
        bias = "model.layers.2.mlp.gate.e_score_correction_bias"
        assert torch.equal(export[bias][[0, 7]], theirs[bias][[0, 7]]) and not torch.equal(export[bias], theirs[bias])


def test_transplant_in_memory_only(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    donor = make_donor(tmp_path, "qwen3_moe")
    metrics = run_experiment(compose_cfg(overrides(tmp_path, ckpt, f"expert_transplant.donor={donor}",
                                                   "expert_transplant.experts=[2]", "export.enabled=false")),
                             tmp_path / "run")
    assert metrics["success"] and "export/done" not in metrics and not (tmp_path / "run" / "checkpoint").exists()
    assert metrics["before/ppl/all"] != metrics["after/ppl/all"]


def _bad_donor(kind: str, tmp_path, ckpt) -> str:
    if kind == "missing":
        return str(tmp_path / "nowhere")
    if kind == "no_config":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty")
    if kind == "no_weights":
        (tmp_path / "cfg_only").mkdir()
        shutil.copy(ckpt / "config.json", tmp_path / "cfg_only" / "config.json")
        return str(tmp_path / "cfg_only")
    if kind == "family":
        return make_donor(tmp_path, "mixtral")
    if kind == "shapes":
        return make_donor(tmp_path, "qwen3_moe", moe_intermediate_size=24)
    if kind == "experts":
        return make_donor(tmp_path, "qwen3_moe", num_experts=6)
    if kind == "self":
        return str(ckpt)
    return make_donor(tmp_path, "qwen3_moe")


@pytest.mark.parametrize("kind,setting,message", [
    ("none", "expert_transplant.donor=null", r"expert_transplant.donor is not set"),
    ("missing", None, r"donor=.*nowhere: no such directory"),
    ("no_config", None, r"not a checkpoint \(no config.json\)"),
    ("no_weights", None, r"donor=.*cfg_only: .*"),
    ("family", None, r"model_type 'mixtral', the target is 'qwen3_moe'; a donor must be of the same family"),
    ("shapes", None, r"is F32 \[.*24.*\] in the donor but F32 \[.*16.*\] in the target; a donor must have the "
                     r"target's shapes"),
    ("experts", None, r"6 experts per layer in MoE layers \[0, 2\], the target has 8"),
    ("self", None, r"is the target checkpoint itself"),
    ("ok", "expert_transplant.experts=[8]", r"expert index 8 \(layer 0\) is out of range; the model has 8 experts"),
    ("ok", "expert_transplant.experts={1: [0]}", r"names layer 1, which is not an MoE layer; MoE layer indices are"),
    ("ok", "expert_transplant.experts=[]", r"names no expert"),
    ("ok", "expert_transplant.experts=null", r"expert_transplant.experts is not set"),
])
def test_transplant_bad_input_refused_before_weights(tiny_checkpoint, tmp_path, monkeypatch, kind, setting, message):
    from moesurgeon.run_context import RunContext

    def no_weights(self, tokenizer=None):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(RunContext, "load_model", no_weights)
    ckpt = tiny_checkpoint("qwen3_moe")
    extra = [f"expert_transplant.donor={_bad_donor(kind, tmp_path, ckpt)}"] if kind != "none" else []
    extra += ["expert_transplant.experts=[1]"] if setting is None or "experts" not in setting else []
    extra += [setting] if setting else []
    with pytest.raises(ValueError, match=message):
        run_experiment(compose_cfg(overrides(tmp_path, ckpt, *extra)), tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoint").exists()
