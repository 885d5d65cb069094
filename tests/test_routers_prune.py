"""Exact exports: a mask as a pruned checkpoint (plain transformers reload == masked model), a static bias
as the family's router bias, and the refusals where a standard checkpoint cannot express the surgery."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moesurgeon.arch import get_adapter
from moesurgeon.export import ExportOptions, export_patched_model
from moesurgeon.io import CheckpointError, CheckpointReader
from moesurgeon.routers import ExpertMaskRouter, RouterConfigError, StaticBiasRouter, substitute_routers
from moesurgeon.surgery import check_bias_export, export_pruned, plan_prune, write_static_bias
from moesurgeon.surgery.prune_experts import prune_checkpoint, read_config

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


# -- prune_checkpoint: config.json and shard headers only, no model loaded ------------------------------------


def _series(out) -> list[str]:
    names = sorted(p.name for p in out.glob("*.safetensors"))
    return names if names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)] \
        else pytest.fail(f"shards not one series: {names}")


def _masked_logits(src, removed):
    model = _load(src)
    adapter = get_adapter(model)
    with substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, experts=removed)), \
            torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_prune_checkpoint_equals_masked_model(tiny_checkpoint, tmp_path, family):
    src = tiny_checkpoint(family)
    config = read_config(src)
    adapter = get_adapter(config)
    removed = {i: [1, 6] if i % 2 else [0, 5] for i in adapter.moe_layer_indices(config)}
    report = prune_checkpoint(src, tmp_path / "pruned", adapter, config, removed)
    assert "exact: True" in report.notes[-1]
    _series(tmp_path / "pruned")
    with torch.no_grad():
        got = _load(tmp_path / "pruned")(input_ids=IDS).logits
    assert (got - _masked_logits(src, removed)).abs().max() < 1e-5
    out_cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert {out_cfg[k] for k in adapter.num_experts_keys if config.get(k) is not None} == {6}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_prune_fused_layout(tiny_checkpoint, tmp_path, family):
    """A transformers-5 fused save (`save_original_format=False`: fused experts, in-memory block names, one file)
    prunes by slicing dim 0, with and without a loaded model, and the two exports agree."""
    from tiny_models import tiny_model

    src = tmp_path / "fused"
    tiny_model(family).save_pretrained(src, save_original_format=False)
    config = read_config(src)
    adapter = get_adapter(config)
    removed = {i: [2, 7] for i in adapter.moe_layer_indices(config)}
    prune_checkpoint(src, tmp_path / "disk", adapter, config, removed)
    model = _load(src)
    with substitute_routers(model, adapter, lambda layer: ExpertMaskRouter(layer, adapter, experts=removed)):
        metrics = export_pruned(model, adapter, src, tmp_path / "loaded", ExportOptions(), removed, IDS)
    assert metrics["export/max_abs_logit_diff"] < 1e-5
    disk, loaded = CheckpointReader(tmp_path / "disk"), CheckpointReader(tmp_path / "loaded")
    assert set(disk.tensor_names()) == set(loaded.tensor_names())
    assert all(torch.equal(disk.get(n), loaded.get(n)) for n in disk.tensor_names())
    fused = next(n for n in disk.tensor_names() if n.endswith("experts.gate_up_proj"))
    # the single source file, trimmed, then the new shard of sliced tensors: one series, no model.safetensors left
    assert disk.header(fused).shape[0] == 6 and len(_series(tmp_path / "disk")) == 2


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_values_replace_disk_content_before_slice_and_rename(tiny_checkpoint, tmp_path, family):
    """values= (source numbering): a kept expert that keeps its index (2), one that is renumbered (6 -> 4) and
    the router rows land in their new slots; the rest is the source's."""
    src = tiny_checkpoint(family)
    config = read_config(src)
    adapter = get_adapter(config)
    layers = adapter.moe_layer_indices(config)
    L = layers[0]
    removed = {i: [4, 5] for i in layers}
    reader = CheckpointReader(src)
    block = adapter.disk_block_prefix(L)
    router = f"{block}.{adapter.router_attr}.weight"
    values = {router: reader.get(router).clone()}
    values[router][6] = 0.5
    if adapter.expert_disk_suffixes is None:  # fused: one tensor, rows in source numbering
        fused = f"{block}.experts.gate_up_proj"
        values[fused] = reader.get(fused).clone()
        values[fused][2], values[fused][6] = 0.25, -0.25
    else:
        for e, fill in ((2, 0.25), (6, -0.25)):
            for n in adapter.expert_tensor_names(config, L, e):
                values[n] = torch.full_like(reader.get(n), fill)
    prune_checkpoint(src, tmp_path / "out", adapter, config, removed, values=values)
    out = CheckpointReader(tmp_path / "out")
    keep = [0, 1, 2, 3, 6, 7]
    assert torch.equal(out.get(router), values[router][keep]) and bool((out.get(router)[4] == 0.5).all())
    if adapter.expert_disk_suffixes is None:
        assert torch.equal(out.get(fused), values[fused][keep])
    else:
        for new, fill in ((2, 0.25), (4, -0.25)):
            assert all(bool((out.get(n) == fill).all()) for n in adapter.expert_tensor_names(config, L, new))
        src_name = adapter.expert_tensor_names(config, L, 7)[0]
        assert torch.equal(out.get(adapter.expert_tensor_names(config, L, 5)[0]), reader.get(src_name))
    other = f"{adapter.disk_block_prefix(layers[1])}.{adapter.router_attr}.weight"
    assert torch.equal(out.get(other), reader.get(other)[keep])


