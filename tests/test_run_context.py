"""The run context and the one way from config to typed settings: defaults, conversion errors, the export
target, config.json read once, metrics.json written by the runner also for a failed run."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

import moesurgeon.model_source as model_source
from moesurgeon.config import config_dir
from moesurgeon.errors import ConfigError, ExportRefusedError
from moesurgeon.lora import RouterLoraSpec, TrainConfig
from moesurgeon.recipes.convert import defaults_of, to_settings
from moesurgeon.recipes.settings import (
    RECIPES, RoleRouterSettings, RouterLoraSettings, RouterUsageSettings, TopkOverrideSettings, UsageDiffSettings,
)
from moesurgeon.routers.distill import DistillConfig
from moesurgeon.run_context import DataSettings, ExportSettings, ExportTarget
from moesurgeon.runner import build_context, run_experiment
from helpers_hydra import compose_cfg
from tiny_models import write_tiny_jsonl


# ----------------------------------------------------------------------------- settings: defaults in one place
def test_each_experiment_config_selects_its_defaults_and_only_overrides():
    for name, recipe in RECIPES.items():
        text = (config_dir() / "experiment" / f"{name}.yaml").read_text()
        assert f"python -m moesurgeon experiment={name}" in text, name
        raw = yaml.safe_load(text)
        assert f"/{name}: default" in [e if isinstance(e, str) else f"{next(iter(e))}: {next(iter(e.values()))}"
                                       for e in raw["defaults"]], name
        known = {f.name for f in fields(recipe.settings)}
        assert set(raw.get(name) or {}) <= known, (name, set(raw[name]) - known)


def test_composed_defaults_are_the_dataclass_defaults():
    lora = to_settings(RouterLoraSettings, compose_cfg(["experiment=router_lora", "seed=7"]).router_lora,
                       "router_lora")
    assert lora == RouterLoraSettings(train=TrainConfig(seed=7))  # the experiment ties the data order to `seed`
    assert lora.lora == RouterLoraSpec(rank=4) and lora.train.steps == 80 and lora.train.betas == (0.9, 0.999)
    role = to_settings(RoleRouterSettings, compose_cfg(["experiment=role_router"]).role_router, "role_router")
    assert role.export.distill == DistillConfig() and sorted(role.roles) == ["code", "english", "math", "russian"]
    assert role.router == {"_target_": "moesurgeon.routers.RoleAwareRouter"}
    assert to_settings(TopkOverrideSettings, compose_cfg(["experiment=topk_override"]).topk_override,
                       "topk_override") == TopkOverrideSettings(top_k=4)
    assert defaults_of(UsageDiffSettings) == {"a": "???", "b": "???", "name_a": None, "name_b": None}
    assert compose_cfg(["experiment=router_usage"]).export.enabled is False
    assert compose_cfg(["experiment=topk_override"]).export.enabled is True


def test_router_group_lands_under_role_router():
    cfg = compose_cfg(["experiment=role_router", "router=expert_mask", "role_router.router.experts=[3,7]"])
    assert dict(cfg.role_router.router) == {"_target_": "moesurgeon.routers.ExpertMaskRouter", "experts": [3, 7]}
    assert "router" not in cfg


# ----------------------------------------------------------------------------- the conversion
@pytest.mark.parametrize("values, message", [
    ({"trace": "yes"}, r"^router_usage.trace='yes': expected true or false$"),
    ({"trace_max_rows": 2.5}, r"^router_usage.trace_max_rows=2.5: expected an integer$"),
    ({"coact_layer": [1]}, r"^router_usage.coact_layer=\[1\]: expected an integer or text or null$"),
    ({"traec": True}, r"^router_usage.traec is not a setting of router_usage; its settings are: coact_layer, trace, "),
])
def test_conversion_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        to_settings(RouterUsageSettings, values, "router_usage")


def test_conversion_types():
    assert to_settings(RouterUsageSettings, {"coact_layer": "model.layers.1.mlp.gate"}, "u").coact_layer == \
        "model.layers.1.mlp.gate"
    assert to_settings(TopkOverrideSettings, {"top_k": {0: 1, 3: 4}}, "t").top_k == {0: 1, 3: 4}
    with pytest.raises(ConfigError, match=r"^t.top_k=True: expected an integer or a mapping"):
        to_settings(TopkOverrideSettings, {"top_k": True}, "t")
    lora = to_settings(RouterLoraSettings, {"resume": "auto", "lora": {"alpha": 8}, "train": {"betas": [0.8, 0.9]}},
                       "router_lora")
    assert lora.resume == "auto" and lora.lora.alpha == 8.0 and lora.train.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match=r"^router_lora.train.betas=\[0.9\]: expected a list of a number"):
        to_settings(RouterLoraSettings, {"train": {"betas": [0.9]}}, "router_lora")
    with pytest.raises(ConfigError, match=r"^usage_diff.b is not set: pass usage_diff.b=VALUE$"):
        to_settings(UsageDiffSettings, {"a": "x.safetensors", "b": "???"}, "usage_diff")
    with pytest.raises(ConfigError, match=r"^data.block_size='big': expected an integer$"):
        to_settings(DataSettings, {"block_size": "big"}, "data")


# ----------------------------------------------------------------------------- the context
def test_export_target_is_resolved_once(tmp_path):
    own = ExportTarget.resolve(ExportSettings(enabled=True), tmp_path / "run")
    assert own.dir == tmp_path / "run" / "checkpoint" and own.owned and own.options.overwrite
    given = ExportTarget.resolve(ExportSettings(enabled=True, dir=str(tmp_path / "x"), link="copy"), tmp_path / "run",
                                 allow_pickle=True)
    assert given.dir == tmp_path / "x" and not given.owned and not given.options.overwrite
    assert given.options.link == "copy" and given.options.allow_pickle


def test_context_reads_config_once_and_seeds(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint("qwen3_moe")
    data = write_tiny_jsonl(tmp_path / "eval.jsonl")
    reads = []
    original = model_source.read_config_json
    monkeypatch.setattr(model_source, "read_config_json", lambda d: reads.append(d) or original(d))
    cfg = compose_cfg(["experiment=topk_override", "topk_override.top_k=1", f"model.path={ckpt}", "data=jsonl",
                       f"data.heldout.path={data}", "data.label_field=domain", "data.block_size=32", "seed=11",
                       "progress=false"])
    ctx = build_context(cfg, "topk_override", tmp_path / "ctx")
    assert torch.initial_seed() == 11 and ctx.seed == 11 and ctx.batch_size == 8
    assert ctx.adapter.model_type == "qwen3_moe" and ctx.adapter.num_experts_from_config(ctx.model_config) == 8
    assert ctx.source_dir == ckpt
    assert ctx.export.enabled and ctx.export.dir == tmp_path / "ctx" / "checkpoint"
    assert len(reads) == 1
    metrics = run_experiment(cfg, tmp_path / "run")  # the whole run builds its own context: one more read
    assert len(reads) == 2 and metrics["export/tensors_replaced"] == 0


def test_context_without_model(tmp_path):
    cfg = compose_cfg(["experiment=usage_diff", "usage_diff.a=a", "usage_diff.b=b", "model=local"])
    ctx = build_context(cfg, "usage_diff", tmp_path, loads_model=False)  # model=local without a path: not read
    assert ctx.model is None and ctx.model_config is None and ctx.adapter is None
    with pytest.raises(RuntimeError, match="experiment usage_diff loads no model"):
        ctx.load_tokenizer()


# ----------------------------------------------------------------------------- the runner's metrics.json
def test_failed_run_writes_metrics_with_the_error(tmp_path, monkeypatch):
    import moesurgeon.recipes.usage_diff as usage_diff

    def refuse(ctx, settings):
        raise ExportRefusedError("not good enough", {"export/done": False, "before/ppl/all": 3.5})

    monkeypatch.setattr(usage_diff, "run", refuse)
    cfg = compose_cfg(["experiment=usage_diff", "usage_diff.a=a", "usage_diff.b=b"])
    with pytest.raises(ExportRefusedError):
        run_experiment(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["experiment"] == "usage_diff" and saved["success"] is False
    assert saved["error"] == "ExportRefusedError: not good enough"
    assert saved["export/done"] is False and saved["before/ppl/all"] == 3.5

    with pytest.raises(ConfigError, match=r"usage_diff.b is not set"):  # a settings mistake is recorded too
        run_experiment(compose_cfg(["experiment=usage_diff", "usage_diff.a=a"]), tmp_path / "bad")
    assert json.loads((tmp_path / "bad" / "metrics.json").read_text())["error"].startswith("ConfigError: ")


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    import moesurgeon.recipes.usage_diff as usage_diff

    monkeypatch.setattr(usage_diff, "run", lambda ctx, settings: {"main": ctx.main_process})
    monkeypatch.setenv("RANK", "1")
    metrics = run_experiment(compose_cfg(["experiment=usage_diff", "usage_diff.a=a", "usage_diff.b=b"]), tmp_path)
    assert metrics["main"] is False and metrics["success"] is True
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "config_resolved.yaml").exists()
    assert Path(tmp_path).is_dir()
