"""Router LoRA (moesurgeon.lora + experiment=router_lora) on tiny random models: what trains, what
stays bit-identical, the loss, resume after a kill, bad input, and the experiment end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from moesurgeon.arch import ArchAdapter, get_adapter
from moesurgeon.data import DataError
from moesurgeon.errors import ConfigError
from moesurgeon.lora import (
    ResumeError, RouterLoraError, RouterLoraSpec, TrainConfig, TrainConfigError, find_resume_dir,
    load_balancing_loss, lora_state, lora_targets, merge_routers, trainable_report, wrap_routers,
)
from moesurgeon.lora.checkpointing import check_compatible
from moesurgeon.lora.data_stream import BlockStream
from moesurgeon.lora.schedule import lr_factor
from moesurgeon.recipes.convert import to_settings
from moesurgeon.recipes.settings import RouterLoraSettings
from helpers_lora import random_blocks, train_tiny
from tiny_models import tiny_model, write_tiny_jsonl

TRAIN_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]


# ----------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("family", TRAIN_FAMILIES)
def test_only_routers_change_everything_else_bit_identical(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    router_weights = {f"{l.router_name}.weight" for l in layers}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    peft_model = train_tiny(model, tmp_path)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    assert len(trainable) == 2 * len(layers)  # A and B per router, nothing else
    report = trainable_report(peft_model)
    assert 0 < report["trainable_share"] < 0.05

    merged = merge_routers(peft_model)
    after = merged.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == router_weights, f"changed {sorted(changed - router_weights)}; unchanged routers {sorted(router_weights - changed)}"


def test_lora_targets_follow_the_router_kind():
    assert lora_targets(tiny_model("qwen3_moe"), get_adapter(tiny_model("qwen3_moe"))).target_parameters == ["mlp.gate.weight"]
    assert lora_targets(tiny_model("gpt_oss"), get_adapter(tiny_model("gpt_oss"))).target_parameters == ["mlp.router.weight"]

    # a family whose router is a plain nn.Linear gets classic target_modules
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4, bias=False)
            self.gate.num_experts = 4

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Module() for _ in range(2)])
            for layer in self.layers:
                layer.mlp = Block()

    class LinearAdapter(ArchAdapter):
        router_class_names = ("Linear",)

    targets = lora_targets(Toy(), LinearAdapter("toy"))
    assert targets.target_modules == ["mlp.gate"] and targets.target_parameters == []


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss"])
def test_aux_loss_equals_transformers_own(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.randint(3, 90, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    k = adapter.get_top_k(adapter.moe_layers(model)[0])
    ours = load_balancing_loss(out.router_logits, k, mask, adapter)
    torch.testing.assert_close(ours, out.aux_loss.float(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- resume
class Killed(Exception):
    pass


def test_resume_after_kill_gives_identical_weights(tmp_path):
    opts = dict(steps=6, save_every=2, grad_accum=2, batch_size=3)  # 12 blocks / 6 per step: crosses epochs
    straight = lora_state(train_tiny(tiny_model("qwen3_moe"), tmp_path / "a", **opts))

    def kill(step):
        if step == 5:  # after the checkpoint at 4: step 5 is lost, as with a real kill
            raise Killed

    with pytest.raises(Killed):
        train_tiny(tiny_model("qwen3_moe"), tmp_path / "b", on_step=kill, **opts)
    ckpt = find_resume_dir(True, tmp_path / "b")
    assert ckpt.name == "step-000004"
    resumed = lora_state(train_tiny(tiny_model("qwen3_moe"), tmp_path / "b", resume_from=ckpt, **opts))
    assert set(resumed) == set(straight)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "b" / "train_state").iterdir())


def test_resume_refuses_a_different_config(tmp_path):
    train_tiny(tiny_model("qwen3_moe"), tmp_path, steps=2)
    ckpt = find_resume_dir(True, tmp_path)
    other = {"train": TrainConfig(steps=2, lr=2e-2, warmup_steps=1, batch_size=4).result_settings()}
    with pytest.raises(ResumeError, match=r"different training configuration.*train\.lr: 0\.01 -> 0\.02"):
        check_compatible(ckpt, other, world_size=1)
    with pytest.raises(ResumeError, match="holds no checkpoint"):
        find_resume_dir(True, tmp_path / "elsewhere")
    assert find_resume_dir("auto", tmp_path / "elsewhere") is None


# ----------------------------------------------------------------------------- pieces
def test_block_stream_splits_a_global_batch_between_processes():
    blocks = random_blocks(n=10)
    single = BlockStream(blocks, 4, seed=3)
    ranks = [BlockStream(blocks, 2, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(4):  # crosses an epoch boundary
        together = torch.cat([s.next_batch()["input_ids"] for s in ranks])
        assert torch.equal(together, single.next_batch()["input_ids"])


def test_schedule_warms_up_and_decays():
    assert lr_factor(0, 10, 2, "cosine", 0.0) == 0.5
    assert lr_factor(2, 10, 2, "cosine", 0.0) == 1.0
    assert lr_factor(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant", 0.0) == 1.0


# ----------------------------------------------------------------------------- bad input
def test_bad_settings_fail_with_clear_messages():
    with pytest.raises(TrainConfigError, match=r"router_lora.train.lr=0.*positive"):
        TrainConfig(lr=0)
    with pytest.raises(TrainConfigError, match=r"router_lora.train.lr=-0.001"):
        TrainConfig(lr=-1e-3)
    with pytest.raises(TrainConfigError, match=r"router_lora.train.steps=0: expected a positive integer"):
        TrainConfig(steps=0)
    with pytest.raises(TrainConfigError, match=r"router_lora.train.steps=-5"):
        TrainConfig(steps=-5)
    # the settings conversion (the one way from config to TrainConfig) names unknown keys and wrong types
    with pytest.raises(ConfigError, match=r"router_lora.train.stpes is not a setting of router_lora.train; its "
                                          r"settings are: steps, lr, "):
        to_settings(RouterLoraSettings, {"train": {"stpes": 3}}, "router_lora")
    with pytest.raises(ConfigError, match=r"router_lora.train.steps='many': expected an integer$"):
        to_settings(RouterLoraSettings, {"train": {"steps": "many"}}, "router_lora")
    with pytest.raises(TrainConfigError, match=r"router_lora.train.lr=0.0: the learning rate must be a positive"):
        to_settings(RouterLoraSettings, {"train": {"lr": 0}}, "router_lora")
    with pytest.raises(RouterLoraError, match="lora.rank=0"):
        RouterLoraSpec(rank=0)


def test_rank_above_router_dimensions_is_refused():
    model = tiny_model("qwen3_moe")  # routers [8 experts, 32 hidden]
    with pytest.raises(RouterLoraError, match=r"lora.rank=9 exceeds.*min\(experts, hidden\)=8"):
        wrap_routers(model, get_adapter(model), RouterLoraSpec(rank=9))


def test_model_without_router_is_refused():
    dense = tiny_model("qwen3_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(RouterLoraError, match="needs at least one MoE router"):
        wrap_routers(dense, get_adapter(dense), RouterLoraSpec(rank=2))


# ----------------------------------------------------------------------------- the experiment
def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(Path(ckpt).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture
def lora_cfg(tmp_path, tiny_checkpoint):
    from helpers_hydra import compose_cfg

    ckpt = tiny_checkpoint("qwen3_moe")
    data = write_tiny_jsonl(tmp_path / "data.jsonl", repeat=1)  # 3 documents per domain: keeps the runs short

    def make(*extra):
        return compose_cfg([
            "experiment=router_lora", f"model.path={ckpt}", "data=jsonl", "data.label_field=domain",
            f"data.heldout.path={data}", f"data.train.path={data}", "data.block_size=32", "data.batch_size=8",
            "progress=false", "router_lora.domain=code", "router_lora.lora.rank=2", "router_lora.train.steps=4",
            "router_lora.train.warmup_steps=1", "router_lora.train.batch_size=4", "router_lora.train.lr=1e-2",
            "router_lora.train.log_every=2", *extra,
        ])

    make.ckpt = ckpt
    return make


def test_experiment_bad_inputs(lora_cfg, tmp_path):
    from moesurgeon.runner import run_experiment

    with pytest.raises(DataError, match=r"router_lora.domain='klingon' is absent.*domains present: "
                                        r"\['code', 'prose'\]"):
        run_experiment(lora_cfg("router_lora.domain=klingon"), tmp_path / "r1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="data.train: .*holds no examples"):
        run_experiment(lora_cfg(f"data.train.path={empty}"), tmp_path / "r2")
    with pytest.raises(TrainConfigError, match="router_lora.train.lr=0.0"):
        run_experiment(lora_cfg("router_lora.train.lr=0"), tmp_path / "r3")
    with pytest.raises(RouterLoraError, match="lora.rank=64 exceeds"):
        run_experiment(lora_cfg("router_lora.lora.rank=64"), tmp_path / "r4")
    # a failed run still writes metrics.json: success false and the error
    failed = json.loads((tmp_path / "r4" / "metrics.json").read_text())
    assert failed["experiment"] == "router_lora" and failed["success"] is False
    assert failed["error"].startswith("RouterLoraError: router_lora.lora.rank=64 exceeds")


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # PEFT 0.21 on transformers 5
def test_experiment_end_to_end(lora_cfg, tmp_path, monkeypatch, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moesurgeon.runner import run_experiment

    run = tmp_path / "run"
    metrics = run_experiment(lora_cfg(), run)
    for key in ("baseline/ppl/code", "tuned/ppl/prose", "rel_change/ppl/code", "guard/max_other_rel_change",
                "guard/bound", "guard/passed", "train/steps", "train/seconds", "trainable_params",
                "trainable_share", "shift_jsd_bits/all/mean"):
        assert key in metrics, key
    assert metrics["train/steps"] == 4 and metrics["guard/bound"] == 0.02
    assert json.loads((run / "metrics.json").read_text())["target/domain"] == "code"
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "before/usage_heatmap.png",
              "after/usage_heatmap.png", "usage_shift_heatmap.png", "train_state/step-000004/lora.safetensors"):
        assert (run / f).is_file(), f
    assert any((run / "tb").glob("events.out.tfevents.*"))

    # the merged checkpoint: only router tensors differ from the source, and it reloads to the same logits
    assert metrics["export/verified_reload"] is True and metrics["export/tensors_replaced"] == 2
    source, exported = checkpoint_tensors(lora_cfg.ckpt), checkpoint_tensors(run / "checkpoint")
    assert set(source) == set(exported)
    differ = {n for n in source if not torch.equal(source[n], exported[n])}
    assert differ == {"model.layers.0.mlp.gate.weight", "model.layers.2.mlp.gate.weight"}

    # the adapter is standard PEFT: it loads on the untouched base and reproduces the tuned routing
    base = AutoModelForCausalLM.from_pretrained(lora_cfg.ckpt)
    ids = torch.randint(3, 90, (1, 16))
    plain = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, run / "adapter").eval()
    assert not torch.equal(tuned(input_ids=ids).logits, plain)

    reloaded = AutoModelForCausalLM.from_pretrained(run / "checkpoint")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    # resume=true on the finished run trains no further step and gives the same figures; with a
    # guard that cannot pass (forced below any change) the run still ends and writes its metrics
    monkeypatch.setattr("moesurgeon.recipes.router_lora.check_bound", lambda bound: -1.0)
    with caplog.at_level("ERROR", logger="moesurgeon"):  # the run owns <run>/checkpoint: the rerun replaces it
        again = run_experiment(lora_cfg("router_lora.resume=true", "router_lora.usage_reports=false"), run)
    assert again["train/start_step"] == 4 and again["tuned/ppl/code"] == metrics["tuned/ppl/code"]
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["guard/passed"] is False and saved["success"] is False
    assert "REGRESSION GUARD FAILED" in caplog.text
    with pytest.raises(ResumeError, match=r"train.lr: 0.01 -> 0.02"):
        run_experiment(lora_cfg("export.enabled=false", "router_lora.resume=true", "router_lora.train.lr=2e-2"), run)


def test_regression_guard_verdicts(caplog):
    from moesurgeon.lora.guard import announce, check_bound, regression_guard

    base = {"code": 10.0, "math": 4.0, "prose": 20.0, "all": 12.0}
    ok = regression_guard(base, {"code": 9.9, "math": 4.04, "prose": 19.0, "all": 11.9}, "code", 0.02)
    assert ok["target/improved"] and ok["guard/passed"] and ok["success"]
    assert ok["guard/worst_domain"] == "math" and ok["guard/max_other_rel_change"] == pytest.approx(0.01)
    bad = regression_guard(base, {"code": 9.9, "math": 4.2, "prose": 20.0, "all": 12.0}, "code", 0.02)
    assert not bad["guard/passed"] and not bad["success"]
    everything = regression_guard(base, {"code": 9.0, "math": 4.0, "prose": 20.5, "all": 11.0}, None, 0.02)
    assert everything["target/domain"] == "all" and everything["guard/domains"] == 3 and not everything["guard/passed"]
    with caplog.at_level("ERROR", logger="moesurgeon"):
        announce(bad)
    assert "REGRESSION GUARD FAILED: math" in caplog.text
    with pytest.raises(ValueError, match="lora.guard_bound=-0.1"):
        check_bound(-0.1)
