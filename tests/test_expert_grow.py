"""experiment=expert_grow on tiny checkpoints: layout rules, bit-exact added experts, muted routers, exactness."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moesurgeon.arch import ExpertCountError, get_adapter
from moesurgeon.io import CheckpointReader
from moesurgeon.probe import ExpertScores
from moesurgeon.runner import run_experiment
from moesurgeon.surgery.expert_grow import MUTE_OFFSET
from helpers_hydra import compose_cfg
from tiny_models import write_tiny_jsonl


def overrides(tmp_path, ckpt, *extra):
    data = write_tiny_jsonl(tmp_path / "data.jsonl", repeat=2)
    return ["experiment=expert_grow", f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}",
            f"data.train.path={data}", "data.label_field=domain", "data.block_size=32", "data.batch_size=8",
            "progress=false", "threads=1", *extra]


def tensors(path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return {n: r.get(n) for n in r.tensor_names()}


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def test_grow_layout_rules():
    qwen = get_adapter({"model_type": "qwen3_moe"})
    plain = qwen.expert_grow_layout({"model_type": "qwen3_moe", "num_experts": 8, "num_local_experts": 8}, 3)
    assert plain.edits == {"num_experts": 11, "num_local_experts": 11} and plain.groups == 1
    assert plain.old_positions == tuple(range(8)) and plain.new_positions == (8, 9, 10)
    ds = get_adapter({"model_type": "deepseek_v3"})
    grouped = ds.expert_grow_layout({"n_routed_experts": 8, "n_group": 2, "topk_group": 1}, 4)
    assert grouped.edits == {"n_routed_experts": 12} and grouped.groups == 2
    assert grouped.old_positions == (0, 1, 2, 3, 6, 7, 8, 9) and grouped.new_positions == (4, 5, 10, 11)
    assert [grouped.group_of(p) for p in grouped.new_positions] == [0, 0, 1, 1]
    free = ds.expert_grow_layout({"n_routed_experts": 8, "n_group": 2, "topk_group": 2}, 1)
    assert free.edits == {"n_routed_experts": 9, "n_group": 1, "topk_group": 1} and free.new_positions == (8,)
    with pytest.raises(ExpertCountError, match=r"grow beyond what the config's group structure allows: 3 new experts "
                                               r"per layer cannot be spread evenly over n_group=2 groups of 4"):
        ds.expert_grow_layout({"n_routed_experts": 8, "n_group": 2, "topk_group": 1}, 3)
    with pytest.raises(ExpertCountError, match="none of the expert-count keys"):
        qwen.expert_grow_layout({"model_type": "qwen3_moe"}, 2)
    assert get_adapter({"model_type": "mixtral"}).router_disk_prefix(2) == "model.layers.2.block_sparse_moe.gate."


CASES = [  # family, config overrides, init, exact by construction (a per-expert router bias mutes the added experts)
    ("qwen3_moe", {}, "clone_top", False),
    ("qwen2_moe", {}, "clone_top", False),
    ("mixtral", {}, "clone_noise", False),
    ("olmoe", {}, "random", False),
    ("gpt_oss", {}, "clone_top", True),                        # fused on disk, logit bias
    ("deepseek_v3", {"topk_group": 1}, "clone_top", True),     # 2 groups of 4 -> 5: renumbered, choice bias
    ("deepseek_v3", {}, "clone_noise", True),                  # limit excludes nothing: one group
]


@pytest.mark.parametrize("family,extra,init,exact", CASES)
def test_expert_grow_exports(tiny_checkpoint, tmp_path, family, extra, init, exact):
    ckpt = tiny_checkpoint(family, **extra)
    out = tmp_path / "run"
    metrics = run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_grow.add=2", f"expert_grow.init={init}")),
                             out)
    assert metrics["success"] and metrics["export/done"] and metrics["export/verified_reload"] is exact
    if init == "clone_top":  # every tensor of every added expert compared with its parent's
        layers = 2 if family in ("qwen3_moe", "deepseek_v3") else 3
        assert metrics["grow/clone_tensors_bit_exact"] == layers * 2 * (4 if family == "gpt_oss" else 3)
    assert (metrics["num_experts_before"], metrics["num_experts_after"]) == (8, 10)
    assert metrics["grow/exact_by_construction"] is exact and metrics["export/exact"] is exact
    grouped = bool(extra)
    export = out / "checkpoint"
    config = json.loads((export / "config.json").read_text())
    adapter = get_adapter(config)
    assert {config[k] for k in adapter.num_experts_keys if k in config} == {10}
    if family == "deepseek_v3":
        assert (config["n_group"], config["topk_group"]) == ((2, 1) if grouped else (1, 1))
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert {layer.num_experts for layer in adapter.moe_layers(reloaded)} == {10}

    # where every expert went, and the parents: the most-used experts (per group of 4 when grouped)
    expert_map = json.loads((out / "expert_map.json").read_text())
    # random needs no scores and computes none; clone inits score data.train
    assert (out / "expert_scores.safetensors").exists() is (init != "random")
    freq = ExpertScores.load(out / "expert_scores.safetensors").criterion("frequency") if init != "random" else None
    old, new = ((0, 1, 2, 3, 5, 6, 7, 8), (4, 9)) if grouped else (tuple(range(8)), (8, 9))
    src, dst = tensors(ckpt), tensors(export)
    for row, (router, entry) in enumerate(expert_map.items()):
        layer = int(router.split(".")[2])
        assert entry["source"] == [old.index(p) if p in old else None for p in range(10)]
        parents = [entry["parents"][str(p)] for p in new]
        if init == "random":
            assert parents == [None, None]
        elif grouped:
            assert parents == [int(freq[row, :4].argmax()), 4 + int(freq[row, 4:].argmax())]
        else:
            order = sorted(range(8), key=lambda e: (-float(freq[row, e]), e))
            assert parents == order[:2]
        fused = adapter.expert_disk_suffixes is None
        names = [n for n in src if n.startswith(adapter.expert_disk_prefix(layer))]
        for name in names:
            if fused:
                assert torch.equal(dst[name][list(old)], src[name])
                pairs = [(dst[name][p], src[name][q], src[name]) for p, q in zip(new, parents)]
            else:
                e, rest = adapter.split_expert_name(name, layer)
                assert torch.equal(dst[adapter.expert_tensor_name(layer, old[e], rest)], src[name])
                if e not in parents:
                    continue
                pairs = [(dst[adapter.expert_tensor_name(layer, p, rest)], src[name], src[name])
                         for p, q in zip(new, parents) if q == e]
            for got, parent, whole in pairs:
                if init == "clone_top":
                    assert torch.equal(got, parent)
                elif init == "clone_noise":  # noise of 0.01 x the parent tensor's RMS
                    assert 0.005 < rms(got - parent) / rms(parent) < 0.02
        if init == "random":  # RMS matched to that tensor over the layer's experts
            for rest in adapter.expert_disk_suffixes:
                same = [src[adapter.expert_tensor_name(layer, e, rest)] for e in range(8)]
                for p in new:
                    assert 0.75 < rms(dst[adapter.expert_tensor_name(layer, p, rest)]) / rms(torch.stack(same)) < 1.33

        # router rows: muted through the bias where there is one (weight row = the parent's), zero rows otherwise
        prefix = adapter.router_disk_prefix(layer)
        for name in [n for n in src if n.startswith(prefix) and src[n].shape[0] == 8]:
            assert torch.equal(dst[name][list(old)], src[name])
            for p, q in zip(new, parents):
                if name.endswith(("bias", "e_score_correction_bias")):
                    assert float(dst[name][p]) == pytest.approx(float(src[name].min()) - MUTE_OFFSET)
                elif exact:
                    assert torch.equal(dst[name][p], src[name][q])
                else:
                    assert not dst[name][p].any()

    # the function: exact where a bias mutes the added experts; measured (and never exact without renorm) otherwise
    diff = metrics["grow/max_abs_logit_diff_vs_source"]
    shares = [v for k, v in metrics.items() if k.startswith("grow/new_expert_share/")]
    if exact:
        assert diff < 1e-5 and metrics["export/max_abs_logit_diff_vs_source"] < 1e-5 and set(shares) == {0.0}
        assert all(abs(v) < 1e-6 for k, v in metrics.items() if k.startswith("rel_change/ppl/"))
    if family == "olmoe":  # softmax without renormalisation: N zero logits join every token's softmax sum
        assert diff > 1e-6


def test_zero_rows_chosen_only_below_k_positive_logits(tiny_checkpoint, tmp_path):
    """qwen3_moe (renormalised top-k, no router bias): an added expert with a zero row is chosen exactly by the
    tokens with fewer than k positive logits, and where no token chose one the logits are the source's."""
    ckpt = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "run"
    run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_grow.add=2")), out)
    source = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    grown = AutoModelForCausalLM.from_pretrained(out / "checkpoint").eval()
    adapter = get_adapter(source)
    first_src, first_grown = adapter.moe_layers(source)[0], adapter.moe_layers(grown)[0]
    seen = {}
    hooks = [first_src.router.register_forward_hook(lambda m, i, o: seen.__setitem__("src", o)),
             first_grown.router.register_forward_hook(lambda m, i, o: seen.__setitem__("grown", o))]
    ids = torch.randint(3, 90, (16, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = source(input_ids=ids).logits, grown(input_ids=ids).logits
    for h in hooks:
        h.remove()
    k = adapter.get_top_k(first_src)
    positive = (seen["src"][0] > 0).sum(-1)
    chose_new = (seen["grown"][2] >= 8).sum(-1)
    assert torch.equal(chose_new, (k - positive).clamp(0, 2))
    assert chose_new.any() and (chose_new == 0).any()  # the tiny model has both kinds of token
    # rows (sequences) on which no MoE layer chose an added expert compute exactly the source's logits
    picks = []
    hooks = [layer.router.register_forward_hook(lambda m, i, o: picks.append((o[2] >= 8).any(-1).view(16, 24)))
             for layer in adapter.moe_layers(grown)]
    with torch.no_grad():
        grown(input_ids=ids)
    for h in hooks:
        h.remove()
    untouched = ~torch.stack(picks).any(0).any(-1)
    assert untouched.any()
    assert float((got[untouched] - expected[untouched]).abs().max()) < 1e-5


def test_expert_grow_live_router_ties_with_parents(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("gpt_oss")
    out = tmp_path / "run"
    metrics = run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_grow.add=2", "expert_grow.router=live")), out)
    assert metrics["router"] == "live" and not metrics["grow/exact_by_construction"]
    src, dst = tensors(ckpt), tensors(out / "checkpoint")
    parents = json.loads((out / "expert_map.json").read_text())["model.layers.0.mlp.router"]["parents"]
    for name in ("model.layers.0.mlp.router.weight", "model.layers.0.mlp.router.bias"):
        for p, q in parents.items():
            assert torch.equal(dst[name][int(p)], src[name][q])  # the clone's row and bias are its parent's
    # a tie with the parent displaces the k-th expert: the added experts are chosen and the function changes
    assert all(v > 0.05 for k, v in metrics.items() if k.startswith("grow/new_expert_share/"))
    assert metrics["grow/max_abs_logit_diff_vs_source"] > 1e-3


def test_expert_grow_in_memory_with_stored_scores(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    first, second = tmp_path / "a", tmp_path / "b"
    run_experiment(compose_cfg(overrides(tmp_path, ckpt, "export.enabled=false")), first)
    metrics = run_experiment(compose_cfg(overrides(tmp_path, ckpt, "export.enabled=false", "data.train.path=null",
                                                   f"expert_grow.scores={first}")), second)
    assert json.loads((first / "expert_map.json").read_text()) == json.loads((second / "expert_map.json").read_text())
    assert metrics["grow/clone_tensors_bit_exact"] == 2 * 2 * 3 and "export/done" not in metrics
    assert "scores/seconds" not in metrics
    assert not (second / "checkpoint").exists() and not list(second.glob(".grown-*"))


@pytest.mark.parametrize("family,extra,setting,message", [
    ("qwen3_moe", {}, "expert_grow.add=0", r"expert_grow.add=0: expected a positive integer"),
    ("qwen3_moe", {}, "expert_grow.init=nope", r"expert_grow.init='nope': expected one of \['clone_top', "),
    ("qwen3_moe", {}, "expert_grow.noise=-1", r"expert_grow.noise=-1.0: expected a non-negative share"),
    ("qwen3_moe", {}, "expert_grow.router=split", r"expert_grow.router='split': expected one of \['mute', 'live'\]"),
    ("qwen3_moe", {}, "data.train.path=null", r"init=clone_top copies the most-used experts .* set data.train.path"),
    ("qwen3_moe", {}, "expert_grow.scores=/nonexistent", r"/nonexistent"),
    ("deepseek_v3", {"topk_group": 1}, "expert_grow.add=3",
     r"grow beyond what the config's group structure allows: 3 new experts per layer .* add a multiple of 2"),
])
def test_expert_grow_bad_input_refused_before_weights(tiny_checkpoint, tmp_path, monkeypatch, family, extra, setting,
                                                      message):
    from moesurgeon.run_context import RunContext

    def no_weights(self, tokenizer=None):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(RunContext, "load_model", no_weights)
    ckpt = tiny_checkpoint(family, **extra)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_experiment(compose_cfg(overrides(tmp_path, ckpt, setting)), tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoint").exists() and not (tmp_path / "bad" / "expert_map.json").exists()