def test_prune_checkpoint_bad_input_writes_nothing(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    config = read_config(src)
    adapter = get_adapter(config)
    layers = adapter.moe_layer_indices(config)
    removed = {i: [4, 5] for i in layers}
    reader = CheckpointReader(src)
    w = adapter.expert_tensor_names(config, layers[0], 2)[0]
    out = tmp_path / "out"
    cases = [
        ({"values": {"model.nope.weight": torch.zeros(2)}}, removed, "values\\['model.nope.weight'\\]: the checkpoint has "
                                                                    "no such tensor"),
        ({"values": {w: reader.get(w).double()}}, removed, r"is F64 \[.*but the checkpoint stores F32"),
        ({"values": {w: reader.get(w)[:1]}}, removed, "give the full tensor in source numbering"),
        ({"values": {adapter.expert_tensor_names(config, layers[0], 4)[0]: reader.get(w)}}, removed,
         "expert 4 of layer 0 is removed by this prune"),
        ({}, {**removed, 1: [0, 1]}, r"names layers \[1\], which are not MoE layers"),
        ({}, {i: [4, 8] for i in layers}, r"experts \[8\] out of range 0..7"),
        ({}, {i: [4, 4] for i in layers}, "repeated experts"),
    ]
    for kwargs, mask, message in cases:
        with pytest.raises((ValueError,), match=message):
            prune_checkpoint(src, out, adapter, config, mask, **kwargs)
        assert not out.exists()
    out.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        prune_checkpoint(src, out, adapter, config, removed)


def test_prune_checkpoint_inexact_groups(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("deepseek_v3", topk_group=1)
    config = read_config(src)
    adapter = get_adapter(config)
    uneven = {i: [0, 1] for i in adapter.moe_layer_indices(config)}
    with pytest.raises(RouterConfigError, match="not exact for deepseek_v3.*allow_inexact=True"):
        prune_checkpoint(src, tmp_path / "x", adapter, config, uneven)
    assert not (tmp_path / "x").exists()
    report = prune_checkpoint(src, tmp_path / "x", adapter, config, uneven, allow_inexact=True)
    assert "exact: False" in report.notes[-1] and "unevenly" in report.notes[-1]
