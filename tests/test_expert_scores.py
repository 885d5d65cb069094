"""Expert scores (probe/expert_scores.py) on tiny models of every family, checked against the usage probe
and a brute-force per-token computation."""

import pytest
import torch

from moesurgeon.arch import get_adapter
from moesurgeon.data import TokenBlocks
from moesurgeon.hooks import forward_hooks
from moesurgeon.probe import ExpertScores, profile_usage, score_experts
from tiny_models import tiny_model


def blocks(seed: int = 0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (6, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0   # padding at the right end: never scored
    mask[4, 3:] = 0
    return TokenBlocks(ids, mask, torch.tensor([0, 1, 0, 1, 1, 0]), ["code", "prose"])


def captured(model, adapter, data: TokenBlocks):
    """Per MoE layer: (flat hidden the experts got, router indices, router weights) of one unpadded forward."""
    got = {}
    hooks = []
    for layer in adapter.moe_layers(model):
        def experts_hook(module, inputs, output, i=layer.index):
            got.setdefault(i, {})["hidden"] = inputs[0].reshape(-1, inputs[0].shape[-1]).clone()

        def router_hook(module, inputs, output, layer=layer):
            r = adapter.routing(layer, output)
            got.setdefault(layer.index, {}).update(indices=r.indices.clone(), weights=r.weights.clone())

        hooks += [(layer.router, router_hook), (getattr(layer.block, adapter.experts_attr), experts_hook)]
    with forward_hooks(hooks), torch.no_grad():
        model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    return got


def test_scores_match_usage_and_brute_force(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    data = blocks()
    scores, tps = score_experts(model, adapter, data, batch_size=6, progress=False)
    usage, _ = profile_usage(model, adapter, data, batch_size=6, progress=False)
    layers = adapter.moe_layers(model)
    assert scores.layer_names == usage.layer_names == [layer.router_name for layer in layers]
    assert scores.group_names == ["code", "prose"] and tps > 0
    assert torch.equal(scores.counts, usage.counts)            # exactly the usage probe's counts
    assert torch.equal(scores.tokens, usage.tokens)
    assert int(scores.tokens.sum(1)[0]) == int(data.attention_mask.sum()) == 72 - 5 - 9
    # gate mass = sum of routing weights over real tokens (the usage probe's float32 sums)
    torch.testing.assert_close(scores.gate_mass, usage.gate_mass, rtol=1e-5, atol=1e-6)

    # brute force, one token at a time: g_j(x) * ||f_j(x)||, per label group
    got = captured(model, adapter, data)
    real = data.attention_mask.reshape(-1).bool()
    groups = data.labels.repeat_interleave(data.block_size)
    for pos, layer in enumerate(layers):
        c = got[layer.index]
        counts = scores.counts[pos].sum(0)
        expert = int(counts.argmax())  # the busiest expert, and the least used one that was routed at all
        for e in {expert, int(torch.where(counts > 0, counts, 10**9).argmin())}:
            sal = torch.zeros(2, dtype=torch.float64)
            nrm = torch.zeros(2, dtype=torch.float64)
            n = torch.zeros(2, dtype=torch.float64)
            mass = torch.zeros(2, dtype=torch.float64)
            for t in torch.nonzero(real).flatten().tolist():
                slots = (c["indices"][t] == e).nonzero().flatten()
                if len(slots) == 0:
                    continue
                with torch.no_grad():
                    out = adapter.run_expert(layer, c["hidden"][t:t + 1], e)
                g, w = int(groups[t]), float(c["weights"][t, slots[0]])
                norm = float(out.double().norm())
                sal[g] += w * norm
                nrm[g] += norm
                n[g] += 1
                mass[g] += w
            assert torch.equal(scores.counts[pos, :, e].double(), n)
            torch.testing.assert_close(scores.gate_mass[pos, :, e], mass, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(scores.reap[pos, :, e], sal / n.clamp_min(1), rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(scores.output_norm[pos, :, e], nrm / n.clamp_min(1), rtol=1e-5, atol=1e-9)
            merged = scores.criterion("reap")[pos, e]
            assert float(merged) == pytest.approx(float(sal.sum() / n.sum()), rel=1e-5)


def test_scores_file_round_trip_and_criteria(tmp_path):
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    scores, _ = score_experts(model, adapter, blocks(), batch_size=4, progress=False)
    path = scores.save(tmp_path / "expert_scores.safetensors")
    back = ExpertScores.load(tmp_path)  # a run directory works too
    assert back.layer_names == ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]
    assert back.group_names == ["code", "prose"] and back.top_k == [2, 2]
    for name in ("tokens", "counts", "gate_mass", "saliency_sum", "norm_sum"):
        assert torch.equal(getattr(back, name), getattr(scores, name))
    assert back.criterion("frequency").shape == (2, 8)
    assert torch.equal(back.criterion("frequency"), scores.counts.sum(1).double())
    # every real token selects top-k = 2 experts
    assert int(back.counts.sum()) == 2 * 2 * int(blocks().attention_mask.sum())
    with pytest.raises(ValueError, match=r"criterion='nope': expected one of \['frequency', 'gate_mass', 'reap'"):
        back.criterion("nope")
    from moesurgeon.probe import UsageStats

    usage, _ = profile_usage(model, adapter, blocks(), batch_size=4, progress=False)
    usage.save(tmp_path / "usage.safetensors")
    with pytest.raises(ValueError, match="not a moesurgeon expert-scores file"):
        ExpertScores.load(tmp_path / "usage.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        ExpertScores.load(tmp_path / "missing.safetensors")
    assert path.exists() and UsageStats.load(tmp_path / "usage.safetensors").counts.shape == (2, 2, 8)
