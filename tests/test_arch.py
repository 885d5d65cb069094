"""Architecture adapters on tiny random models of every supported family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moesurgeon.arch import UnsupportedModelError, get_adapter, supported_model_types
from tiny_models import EXPECTED_MOE_LAYERS, tiny_model


def test_supported_families_cover_the_card():
    assert set(supported_model_types()) >= {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"}


def test_moe_layers_skip_dense_layers_and_name_routers(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    assert [l.index for l in layers] == EXPECTED_MOE_LAYERS[family]
    modules = dict(model.named_modules())
    for layer in layers:
        assert modules[layer.router_name] is layer.router, layer.router_name
        assert layer.num_experts == 8
        assert adapter.get_top_k(layer) == 2


def test_routing_matches_router_output(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[-1]
    seen = []
    h = layer.router.register_forward_hook(lambda m, i, o: seen.append(adapter.routing(layer, o)))
    try:
        model(torch.randint(3, 96, (2, 5)))
    finally:
        h.remove()
    r = seen[0]
    assert r.probs.shape == (10, 8) and r.indices.shape == (10, 2) and r.weights.shape == (10, 2)
    assert torch.isfinite(r.probs).all()
    if adapter.scoring == "softmax":
        torch.testing.assert_close(r.probs.sum(-1), torch.ones(10))
    # the selected experts are among the highest-scored ones the family could choose
    assert (r.indices >= 0).all() and (r.indices < 8).all()


def test_set_top_k_changes_selection_and_restores(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[-1]
    previous = adapter.set_top_k(model, 3)
    assert set(previous.values()) == {2}
    seen = []
    h = layer.router.register_forward_hook(lambda m, i, o: seen.append(o[2].shape[-1]))
    try:
        model(torch.randint(3, 96, (1, 4)))
    finally:
        h.remove()
    assert seen == [3]
    assert model.config.num_experts_per_tok == 3
    adapter.set_top_k(model, previous)
    assert all(adapter.get_top_k(l) == 2 for l in adapter.moe_layers(model))


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_set_top_k_out_of_range_is_refused(bad):
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match=rf"top_k={bad}.*\[1, 8\]"):
        get_adapter(model).set_top_k(model, bad)


def test_deepseek_top_k_limited_by_groups():
    model = tiny_model("deepseek_v3", topk_group=1)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        get_adapter(model).set_top_k(model, 5)


def test_router_tensor_names_on_disk(tiny_checkpoint, family):
    from safetensors import safe_open
    import json

    ckpt = tiny_checkpoint(family)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    adapter = get_adapter(model)
    for layer in adapter.moe_layers(model):
        for mem, disk in adapter.router_tensor_names(layer).items():
            assert disk in index, f"{mem} -> {disk} not on disk; router keys on disk: " + str(
                [k for k in index if ".gate." in k or ".router." in k][:6])
        if adapter.expert_disk_suffixes is not None:
            for name in adapter.expert_disk_names(layer, 7):
                assert name in index, name
    assert adapter.num_experts_from_config(json.loads((ckpt / "config.json").read_text())) == 8


def test_dense_and_unknown_models_are_refused():
    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError, match=r"'llama' is not supported.*qwen3_moe"):
        get_adapter(llama)
    with pytest.raises(UnsupportedModelError, match="no `model_type`"):
        get_adapter({"hidden_size": 3})
    # a supported family whose every layer is dense
    dense = tiny_model("qwen3_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(UnsupportedModelError, match="looks dense"):
        get_adapter(dense).moe_layers(dense)


def test_lora_target_parameters_exist(family):
    model = tiny_model(family)
    targets = get_adapter(model).lora_target_parameters()
    names = [n for n, _ in model.named_parameters()]
    for t in targets:
        assert any(n.endswith(t) for n in names), (t, [n for n in names if "gate" in n or "router" in n])


def test_route_from_logits_reproduces_the_family_router(family):
    """Custom routers rely on this: selection from logits must equal the family's own router."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    for layer in adapter.moe_layers(model):
        h = torch.randn(12, model.config.hidden_size)
        logits, weights, indices = layer.router(h)
        _, w2, i2 = adapter.route_from_logits(layer, logits)
        order, order2 = indices.sort(-1), i2.sort(-1)
        assert torch.equal(order.values, order2.values), (family, indices, i2)
        torch.testing.assert_close(weights.gather(1, order.indices), w2.gather(1, order2.indices))


def test_route_from_logits_never_picks_masked_experts(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[-1]
    logits = layer.router(torch.randn(16, model.config.hidden_size))[0].clone()
    logits[:, :3] = float("-inf")  # experts 0-2 masked
    if hasattr(layer.router, "e_score_correction_bias"):
        with torch.no_grad():
            layer.router.e_score_correction_bias[:3] = 10.0  # a bias that would otherwise pick them
    _, weights, indices = adapter.route_from_logits(layer, logits)
    assert (indices >= 3).all(), indices
    assert torch.isfinite(weights).all()
