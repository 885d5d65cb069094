"""experiment=expert_merge: clustering (known answers), merge arithmetic, exact exports of tiny checkpoints, bad input."""

import json
import weakref
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moesurgeon.arch import get_adapter
from moesurgeon.io import CheckpointReader
from moesurgeon.probe import ExpertScores
from moesurgeon.runner import run_experiment
from moesurgeon.surgery.expert_clusters import agglomerate, cluster_experts, cosine_distance
from moesurgeon.surgery.expert_merge import plan_merge, weighted_sum
from helpers_hydra import compose_cfg
from tiny_models import tiny_model, tiny_tokenizer, write_tiny_jsonl

# ------------------------------------------------------------------------------------------- clustering
# 5 items: 0-1 closest; 2 is near 0 but far from 1; 3-4 close; 2 between {0,1} and {3,4}; {0,1} far from {3,4}.
#   single:   {0,1} -> {0,1,2} (1.2)      -> {3,4}
#   average:  {0,1} -> {3,4} (2.0 < 2.6)  -> {0,1}+2 (2.6 < mean(2.4, 3.0) = 2.7)
#   complete: {0,1} -> {3,4} (2.0 < 4.0)  -> {3,4}+2 (max(2.4, 3.0) = 3.0 < 4.0)
HAND = np.array([
    [0.0, 1.0, 1.2, 6.0, 6.0],
    [1.0, 0.0, 4.0, 6.0, 6.0],
    [1.2, 4.0, 0.0, 2.4, 3.0],
    [6.0, 6.0, 2.4, 0.0, 2.0],
    [6.0, 6.0, 3.0, 2.0, 0.0],
])


@pytest.mark.parametrize("linkage,n,expected", [
    ("single", 3, [[0, 1, 2], [3], [4]]),
    ("single", 2, [[0, 1, 2], [3, 4]]),
    ("average", 3, [[0, 1], [2], [3, 4]]),
    ("average", 2, [[0, 1, 2], [3, 4]]),
    ("complete", 3, [[0, 1], [2], [3, 4]]),
    ("complete", 2, [[0, 1], [2, 3, 4]]),
    ("average", 5, [[0], [1], [2], [3], [4]]),
    ("complete", 1, [[0, 1, 2, 3, 4]]),
])


def test_agglomerate_known_answers(linkage, n, expected):
    assert agglomerate(HAND, n, linkage) == expected
    assert agglomerate(torch.tensor(HAND), n, linkage) == expected


def _brute_force(d: np.ndarray, n: int, linkage: str) -> list[list[int]]:
    """Linkage recomputed from every member pair at each step (no update formula)."""
    reduce = {"single": np.min, "complete": np.max, "average": np.mean}[linkage]
    clusters = [[i] for i in range(len(d))]
    while len(clusters) > n:
        best = min((reduce(d[np.ix_(a, b)]), i, j) for i, a in enumerate(clusters) for j, b in enumerate(clusters)
                   if i < j)
        _, i, j = best
        clusters[i] = sorted(clusters[i] + clusters[j])
        del clusters[j]
    return clusters


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_agglomerate_equals_brute_force(linkage):
    rng = np.random.default_rng(0)
    for trial in range(5):
        x = rng.normal(size=(12, 5))
        d = cosine_distance(torch.tensor(x)).numpy()
        for n in (1, 4, 9):
            assert agglomerate(d, n, linkage) == _brute_force(d, n, linkage)


