"""RouterUsageProbe and profile_usage: exact counts, padding exclusion, label groups, co-activation, hook hygiene."""

import json

import pytest
import torch

from moesurgeon.arch import get_adapter
from moesurgeon.hooks import count_hooks
from moesurgeon.probe import RouterUsageProbe, UsageStats, js_divergence_bits, layer_metrics
from tiny_models import tiny_model


def _reference_routing(model, adapter, input_ids):
    """Routing of every MoE layer captured independently of the probe."""
    layers = adapter.moe_layers(model)
    seen = {}
    handles = [l.router.register_forward_hook(
        lambda m, i, o, l=l: seen.__setitem__(l.router_name, adapter.routing(l, o))) for l in layers]
    try:
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_probe_counts_are_exact_with_padding_and_groups(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding: excluded
    mask[2, 1:] = 0
    labels = torch.tensor([0, 1, 1])
    ref = _reference_routing(model, adapter, ids)
    with RouterUsageProbe(model, adapter, group_names=["a", "b"]) as probe:
        with probe.batch(attention_mask=mask, label_ids=labels):
            model(ids, attention_mask=mask)
    stats = probe.stats
    keep = mask.reshape(-1).bool()
    groups = labels.repeat_interleave(6)
    for pos, name in enumerate(stats.layer_names):
        r = ref[name]
        sel = torch.zeros(18, 8).scatter_(1, r.indices, 1.0)
        for g in range(2):
            rows = keep & (groups == g)
            assert int(stats.tokens[pos, g]) == int(rows.sum())
            expected_counts = sel[rows].sum(0).long()
            assert torch.equal(stats.counts[pos, g], expected_counts), (name, g, stats.counts[pos, g], expected_counts)
            # co-activation: true joint counts, diagonal equals the marginal counts
            joint = (sel[rows].T @ sel[rows]).long()
            assert torch.equal(stats.coact[pos, g], joint)
            assert torch.equal(stats.coact[pos, g].diagonal(), expected_counts)
            torch.testing.assert_close(stats.prob_sum[pos, g], r.probs[rows].sum(0).double(), rtol=1e-5, atol=1e-6)
            mass = torch.zeros(18, 8).scatter_(1, r.indices, r.weights)[rows].sum(0).double()
            torch.testing.assert_close(stats.gate_mass[pos, g], mass, rtol=1e-5, atol=1e-6)


def test_coactivation_is_not_a_product_of_marginals():
    """Tokens pick {0,1} or {2,3}: marginals are uniform but experts 0 and 2 never co-occur."""
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    probe = RouterUsageProbe(model, adapter)
    logits = torch.zeros(4, 8)
    indices = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3]])
    weights = torch.full((4, 2), 0.5)
    probe._accumulate(0, layer, (logits, weights, indices))
    co = probe.stats.coact[0, 0]
    assert co[0, 1] == 2 and co[2, 3] == 2 and co[0, 2] == 0 and co[1, 3] == 0
    assert torch.equal(co.diagonal()[:4], torch.tensor([2, 2, 2, 2]))


def test_hooks_removed_on_exit_and_on_exception():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    before = count_hooks(model)
    with RouterUsageProbe(model, adapter) as probe:
        assert count_hooks(model) == before + len(probe.layers)
        model(torch.randint(3, 96, (1, 4)))
    assert count_hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with RouterUsageProbe(model, adapter):
            model(torch.randint(3, 96, (1, 4)))
            raise RuntimeError("boom")
    assert count_hooks(model) == before
    # a hook failing inside the forward pass also leaves nothing behind
    with pytest.raises(ValueError, match="attention mask of 5 tokens"):
        with RouterUsageProbe(model, adapter) as probe:
            with probe.batch(attention_mask=torch.ones(1, 5)):
                model(torch.randint(3, 96, (1, 4)))
    assert count_hooks(model) == 0


def test_stats_roundtrip_and_metrics(tmp_path):
    model = tiny_model("olmoe")
    adapter = get_adapter(model)
    with RouterUsageProbe(model, adapter, group_names=["x", "y"]) as probe:
        for g in range(2):
            with probe.batch(label_ids=torch.tensor([g, g]), input_ids=torch.zeros(2, 8)):
                model(torch.randint(3, 48, (2, 8)) + 45 * g)
    path = probe.stats.save(tmp_path / "usage.safetensors")
    loaded = UsageStats.load(path)
    assert loaded.layer_names == probe.stats.layer_names and loaded.group_names == ["x", "y"]
    assert torch.equal(loaded.coact, probe.stats.coact)
    metrics = layer_metrics(loaded)
    assert metrics["tokens"] == 32  # 2 groups x 2 rows x 8 tokens
    assert 0 <= metrics["jsd_bits/mean"] <= 1.0
    assert all(k in metrics for k in ("entropy_bits/mean", "imbalance_cv/mean", "top2_share/x"))
    json.dumps(metrics)
    bogus = tmp_path / "bogus.safetensors"
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(bogus))
    with pytest.raises(ValueError, match="not a moesurgeon router-usage file"):
        UsageStats.load(bogus)


def test_js_divergence_bounds():
    same = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(js_divergence_bits(same)) == pytest.approx(0.0, abs=1e-9)
    assert float(js_divergence_bits(disjoint)) == pytest.approx(1.0, abs=1e-6)


def test_trace_file(tmp_path):
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    ids = torch.randint(3, 96, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with RouterUsageProbe(model, adapter, trace_path=tmp_path / "trace.jsonl") as probe:
        with probe.batch(attention_mask=mask, input_ids=ids):
            model(ids, attention_mask=mask)
    rows = [json.loads(l) for l in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * len(probe.layers)  # padding excluded
    assert {r["layer"] for r in rows} == {l.router_name for l in probe.layers}
    assert all(r["token_id"] == int(ids[r["example"], r["position"]]) for r in rows)
    assert all(len(r["experts"]) == 2 for r in rows)


def test_profile_usage_equals_the_probe_run_by_hand(tmp_path):
    """profile_usage (the probe's hooks under run_blocks) gives exactly what the probe gives by hand."""
    from moesurgeon.data import TokenBlocks
    from moesurgeon.probe import profile_usage
    from moesurgeon.probe.stats import TENSORS

    model = tiny_model("deepseek_v3")
    adapter = get_adapter(model)
    ids = torch.randint(3, 96, (5, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    mask[4, 5:] = 0
    labels = torch.tensor([1, 0, -1, 1, 0])  # the unlabelled block counts in the first group
    blocks = TokenBlocks(ids, mask, labels, ["a", "b"])
    stats, tokens_per_s = profile_usage(model, adapter, blocks, 3, trace_path=tmp_path / "run.jsonl", progress=False)
    with RouterUsageProbe(model, adapter, group_names=["a", "b"], trace_path=tmp_path / "hand.jsonl") as probe:
        for rows in (slice(0, 3), slice(3, 5)):
            with probe.batch(attention_mask=mask[rows], label_ids=labels[rows].clamp_min(0), input_ids=ids[rows]):
                model(input_ids=ids[rows], attention_mask=mask[rows])
    for name in TENSORS:
        assert torch.equal(getattr(stats, name), getattr(probe.stats, name)), name
    assert stats.tokens[0].tolist() == [3 + 7 + 5, 7 + 7]
    assert (tmp_path / "run.jsonl").read_text() == (tmp_path / "hand.jsonl").read_text()
    assert tokens_per_s > 0
    with pytest.raises(ValueError, match="no token blocks to profile"):
        profile_usage(model, adapter, TokenBlocks(ids[:0], mask[:0], labels[:0], ["a", "b"]), progress=False)
