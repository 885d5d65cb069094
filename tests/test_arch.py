"""Architecture adapters on tiny random models of every supported family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moesurgeon.arch import (
    ExpertCountEdits, ExpertCountError, UnsupportedModelError, get_adapter, supported_model_types,
)
from tiny_models import EXPECTED_MOE_LAYERS, FAMILY_CONFIGS, tiny_model


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
    seen, outputs = [], []

    def record(module, args, output):  # returns None: the router's output stays as it is
        seen.append(adapter.routing(layer, output))
        outputs.append(output)

    h = layer.router.register_forward_hook(record)
    try:
        model(torch.randint(3, 96, (2, 5)))
    finally:
        h.remove()
    r, (logits, weights, indices) = seen[0], outputs[0]
    assert r.probs.shape == (10, 8) and r.indices.shape == (10, 2) and r.weights.shape == (10, 2)
    # probabilities over all experts: the family's scoring of the router's own logits, bit for bit
    expected = logits.float().sigmoid() if family == "deepseek_v3" else logits.float().softmax(-1)
    assert torch.equal(r.probs, expected)
    assert torch.equal(r.indices, indices) and torch.equal(r.weights, weights.float())
    # the selected experts are the top-2 of what the family ranks (tiny deepseek: its group limit,
    # 2 of 2 groups, excludes nothing)
    best = adapter.choice_scores(layer, logits).topk(2, dim=-1).indices
    assert torch.equal(r.indices.sort(-1).values, best.sort(-1).values)


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
    config = json.loads((ckpt / "config.json").read_text())
    assert adapter.num_experts_from_config(config) == 8
    # the same names from config.json alone, no model: every expert tensor of the checkpoint is found
    assert adapter.moe_layer_indices(config) == EXPECTED_MOE_LAYERS[family]
    for layer in adapter.moe_layers(model):
        mine = sorted(n for n in index if n.startswith(adapter.expert_disk_prefix(layer.index)))
        if adapter.expert_disk_suffixes is None:  # fused on disk: no per-expert name to split
            assert mine and all(adapter.split_expert_name(n, layer.index) is None for n in mine)
        else:
            from_config = sorted(n for e in range(8) for n in adapter.expert_tensor_names(config, layer.index, e))
            assert from_config == mine
            assert from_config == sorted(n for e in range(8) for n in adapter.expert_disk_names(layer, e))
            assert [adapter.expert_tensor_name(layer.index, *adapter.split_expert_name(n, layer.index))
                    for n in mine] == mine
        for space in ("logits", "choice"):
            if adapter.router_bias(layer, space) is not None:
                assert adapter.bias_disk_name(layer.index, space) in index


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
    if adapter.choice_bias(layer) is not None:
        with torch.no_grad():
            adapter.choice_bias(layer)[:3] = 10.0  # a bias that would otherwise pick them
    _, weights, indices = adapter.route_from_logits(layer, logits)
    assert (indices >= 3).all(), indices
    assert torch.isfinite(weights).all()


# ---------------------------------------------------------------- choice bias, group limit, router biases
def test_choice_bias_group_limit_and_router_biases(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    for layer in adapter.moe_layers(model):
        router = layer.router
        choice = router.e_score_correction_bias if family == "deepseek_v3" else None
        assert adapter.choice_bias(layer) is choice
        assert adapter.router_bias(layer, "choice") is choice
        assert adapter.router_bias(layer, "logits") is (router.bias if family == "gpt_oss" else None)
        assert adapter.choice_in_score_space(layer) is (family == "deepseek_v3")
        # tiny deepseek: 2 groups, both usable; no other family limits the choice to groups
        assert adapter.group_limit(layer) == ((2, 2) if family == "deepseek_v3" else None)
    assert adapter.group_limit_from_config(model.config.to_dict()) == ((2, 2) if family == "deepseek_v3" else None)
    with pytest.raises(ValueError, match=r"bias space='weights'"):
        adapter.router_bias(adapter.moe_layers(model)[0], "weights")


@pytest.mark.parametrize("groups, kept, limit, max_k", [(2, 1, (2, 1), 4), (4, 3, (4, 3), 6), (1, 1, None, 8)])
def test_deepseek_group_limit(groups, kept, limit, max_k):
    model = tiny_model("deepseek_v3", n_group=groups, topk_group=kept)
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    assert [adapter.group_limit(layer) for layer in layers] == [limit, limit]
    assert [adapter.max_top_k(layer) for layer in layers] == [max_k, max_k]
    assert adapter.group_limit_from_config(model.config.to_dict()) == limit
    assert adapter.group_limit_from_config({"model_type": "deepseek_v3", "n_routed_experts": 8}) is None


# ---------------------------------------------------------------- config.json alone
@pytest.mark.parametrize("family, overrides, expected", [
    ("qwen2_moe", {"decoder_sparse_step": 2}, [1]),
    ("qwen3_moe", {"mlp_only_layers": [0, 2]}, [1]),
    ("deepseek_v3", {"first_k_dense_replace": 2}, [2]),
])
def test_moe_layer_indices_follow_the_family_rule(family, overrides, expected):
    model = tiny_model(family, **overrides)
    adapter = get_adapter(model)
    assert [layer.index for layer in adapter.moe_layers(model)] == expected
    assert adapter.moe_layer_indices(model.config.to_dict()) == expected


def test_moe_layer_indices_use_the_family_defaults_for_missing_keys():
    qwen = {"model_type": "qwen3_moe", "num_experts": 8, "num_hidden_layers": 4}
    assert get_adapter(qwen).moe_layer_indices(qwen) == [0, 1, 2, 3]  # mlp_only_layers=[], decoder_sparse_step=1
    deepseek = {"model_type": "deepseek_v3", "n_routed_experts": 8, "num_hidden_layers": 5}
    assert get_adapter(deepseek).moe_layer_indices(deepseek) == [3, 4]  # first_k_dense_replace=3
    mixtral = {"model_type": "mixtral", "num_local_experts": 8, "num_hidden_layers": 2}
    assert get_adapter(mixtral).moe_layer_indices(mixtral) == [0, 1]


def test_expert_and_bias_names_from_config_alone():
    mixtral_config = {"model_type": "mixtral", "num_local_experts": 8, "num_hidden_layers": 2}
    mixtral = get_adapter(mixtral_config)
    assert mixtral.expert_tensor_names(mixtral_config, 1, 7) == [
        f"model.layers.1.block_sparse_moe.experts.7.{w}.weight" for w in ("w1", "w2", "w3")]
    # extra per-expert tensors (quantisation scales) split and rebuild too, so pruning renames them along
    scale = "model.layers.1.block_sparse_moe.experts.7.w1.weight_scale"
    assert mixtral.split_expert_name(scale, 1) == (7, "w1.weight_scale")
    assert mixtral.expert_tensor_name(1, 2, "w1.weight_scale") == scale.replace(".7.", ".2.")
    assert mixtral.split_expert_name("model.layers.11.block_sparse_moe.experts.7.w1.weight", 1) is None
    assert mixtral.split_expert_name("model.layers.1.mlp.experts.7.w1.weight", 1) is None
    qwen_config = {"model_type": "qwen3_moe", "num_experts": 4, "num_hidden_layers": 1}
    assert get_adapter(qwen_config).expert_tensor_names(qwen_config, 0, 3) == [
        f"model.layers.0.mlp.experts.3.{p}_proj.weight" for p in ("gate", "up", "down")]
    deepseek_config = {"model_type": "deepseek_v3", "n_routed_experts": 8, "num_hidden_layers": 3,
                       "first_k_dense_replace": 1}
    deepseek = get_adapter(deepseek_config)
    with pytest.raises(ValueError, match=r"layer 0 .* is not an MoE layer; MoE layers are \[1, 2\]"):
        deepseek.expert_tensor_names(deepseek_config, 0, 0)
    with pytest.raises(ValueError, match=r"expert 8: .* has 8 experts per layer, indices 0..7"):
        deepseek.expert_tensor_names(deepseek_config, 1, 8)
    assert deepseek.bias_disk_name(2, "choice") == "model.layers.2.mlp.gate.e_score_correction_bias"
    gpt_config = {"model_type": "gpt_oss", "num_local_experts": 8, "num_hidden_layers": 2}
    gpt = get_adapter(gpt_config)
    assert gpt.bias_disk_name(1, "logits") == "model.layers.1.mlp.router.bias"
    assert gpt.expert_disk_prefix(1) == "model.layers.1.mlp.experts."
    with pytest.raises(UnsupportedModelError, match="fused on disk"):
        gpt.expert_tensor_names(gpt_config, 0, 0)


@pytest.mark.parametrize("family, key", [
    ("qwen3_moe", "num_experts"), ("qwen2_moe", "num_experts"), ("olmoe", "num_experts"),
    ("mixtral", "num_local_experts"), ("gpt_oss", "num_local_experts"), ("deepseek_v3", "n_routed_experts"),
])
def test_expert_count_edits_without_group_limit(family, key):
    adapter = get_adapter({"model_type": family})
    scoring = "sigmoid" if family == "deepseek_v3" else "softmax"
    edits = adapter.expert_count_edits({"model_type": family, key: 8, "hidden_size": 32}, 6, {0: [1, 2], 2: [0, 7]})
    assert edits == ExpertCountEdits({key: 6}, True, f"{scoring} routing over the remaining experts")
    both = {"model_type": family, key: 8, "num_local_experts": 8}  # transformers 5 may write the alias as well
    assert adapter.expert_count_edits(both, 7, {0: [3]}).edits == {k: 7 for k in adapter.num_experts_keys if k in both}
    with pytest.raises(ExpertCountError, match=r"config.json has none of the expert-count keys"):
        adapter.expert_count_edits({"model_type": family}, 6, {0: [1, 2]})


def test_expert_count_edits_with_a_group_limit():
    deepseek = get_adapter({"model_type": "deepseek_v3"})
    config = {"model_type": "deepseek_v3", "n_routed_experts": 8, "n_group": 2, "topk_group": 1}
    assert deepseek.expert_count_edits(config, 6, {1: [0, 4], 2: [3, 7]}) == ExpertCountEdits(
        {"n_routed_experts": 6}, True, "each of the 2 groups loses the same number of experts, so groups stay aligned")
    assert deepseek.expert_count_edits(config, 6, {1: [0, 1], 2: [0, 1]}) == ExpertCountEdits(
        {"n_routed_experts": 6}, False, "the mask removes experts unevenly across the 2 groups (removed per group: "
        "[(2, 0)]), so pruned experts regroup and the group limit (topk_group=1) picks differently")
    with pytest.raises(ExpertCountError, match=r"leaves 7 experts, which n_group=2 does not divide.*group of 4"):
        deepseek.expert_count_edits(config, 7, {1: [0], 2: [0]})
    # a limit that excludes nothing becomes one group
    assert deepseek.expert_count_edits({**config, "topk_group": 2}, 7, {1: [0]}) == ExpertCountEdits(
        {"n_routed_experts": 7, "n_group": 1, "topk_group": 1}, True,
        "topk_group=2 >= n_group=2: the group limit excludes nothing, so the pruned config uses one group")
    # groups of 2 losing one each keep a single expert: group scores (best two) change, so not exact
    four = {**config, "n_group": 4}
    assert deepseek.expert_count_edits(four, 4, {1: [0, 2, 4, 6]}) == ExpertCountEdits(
        {"n_routed_experts": 4}, False, "the mask removes experts unevenly across the 4 groups (removed per group: "
        "[(1, 1, 1, 1)]), so pruned experts regroup and the group limit (topk_group=1) picks differently")



@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_run_expert_is_one_expert_of_the_block(family):
    """Experts e and f with weights (w, 1-w) for every token == w*E_e + (1-w)*E_f: run_expert runs one expert."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[-1]
    hidden = torch.randn(5, model.config.hidden_size)
    index = torch.tensor([[2, 3]] * 5)
    weight = torch.tensor([[0.3, 0.7]] * 5)
    with torch.no_grad():
        both = getattr(layer.block, adapter.experts_attr)(hidden, index, weight)
        two, three = adapter.run_expert(layer, hidden, 2), adapter.run_expert(layer, hidden, 3)
    torch.testing.assert_close(both, 0.3 * two + 0.7 * three, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(two, three)
