"""ExpertMaskRouter / StaticBiasRouter: masked experts are never chosen, weights renormalise as the family does."""

import pytest
import torch

from moesurgeon.arch import get_adapter
from moesurgeon.routers import ExpertMaskRouter, RouterConfigError, StaticBiasRouter, resolve_mask, substitute_routers
from tiny_models import tiny_model

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_experts_never_selected(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    if family == "deepseek_v3":
        # large correction biases on the masked experts: -inf logits alone would leave them choosable
        with torch.no_grad():
            for layer in adapter.moe_layers(model):
                layer.router.e_score_correction_bias[[0, 3]] = 5.0
    hidden = torch.randn(64, 32)
    with substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, experts={layer.index: [0, 3]})):
        for layer in adapter.moe_layers(model):
            logits, weights, indices = layer.router(hidden)
            assert not torch.isin(indices, torch.tensor([0, 3])).any()
            assert torch.isfinite(weights).all()


def test_softmax_family_weights_are_softmax_over_remaining():
    model = tiny_model("qwen3_moe", norm_topk_prob=False)  # no renormalisation: the weights show the softmax
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0]
    hidden = torch.randn(16, 32)
    raw = torch.nn.functional.linear(hidden, layer.router.weight)
    keep = [e for e in range(8) if e not in (1, 4)]
    probs = torch.softmax(raw[:, keep], dim=-1)
    with substitute_routers(model, adapter, lambda l: ExpertMaskRouter(l, adapter, experts=[1, 4])):
        _, weights, indices = layer.router(hidden)
    expected = probs.gather(1, torch.tensor([[keep.index(int(e)) for e in row] for row in indices]))
    assert torch.allclose(weights, expected, atol=1e-6)


def test_mask_errors():
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    with pytest.raises(RouterConfigError, match=r"expert index 8 is out of range.*8 experts per layer, indices 0\.\.7"):
        resolve_mask([8], layers, 2)
    with pytest.raises(RouterConfigError, match=r"disables 7 of 8 experts, leaving 1, fewer than top-k=2"):
        resolve_mask(list(range(7)), layers, 2)
    with pytest.raises(RouterConfigError, match=r"names layer 1, which is not an MoE layer.*\[0, 2\]"):
        resolve_mask({1: [0]}, layers, 2)
    with pytest.raises(RouterConfigError, match="expected a list of expert indices"):
        resolve_mask("3", layers, 2)
    assert resolve_mask({2: [5, 1, 5]}, layers, 2) == {2: [1, 5]}


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "qwen3_moe"])
def test_static_bias_router(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    with substitute_routers(model, adapter, lambda layer: StaticBiasRouter(layer, adapter, {6: 100.0})) as swap:
        space = next(iter(swap.routers.values())).space
        assert space == ("choice" if family == "deepseek_v3" else "logits")
        for layer in adapter.moe_layers(model):
            assert (layer.router(torch.randn(9, 32))[2] == 6).any(dim=-1).all()
    if family != "deepseek_v3":
        with pytest.raises(RouterConfigError, match="space='choice' needs a family"):
            StaticBiasRouter(adapter.moe_layers(model)[0], adapter, {}, "choice")
