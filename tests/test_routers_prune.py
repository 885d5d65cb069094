"""Exact exports: a mask as a pruned checkpoint (plain transformers reload == masked model), a static bias
as the family's router bias, and the refusals where a standard checkpoint cannot express the surgery."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moesurgeon.arch import get_adapter
from moesurgeon.export import ExportOptions, export_patched_model
from moesurgeon.io import CheckpointReader
from moesurgeon.routers import ExpertMaskRouter, RouterConfigError, StaticBiasRouter, substitute_routers
from moesurgeon.surgery import check_bias_export, export_pruned, plan_prune, write_static_bias
from moesurgeon.surgery.prune_experts import read_config

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_pruned_checkpoint_equals_masked_model(tiny_checkpoint, tmp_path, family):
    src = tiny_checkpoint(family)
    model = _load(src)
    adapter = get_adapter(model)
    mask = {layer.index: [1, 6] if layer.index % 2 else [0, 5] for layer in adapter.moe_layers(model)}
    with substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, experts=mask)):
        metrics = export_pruned(model, adapter, src, tmp_path / "pruned", ExportOptions(), mask, IDS)
        masked = model(input_ids=IDS).logits
    assert metrics["export/exact"] and metrics["export/verified_reload"]
    assert metrics["export/max_abs_logit_diff"] < 1e-5
    pruned = _load(tmp_path / "pruned")  # plain transformers, no custom code
    assert (pruned(input_ids=IDS).logits - masked).abs().max() < 1e-5
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    source_config = read_config(src)
    for key in adapter.num_experts_keys:
        if source_config.get(key) is not None:
            assert config[key] == 6
    layer = adapter.moe_layers(pruned)[0]
    assert layer.num_experts == 6
    # kept experts are the old ones, renumbered in order
    old = adapter.moe_layers(model)[0]
    keep = [e for e in range(8) if e not in mask[old.index]]
    assert torch.equal(layer.router.weight, old.router.weight[keep])
    with CheckpointReader(tmp_path / "pruned") as reader:
        assert not any(f".experts.{e}." in n for n in reader.tensor_names() for e in (6, 7))


def test_deepseek_uneven_groups(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("deepseek_v3", topk_group=1)  # group limit active: 2 groups of 4, one kept per token
    model = _load(src)
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    even = {layer.index: [0, 4] for layer in layers}  # one expert out of each group
    assert plan_prune(adapter, read_config(src), layers, even, 2).exact
    uneven = {layer.index: [0, 1] for layer in layers}  # both from group 0: groups regroup after renumbering
    plan = plan_prune(adapter, read_config(src), layers, uneven, 2)
    assert not plan.exact and "unevenly" in plan.reason
    with pytest.raises(RouterConfigError, match=r"n_group=2 does not divide"):
        plan_prune(adapter, read_config(src), layers, {layer.index: [0] for layer in layers}, 2)
    with substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, experts=even)):
        exact = export_pruned(model, adapter, src, tmp_path / "even", ExportOptions(), even, IDS)  # verified reload
    assert exact["export/exact"] and exact["export/max_abs_logit_diff"] < 1e-5
    assert json.loads((tmp_path / "even" / "config.json").read_text())["n_group"] == 2
    with substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, experts=uneven)):
        with pytest.raises(RouterConfigError, match="not exact for deepseek_v3.*allow_inexact"):
            export_pruned(model, adapter, src, tmp_path / "x", ExportOptions(), uneven, IDS)
        metrics = export_pruned(model, adapter, src, tmp_path / "inexact", ExportOptions(), uneven, IDS,
                                allow_inexact=True)
        masked = model(input_ids=IDS).logits.float()
    # the reported deviation is the measured one: the written checkpoint reloaded against the masked model
    with torch.no_grad():
        deviation = float((_load(tmp_path / "inexact")(input_ids=IDS).logits.float() - masked).abs().max())
    assert metrics["export/exact"] is False and metrics["export/max_abs_logit_diff"] == deviation
    assert deviation > 1e-3  # regrouped experts route differently: the export really is inexact
    assert json.loads((tmp_path / "inexact" / "config.json").read_text())["n_routed_experts"] == 6


def test_prune_refusals(tiny_checkpoint):
    src = tiny_checkpoint("qwen3_moe")
    model = _load(src)
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    with pytest.raises(RouterConfigError, match=r"removes \{0: 1, 2: 2\} experts per MoE layer.*same number"):
        plan_prune(adapter, read_config(src), layers, {0: [1], 2: [1, 2]}, 2)
    with pytest.raises(RouterConfigError, match="removes no expert"):
        plan_prune(adapter, read_config(src), layers, {}, 2)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_static_bias_into_family_tensor(tiny_checkpoint, tmp_path, family):
    src = tiny_checkpoint(family)
    model = _load(src)
    adapter = get_adapter(model)
    bias = {1: 0.7, 4: -0.5}
    with substitute_routers(model, adapter, lambda layer: StaticBiasRouter(layer, adapter, bias)) as swap:
        custom = {i: r for i, r in swap.routers.items()}
        expected = model(input_ids=IDS).logits
    space = next(iter(custom.values())).space
    write_static_bias(model, adapter, {i: r.bias for i, r in custom.items()}, space)
    assert (model(input_ids=IDS).logits - expected).abs().max() < 1e-5  # the bias tensor does what the router did
    metrics = export_patched_model(model, adapter, src, tmp_path / "biased", ExportOptions(), probe_input_ids=IDS)
    assert metrics["export/verified_reload"] and metrics["export/tensors_replaced"] == len(custom)
    assert (_load(tmp_path / "biased")(input_ids=IDS).logits - expected).abs().max() < 1e-5


def test_static_bias_refused_without_family_tensor(tiny_checkpoint):
    model = _load(tiny_checkpoint("qwen3_moe"))
    adapter = get_adapter(model)
    with pytest.raises(RouterConfigError, match=r"qwen3_moe routers have no `bias` tensor.*export.mode=distill"):
        check_bias_export(adapter, adapter.moe_layers(model), "logits")
