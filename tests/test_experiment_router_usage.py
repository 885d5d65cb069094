"""experiment=router_usage and usage_diff through the real Hydra configs, on a tiny checkpoint."""

import json
import subprocess
import sys

import pytest

from moesurgeon.config import config_dir, register_resolvers
from moesurgeon.hooks import count_hooks
from moesurgeon.runner import run_experiment
from helpers_hydra import compose_cfg
from tiny_models import write_tiny_jsonl

register_resolvers()


@pytest.fixture
def tiny_run(tmp_path, tiny_checkpoint):
    def run(experiment, family="qwen3_moe", extra=()):
        ckpt = tiny_checkpoint(family)
        data = write_tiny_jsonl(tmp_path / "eval.jsonl")
        cfg = compose_cfg([
            f"experiment={experiment}", f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}",
            "data.label_field=domain", "data.block_size=32", "data.batch_size=4", "progress=false", *extra,
        ])
        out = tmp_path / f"run-{experiment}-{family}"
        return run_experiment(cfg, out), out

    return run


def test_every_experiment_config_composes():
    exps = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
    assert "router_usage" in exps
    for name in exps:
        overrides = [f"experiment={name}"]
        cfg = compose_cfg(overrides)
        assert cfg.task, name
        text = (config_dir() / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name
        assert "python -m moesurgeon experiment=" + name in text, f"{name}.yaml lacks its launch command"


def test_router_usage_writes_stats_plots_and_metrics(tiny_run, family):
    metrics, out = tiny_run("router_usage", family, extra=["router_usage.trace=true"])
    for f in ("usage_stats.safetensors", "usage_heatmap.png", "router_usage.html", "metrics.json",
              "config_resolved.yaml", "layer_divergence.png", "trace.jsonl"):
        assert (out / f).is_file(), f
    # the HTML page opens on the layer of the co-activation PNG (default: the middle MoE layer)
    from moesurgeon.viz.html_report import embedded_data

    page = embedded_data((out / "router_usage.html").read_text())
    assert (out / f"coactivation_L{page['layers'][page['coact_layer']].split('.')[2]}.png").is_file()
    assert page["coact_layer"] == len(page["layers"]) // 2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["experiment"] == "router_usage"
    assert 0 <= saved["jsd_bits/mean"] <= 1.0
    assert saved["tokens/code"] > 0 and saved["tokens/prose"] > 0
    assert any(k.startswith("entropy_bits/model.layers.") for k in saved)


def test_usage_diff_between_two_runs(tiny_run, tmp_path):
    _, out_a = tiny_run("router_usage")
    cfg = compose_cfg(["experiment=usage_diff", f"usage_diff.a={out_a}/usage_stats.safetensors",
                       f"usage_diff.b={out_a}/usage_stats.safetensors"])
    metrics = run_experiment(cfg, tmp_path / "diff")
    assert metrics["shift_jsd_bits/all/mean"] == pytest.approx(0.0, abs=1e-9)
    assert (tmp_path / "diff" / "usage_diff_heatmap.png").is_file()
    # figures and log name the runs, not "a"/"b"; the same run twice is told apart
    run = f"{out_a.parent.name}/{out_a.name}"
    assert (metrics["name_a"], metrics["name_b"]) == (f"{run} (a)", f"{run} (b)")


def test_bad_inputs_fail_with_clear_messages(tiny_run, tmp_path):
    from moesurgeon.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="is not a directory|does not exist locally"):
        run_experiment(compose_cfg(["experiment=router_usage", f"model.path={tmp_path}/nope"]), tmp_path / "o1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 4}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        run_experiment(compose_cfg(["experiment=router_usage", f"model.path={empty}"]), tmp_path / "o2")
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="'llama' is not supported"):
        run_experiment(compose_cfg(["experiment=router_usage", f"model.path={empty}"]), tmp_path / "o3")


def test_cli_entry_point_runs_and_honours_run_dir(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("mixtral")
    data = write_tiny_jsonl(tmp_path / "eval.jsonl")
    out = tmp_path / "cli-run"
    # a user's own config dir adds an experiment on top of the packaged ones
    user_conf = tmp_path / "my_conf" / "experiment"
    user_conf.mkdir(parents=True)
    (user_conf / "my_usage.yaml").write_text(
        "# @package _global_\ndefaults:\n  - router_usage\ndata:\n  block_size: 24\n")
    cmd = [sys.executable, "-m", "moesurgeon", "--config-dir", str(user_conf.parent), "experiment=my_usage",
           f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}", "progress=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "metrics.json").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert "block_size: 24" in (out / "config_resolved.yaml").read_text()


def test_no_hooks_left_after_experiment(tiny_checkpoint):
    from moesurgeon.models import ModelSpec, load_model
    from moesurgeon.probe import profile_usage
    from moesurgeon.data import TokenBlocks
    import torch

    model, _, adapter = load_model(ModelSpec(path=str(tiny_checkpoint("olmoe"))))
    blocks = TokenBlocks(torch.randint(3, 90, (2, 8)), torch.ones(2, 8, dtype=torch.long), torch.zeros(2, dtype=torch.long), ["x"])
    profile_usage(model, adapter, blocks, progress=False)
    assert count_hooks(model) == 0
