"""experiment=expert_prune through the real Hydra configs on tiny checkpoints: scores, choice, exact export."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moesurgeon.arch import get_adapter
from moesurgeon.probe import ExpertScores
from moesurgeon.routers import ExpertMaskRouter, substitute_routers
from moesurgeon.runner import run_experiment
from helpers_hydra import compose_cfg
from tiny_models import write_tiny_jsonl


def overrides(tmp_path, ckpt, *extra):
    data = write_tiny_jsonl(tmp_path / "data.jsonl", repeat=2)
    return ["experiment=expert_prune", f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}",
            f"data.train.path={data}", "data.label_field=domain", "data.block_size=32", "data.batch_size=8",
            "progress=false", *extra]


def masked_source_diff(source, export, removed: dict[int, list[int]]) -> float:
    """max |logits(export) - logits(source with the removed experts masked out of routing)| in fp32."""
    src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    out = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    adapter = get_adapter(src)
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(1))
    with substitute_routers(src, adapter, lambda layer: ExpertMaskRouter(layer, adapter, removed[layer.index])), \
            torch.no_grad():
        expected = src(input_ids=ids).logits
    with torch.no_grad():
        got = out(input_ids=ids).logits
    return float((expected - got).abs().max())


@pytest.mark.parametrize("family,extra,experts_key", [
    ("qwen3_moe", {}, "num_local_experts"),
    ("gpt_oss", {}, "num_local_experts"),           # experts fused on disk: sliced on dim 0
    ("deepseek_v3", {"topk_group": 1}, "n_routed_experts"),  # 2 groups of 4, a token uses 1: one removed per group
    ("deepseek_v3", {}, "n_routed_experts"),  # 2 groups, a token may use both: no limit, the export uses one group
])
@pytest.mark.parametrize("criterion", ["reap", "frequency"])
def test_expert_prune_exports_exactly(tiny_checkpoint, tmp_path, family, extra, experts_key, criterion):
    ckpt = tiny_checkpoint(family, **extra)
    out = tmp_path / "run"
    metrics = run_experiment(compose_cfg(overrides(tmp_path, ckpt, f"expert_prune.criterion={criterion}",
                                                   "expert_prune.ratio=0.25")), out)
    assert metrics["num_experts_before"] == 8 and metrics["num_experts_after"] == 6
    assert metrics["experts_removed_per_layer"] == 2 and metrics["export/done"] and metrics["export/exact"]
    grouped = bool(extra)
    assert metrics["groups"] == (2 if grouped else 1)
    for g in ("code", "prose", "all"):
        assert metrics[f"before/ppl/{g}"] > 1 and metrics[f"after/ppl/{g}"] > 1
        ratio = metrics[f"after/ppl/{g}"] / metrics[f"before/ppl/{g}"]
        assert metrics[f"rel_change/ppl/{g}"] == pytest.approx(ratio - 1)
    assert metrics["export/verified_reload"] and metrics["export/max_abs_logit_diff"] < 1e-5

    # the choice: per layer the two lowest-scored experts (per group for deepseek_v3), as expert_map.json says
    scores = ExpertScores.load(out / "expert_scores.safetensors")
    table = scores.criterion(criterion)
    expert_map = json.loads((out / "expert_map.json").read_text())
    assert json.loads((out / "checkpoint" / "expert_map.json").read_text()) == expert_map
    assert list(expert_map) == scores.layer_names
    removed = {}
    for pos, (router, kept) in enumerate(expert_map.items()):
        assert len(kept) == 6 and kept == sorted(kept)
        gone = sorted(set(range(8)) - set(kept))
        if grouped:
            assert [e // 4 for e in gone] == [0, 1]  # one from each group of 4
            for g in (0, 1):
                part = table[pos, 4 * g:4 * g + 4]
                assert gone[g] - 4 * g == int(torch.sort(part, stable=True).indices[0])
        else:
            assert gone == sorted(int(e) for e in torch.sort(table[pos], stable=True).indices[:2])
        removed[int(router.split(".")[2])] = gone

    # the export: E' experts in config.json, reloads in transformers, equals the masked source
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    adapter = get_adapter(config)
    present = [k for k in adapter.num_experts_keys if k in config]
    assert experts_key in present and {config[k] for k in present} == {6}
    if family == "deepseek_v3":
        assert (config["n_group"], config["topk_group"]) == ((2, 1) if grouped else (1, 1))
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert {layer.num_experts for layer in adapter.moe_layers(reloaded)} == {6}
    assert masked_source_diff(ckpt, out / "checkpoint", removed) < 1e-5
    if family == "gpt_oss":
        index = json.loads((out / "checkpoint" / "model.safetensors.index.json").read_text())["weight_map"]
        name = "model.layers.0.mlp.experts.gate_up_proj"
        with safe_open(str(out / "checkpoint" / index[name]), "pt") as f:
            assert f.get_slice(name).get_shape()[0] == 6


def test_expert_prune_random_keep_and_stored_scores(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    first = tmp_path / "a"
    run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_prune.criterion=random", "expert_prune.seed=3",
                                         "expert_prune.keep=[0,1]", "expert_prune.ratio=0.5")), first)
    kept = json.loads((first / "expert_map.json").read_text())
    assert all(len(v) == 4 and v[:2] == [0, 1] for v in kept.values())  # pinned experts stay
    # the score figures: every criterion with the removed experts crossed out (no per-label figure for random)
    assert (first / "expert_scores.png").stat().st_size > 5_000
    assert not list(first.glob("expert_scores_*_by_label.png"))
    # scores of the first run, read instead of computed: same choice as computing them again
    again = tmp_path / "b"
    run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_prune.criterion=gate_mass",
                                         f"expert_prune.scores={first}", "export.enabled=false")), again)
    scored = tmp_path / "c"
    run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_prune.criterion=gate_mass",
                                         "export.enabled=false")), scored)
    assert json.loads((again / "expert_map.json").read_text()) == json.loads((scored / "expert_map.json").read_text())
    assert (scored / "expert_scores_gate_mass_by_label.png").stat().st_size > 5_000
    assert not (again / "checkpoint").exists()


@pytest.mark.parametrize("setting,message", [
    ("expert_prune.ratio=0", r"expert_prune.ratio=0: expected a share .* strictly between 0 and 1"),
    ("expert_prune.ratio=1.0", r"expert_prune.ratio=1: expected a share"),
    ("expert_prune.ratio=0.9", r"leaves too few experts for top-k=2: 1 remain"),
    ("expert_prune.ratio=0.01", r"ratio=0.01 removes no expert \(8 experts per layer\)"),
    ("expert_prune.criterion=nope",
     r"criterion='nope': expected one of \['random', 'frequency', 'gate_mass', 'reap'\]"),
    ("expert_prune.keep=[8]", r"expert index 8 \(layer 0\) is out of range; the model has 8 experts"),
    ("expert_prune.keep=[0,1,2,3,4,5,6]", r"pins 7 experts of the layer in layer 0, but only 6 are kept"),
    ("expert_prune.keep={1: [0]}", r"names layer 1, which is not an MoE layer; MoE layer indices are \[0, 2\]"),
    ("data.train.path=null", r"criterion=reap needs expert scores: set data.train.path"),
    ("expert_prune.scores=/nonexistent", r"/nonexistent: no such file"),
])
def test_expert_prune_bad_input_refused_before_weights(tiny_checkpoint, tmp_path, monkeypatch, setting, message):
    from moesurgeon.run_context import RunContext

    def no_weights(self, tokenizer=None):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(RunContext, "load_model", no_weights)
    ckpt = tiny_checkpoint("qwen3_moe")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_experiment(compose_cfg(overrides(tmp_path, ckpt, setting)), tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoint").exists() and not (tmp_path / "bad" / "expert_map.json").exists()


def test_expert_prune_deepseek_groups_refused(tiny_checkpoint, tmp_path, monkeypatch):
    from moesurgeon.run_context import RunContext

    monkeypatch.setattr(RunContext, "load_model", lambda self, tokenizer=None: (_ for _ in ()).throw(AssertionError))
    ckpt = tiny_checkpoint("deepseek_v3", topk_group=1)
    # 2 groups of 4: ratio 0.75 leaves 1 per group (a group is scored by its best two experts)
    with pytest.raises(ValueError, match=r"leaves 1 expert\(s\) in each of 2 groups"):
        run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_prune.ratio=0.75")), tmp_path / "g")
    # pinned 3 of group 0 while only 3 are kept per group is fine; 4 is not
    with pytest.raises(ValueError, match=r"pins 4 experts of group 0 \(experts 0..3\) in layer 1, but only 3 are kept"):
        run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_prune.keep=[0,1,2,3]")), tmp_path / "h")