def test_cluster_experts_stays_in_groups_and_refuses_bad_input():
    d = cosine_distance(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    clusters = cluster_experts(d, 6, "average", groups=2)
    assert len(clusters) == 6 and sorted(e for c in clusters for e in c) == list(range(8))
    assert all(len({e // 4 for e in c}) == 1 for c in clusters)            # never across a group
    assert [sum(1 for c in clusters if c[0] // 4 == g) for g in (0, 1)] == [3, 3]
    with pytest.raises(ValueError, match="linkage='ward'"):
        agglomerate(d, 3, "ward")
    with pytest.raises(ValueError, match="cannot be split evenly over 2 groups"):
        cluster_experts(d, 5, "average", groups=2)


def test_cosine_distance():
    f = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    d = cosine_distance(f)
    assert d[0, 1] == pytest.approx(0.0, abs=1e-12) and d[0, 2] == pytest.approx(1.0) and d[0, 3] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------- the plan
def test_plan_merge_representative_and_weights():
    model = tiny_model("qwen3_moe")
    layers = get_adapter(model).moe_layers(model)                     # layers 0 and 2, 8 experts each
    counts = torch.tensor([[5, 0, 3, 1, 1, 0, 0, 2], [1, 1, 1, 1, 1, 1, 1, 1]])
    clusters = {0: [[0, 2, 3], [1, 5], [4, 7], [6]], 2: [[0, 1], [2], [3], [4], [5], [6, 7]]}
    plans = plan_merge(clusters, counts, layers)
    p0 = plans[0]
    assert p0.clusters == [[0, 2, 3], [1, 5], [6], [7, 4]]               # most-used first; by representative
    assert p0.kept == [0, 1, 6, 7] and p0.removed == [2, 3, 4, 5]
    assert torch.allclose(p0.weights[0], torch.tensor([5, 3, 1]) / 9.0)
    assert torch.equal(p0.weights[1], torch.tensor([0.5, 0.5]))        # never chosen: uniform
    assert torch.allclose(p0.weights[3], torch.tensor([2, 1]) / 3.0)
    assert plans[2].clusters[0] == [0, 1] and plans[2].kept == [0, 2, 3, 4, 5, 6]   # tie: the lower index
    with pytest.raises(ValueError, match="do not cover experts 0..7 exactly once"):
        plan_merge({0: [[0, 1]], 2: clusters[2]}, counts, layers)


def test_weighted_sum_is_layout_independent():
    """The same elements give the same bits whether they sit in a fused [E, ...] tensor or stand alone."""
    fused = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float()
    w = torch.tensor([0.61, 0.27, 0.12])
    whole = weighted_sum([fused[0], fused[2], fused[3]], w)
    halves = [weighted_sum([fused[e][:3].clone() for e in (0, 2, 3)], w),
              weighted_sum([fused[e][3:].T.contiguous() for e in (0, 2, 3)], w).T]
    assert torch.equal(whole, torch.cat(halves))
    assert torch.allclose(whole.double(), sum(wi.double() * fused[e].double() for wi, e in zip(w, (0, 2, 3))),
                          atol=1e-6)


# ------------------------------------------------------------------------------------------- experiments
def save_tiny(tmp_path, family, dtype=torch.float32, duplicate=None, fused_save=False, **config):
    """A tiny checkpoint; `duplicate=(a, b)`: expert b of every MoE layer is made a copy of expert a."""
    model = tiny_model(family, **config)
    adapter = get_adapter(model)
    with torch.no_grad():  # zero-initialised per-expert tensors (gpt_oss biases) would average to themselves
        for layer in adapter.moe_layers(model):
            for t in list(getattr(layer.block, adapter.experts_attr).parameters()) + list(layer.router.parameters()):
                if not t.any():
                    t.normal_(0, 0.1)
    if duplicate is not None:
        a, b = duplicate
        with torch.no_grad():
            for layer in adapter.moe_layers(model):
                for p in getattr(layer.block, adapter.experts_attr).parameters():
                    p[b] = p[a]
                for t in list(layer.router.parameters()) + list(layer.router.buffers()):
                    if t.shape[:1] == (layer.num_experts,):
                        t[b] = t[a]
    out = tmp_path / f"{family}-src"
    model.to(dtype).save_pretrained(out, max_shard_size="40KB", save_original_format=not fused_save)
    tiny_tokenizer().save_pretrained(out)
    return out


def overrides(tmp_path, ckpt, *extra):
    data = write_tiny_jsonl(tmp_path / "data.jsonl", repeat=2)
    return ["experiment=expert_merge", f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}",
            f"data.train.path={data}", "data.label_field=domain", "data.block_size=32", "data.batch_size=8",
            "progress=false", *extra]


def check_export_tensors(source, export, plans_json: dict, counts: torch.Tensor, rule: str) -> int:
    """Every kept slot of the export holds its cluster's frequency-weighted average (hand-computed in float64
    from the source's disk tensors), a singleton bit-identical to its source expert; router rows by `rule`.
    Returns the number of singleton slots checked."""
    config = json.loads((source / "config.json").read_text())
    adapter = get_adapter(config)
    singletons = 0
    with CheckpointReader(source) as src, CheckpointReader(export) as out:
        for pos, (router, clusters) in enumerate(plans_json.items()):
            layer = int(router.split(".")[2])
            E = adapter.num_experts_from_config(config)
            prefix = adapter.expert_disk_prefix(layer)
            disk_router = adapter.disk_name(router + ".weight").rsplit(".", 1)[0]   # mixtral: block_sparse_moe
            assert out.header(disk_router + ".weight").shape[0] == len(clusters)
            for slot, cluster in enumerate(clusters):
                c = counts[pos, cluster].double()
                w = c / c.sum() if c.sum() > 0 else torch.full_like(c, 1 / len(c))
                singletons += len(cluster) == 1

                def expected(rows):
                    return sum(wi * r.double() for wi, r in zip(w, rows))

                if adapter.expert_disk_suffixes is None:          # fused on disk
                    pairs = [(out.get(n)[slot], [src.get(n)[m] for m in cluster])
                             for n in src.tensor_names() if n.startswith(prefix) and src.header(n).shape[0] == E]
                else:
                    pairs = [(out.get(adapter.expert_tensor_name(layer, slot, s)),
                              [src.get(adapter.expert_tensor_name(layer, m, s)) for m in cluster])
                             for s in adapter.expert_disk_suffixes]
                assert pairs
                for got, rows in pairs:
                    assert got.dtype == rows[0].dtype
                    if len(cluster) == 1:
                        assert torch.equal(got, rows[0])
                    else:
                        assert torch.allclose(got.double(), expected(rows), rtol=1e-2 if got.dtype == torch.bfloat16
                                              else 1e-6, atol=1e-2 if got.dtype == torch.bfloat16 else 1e-7)
                        assert not torch.equal(got, rows[0])   # a real average, not the representative
                for name in [n for n in src.tensor_names() if n.startswith(disk_router + ".")]:
                    if src.header(name).shape[:1] != (E,):
                        continue
                    got, rows = out.get(name)[slot], [src.get(name)[m] for m in cluster]
                    if rule == "dominant" or len(cluster) == 1:
                        assert torch.equal(got, rows[0])
                    else:
                        assert torch.allclose(got.double(), expected(rows), atol=1e-6)
    return singletons


@pytest.mark.parametrize("family,config,rule,similarity", [
    ("qwen3_moe", {}, "dominant", "output"),
    ("mixtral", {}, "freq_mean", "weight"),          # renamed on disk (block_sparse_moe, w1/w2/w3)
    ("gpt_oss", {}, "freq_mean", "output"),          # fused on disk, router bias
    ("deepseek_v3", {"topk_group": 1}, "freq_mean", "router"),  # 2 groups of 4, a token uses 1; correction bias
])
def test_expert_merge_exports_exactly(tmp_path, family, config, rule, similarity):
    ckpt = save_tiny(tmp_path, family, **config)
    out = tmp_path / "run"
    metrics = run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_merge.ratio=0.25",
                                                   f"expert_merge.router_rule={rule}",
                                                   f"expert_merge.similarity={similarity}")), out)
    assert metrics["num_experts_before"] == 8 and metrics["num_experts_after"] == 6
    assert metrics["export/done"] and metrics["export/exact"] and metrics["export/verified_reload"]
    assert metrics["export/max_abs_logit_diff"] <= 1e-5
    assert metrics["groups"] == (2 if config else 1)
    for g in ("code", "prose", "all"):
        ratio = metrics[f"after/ppl/{g}"] / metrics[f"before/ppl/{g}"]
        assert metrics[f"rel_change/ppl/{g}"] == pytest.approx(ratio - 1)

    clusters = json.loads((out / "merge_clusters.json").read_text())
    expert_map = json.loads((out / "expert_map.json").read_text())
    assert json.loads((out / "checkpoint" / "merge_clusters.json").read_text()) == clusters
    assert json.loads((out / "checkpoint" / "expert_map.json").read_text()) == expert_map
    counts = ExpertScores.load(out).criterion("frequency")
    for pos, (router, layer_clusters) in enumerate(clusters.items()):
        assert expert_map[router] == [c[0] for c in layer_clusters] == sorted(c[0] for c in layer_clusters)
        assert sorted(e for c in layer_clusters for e in c) == list(range(8))
        for c in layer_clusters:                       # the representative is the most-used member
            assert all(counts[pos, c[0]] >= counts[pos, m] for m in c)
            if config:
                assert len({e // 4 for e in c}) == 1   # clusters stay inside a routing group
        if config:
            assert [sum(1 for c in layer_clusters if c[0] // 4 == g) for g in (0, 1)] == [3, 3]
    singletons = check_export_tensors(ckpt, out / "checkpoint", clusters, counts, rule)
    assert singletons >= 1

    exported = json.loads((out / "checkpoint" / "config.json").read_text())
    adapter = get_adapter(exported)
    assert {exported[k] for k in adapter.num_experts_keys if k in exported} == {6}
    if family == "deepseek_v3":
        assert (exported["n_group"], exported["topk_group"]) == (2, 1)


@pytest.mark.parametrize("family,dtype,fused_save", [
    ("qwen2_moe", torch.bfloat16, False),   # bf16 per-expert tensors on disk, fp32 fused parameters in memory
    ("mixtral", torch.float32, True),       # a transformers-5 fused save: in-memory names (mlp, not block_sparse_moe)
])
def test_expert_merge_memory_equals_export_bit_for_bit(tmp_path, family, dtype, fused_save):
    """The merged in-memory experts and router rows equal the reloaded export's bit for bit."""
    from moesurgeon.export import ExportOptions
    from moesurgeon.routers import ExpertMaskRouter, substitute_routers
    from moesurgeon.surgery.expert_merge import export_merged, merge_in_memory

    ckpt = save_tiny(tmp_path, family, dtype=dtype, fused_save=fused_save)
    if fused_save:
        with CheckpointReader(ckpt) as reader:
            assert any(".mlp.experts.gate_up_proj" in n for n in reader.tensor_names())
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    counts = torch.arange(len(layers) * 8).reshape(len(layers), 8) % 5 + 1
    clusters = {layer.index: [[0, 3, 5], [1], [2, 7], [4], [6]] for layer in layers}
    plans = plan_merge(clusters, counts, layers)
    merge_in_memory(model, adapter, plans, "freq_mean", ckpt)
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    with substitute_routers(model, adapter, lambda l: ExpertMaskRouter(l, adapter, plans[l.index].removed)):
        metrics = export_merged(model, adapter, ckpt, tmp_path / "out", ExportOptions(), plans, "freq_mean", ids)
        with torch.no_grad():
            expected = model(input_ids=ids).logits
    assert metrics["export/max_abs_logit_diff"] <= 1e-5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert_reload_is_merged(adapter, layers, reloaded, plans)
    # logits: equal up to float reassociation (a softmax over E' experts instead of E with some at -inf)
    with torch.no_grad():
        assert float((reloaded(input_ids=ids).logits - expected).abs().max()) <= 1e-5



@pytest.mark.parametrize("family,dtype", [
    ("qwen3_moe", torch.bfloat16),   # per-expert tensors on disk: renamed / replaced computed values
    ("gpt_oss", torch.float32),      # fused [E, ...] on disk, router bias: computed values sliced on dim 0
])
def test_merged_disk_values_are_computed_one_at_a_time(tmp_path, monkeypatch, family, dtype):
    """merged_disk_values reads no tensor; the export computes each value once, never two alive at a time, and
    writes what an eager export of the same values writes, which is the in-memory merged model bit for bit."""
    from moesurgeon.io import ComputedTensor
    from moesurgeon.surgery import expert_merge
    from moesurgeon.surgery.expert_merge import merge_in_memory, merged_disk_values
    from moesurgeon.surgery.prune_experts import prune_checkpoint, read_config

    ckpt = save_tiny(tmp_path, family, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    counts = torch.arange(len(layers) * 8).reshape(len(layers), 8) % 5 + 1
    plans = plan_merge({layer.index: [[0, 3, 5], [1], [2, 7], [4], [6]] for layer in layers}, counts, layers)
    removed = {layer.index: plans[layer.index].removed for layer in layers}
    config = read_config(ckpt)
    gets: list[str] = []   # tensor reads: through the reader, or by byte range (the merge's own reads)
    real_get, real_read = CheckpointReader.get, expert_merge._read
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: gets.append(name) or real_get(self, name))
    monkeypatch.setattr(expert_merge, "_read", lambda reader, name: gets.append(name) or real_read(reader, name))
    calls: Counter = Counter()
    live: list[weakref.ref] = []   # the results computed so far that are still alive
    most_alive = 0

    def tracked(name, compute):
        def run():
            nonlocal most_alive
            calls[name] += 1
            t = compute()
            live[:] = [r for r in live if r() is not None] + [weakref.ref(t)]
            most_alive = max(most_alive, len(live))
            return t
        return run

    with CheckpointReader(ckpt) as reader:
        values = merged_disk_values(reader, adapter, layers, plans, "freq_mean")
        assert gets == [] and len(values) >= 2 * len(layers)
        assert all(isinstance(v, ComputedTensor) for v in values.values())
        for name, v in values.items():
            v.compute = tracked(name, v.compute)
        prune_checkpoint(ckpt, tmp_path / "lazy", adapter, config, removed, values=values)
        assert calls == Counter(dict.fromkeys(values, 1)) and most_alive == 1
        member_reads = Counter(gets)
        eager = {n: v.compute() for n, v in values.items()}   # the same values, all in memory (the old way)
    assert max(member_reads.values()) == 1   # every source tensor read once, only the clusters' members
    prune_checkpoint(ckpt, tmp_path / "eager", adapter, config, removed, values=eager)
    with CheckpointReader(tmp_path / "lazy") as lazy, CheckpointReader(tmp_path / "eager") as ref:
        assert lazy.tensor_names() == ref.tensor_names()
        assert all(torch.equal(lazy.get(n), ref.get(n)) for n in ref.tensor_names())

    monkeypatch.undo()
    merge_in_memory(model, adapter, plans, "freq_mean", ckpt)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lazy", dtype=torch.float32).eval()
    assert_reload_is_merged(adapter, layers, reloaded, plans)


def test_duplicate_experts_are_merged_first(tmp_path):
    """Expert 6 is a copy of expert 1 (weights and router row): every similarity puts them together first."""
    ckpt = save_tiny(tmp_path, "olmoe", duplicate=(1, 6))
    for similarity in ("output", "weight", "router"):
        out = tmp_path / similarity
        metrics = run_experiment(compose_cfg(overrides(tmp_path, ckpt, "expert_merge.ratio=0.125",
                                                       f"expert_merge.similarity={similarity}",
                                                       "export.enabled=false")), out)
        clusters = json.loads((out / "merge_clusters.json").read_text())
        assert all(sorted(c) == [1, 6] for layer in clusters.values() for c in layer if len(c) > 1), clusters
        assert metrics["merge/clusters_merged"] == 3


@pytest.mark.parametrize("setting,message", [
    ("expert_merge.ratio=0", r"expert_merge.ratio=0: expected a share .* strictly between 0 and 1"),
    ("expert_merge.ratio=1.0", r"expert_merge.ratio=1: expected a share"),
    ("expert_merge.ratio=0.9", r"expert_merge.ratio=0.9 leaves too few experts for top-k=2: 1 remain"),
    ("expert_merge.ratio=0.01", r"expert_merge.ratio=0.01 merges no expert"),
    ("expert_merge.similarity=cosine", r"similarity='cosine': expected one of \['output', 'weight', 'router'\]"),
    ("expert_merge.linkage=ward", r"linkage='ward': expected one of \['average', 'complete', 'single'\]"),
    ("expert_merge.router_rule=sum", r"router_rule='sum': expected one of \['dominant', 'freq_mean'\]"),
    ("expert_merge.calib_tokens=1", r"calib_tokens=1: expected an integer >= 2"),
    ("expert_merge.scores=/nonexistent", r"/nonexistent: no such file"),
    ("data.train.path=null", r"needs expert frequencies .* set data.train.path"),
])
def test_expert_merge_bad_input_refused_before_weights(tmp_path, monkeypatch, setting, message):
    from moesurgeon.run_context import RunContext

    def no_weights(self, tokenizer=None):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(RunContext, "load_model", no_weights)
    ckpt = save_tiny(tmp_path, "qwen3_moe")
    with pytest.raises(ValueError, match=message):
        run_experiment(compose_cfg(overrides(tmp_path, ckpt, setting)), tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoint").exists() and not (tmp_path / "bad" / "merge_clusters.json").exists()


def test_expert_merge_scores_of_another_model_refused(tmp_path, monkeypatch):
    from moesurgeon.run_context import RunContext

    monkeypatch.setattr(RunContext, "load_model", lambda self, tokenizer=None: (_ for _ in ()).throw(AssertionError))
    ckpt = save_tiny(tmp_path, "qwen3_moe")
    names = ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]
    for experts in (4, 8):
        zeros = torch.zeros(2, 1, experts)
        ExpertScores(names, ["all"], [2, 2], torch.ones(2, 1, dtype=torch.int64), zeros.long(), zeros.double(),
                     zeros.double(), zeros.double()).save(tmp_path / f"scores{experts}.safetensors")
    with pytest.raises(ValueError, match=r"scores for 4 experts per layer, but this model has 8"):
        run_experiment(compose_cfg(overrides(tmp_path, ckpt, f"expert_merge.scores={tmp_path}/scores4.safetensors")),
                       tmp_path / "bad")
    # with scores, data.train is still needed for the calibration tokens of similarity=output
    with pytest.raises(ValueError, match=r"needs calibration tokens \(similarity=output\) from data.train"):
        run_experiment(compose_cfg(overrides(tmp_path, ckpt, f"expert_merge.scores={tmp_path}/scores8.safetensors",
                                             "data.train.path=null")), tmp_path / "bad2")


def assert_reload_is_merged(adapter, layers, reloaded, plans) -> None:
    """Every experts parameter and router row of the reloaded export equals the in-memory merged model's kept slots."""
    for layer, again in zip(layers, adapter.moe_layers(reloaded)):
        kept = torch.tensor(plans[layer.index].kept)
        mine = dict(getattr(layer.block, adapter.experts_attr).named_parameters())
        for name, p in getattr(again.block, adapter.experts_attr).named_parameters():
            assert torch.equal(p, mine[name].index_select(0, kept)), name
        assert torch.equal(again.router.weight, layer.router.weight.index_select(0, kept))
