"""Every check that needs no weights runs before the model is loaded; user mistakes end in one line."""

import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
from hydra import compose, initialize_config_dir

import moesurgeon.run_context as run_context
from moesurgeon.config import config_dir, register_resolvers
from moesurgeon.data import DataError
from moesurgeon.io import CheckpointError
from moesurgeon.runner import run_experiment
from tiny_models import write_tiny_jsonl

register_resolvers()


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if an experiment gets as far as loading weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the failing check")

    monkeypatch.setattr(run_context, "load_model", refuse)


@pytest.fixture
def topk_cfg(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    data = write_tiny_jsonl(tmp_path / "eval.jsonl")

    def make(*extra):
        return compose_cfg(["experiment=topk_override", "topk_override.top_k=1", f"model.path={ckpt}", "data=jsonl",
                            f"data.heldout.path={data}", "data.label_field=domain", "data.block_size=32",
                            "progress=false", *extra])

    return make


def test_existing_export_dir_refused_before_loading(topk_cfg, tmp_path, no_model_load):
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(CheckpointError, match=r"export.dir .*already exists; pass export.overwrite=true"):
        run_experiment(topk_cfg(f"export.dir={taken}"), tmp_path / "run")


def test_export_into_the_run_dir_refused(topk_cfg, tmp_path, no_model_load):
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="is \\(or contains\\) the run directory"):
        run_experiment(topk_cfg(f"export.dir={run}", "export.overwrite=true"), run)
    with pytest.raises(CheckpointError, match="is \\(or contains\\) the run directory"):
        run_experiment(topk_cfg(f"export.dir={tmp_path}", "export.overwrite=true"), run)


def test_export_into_the_source_refused(topk_cfg, tiny_checkpoint, tmp_path, no_model_load):
    ckpt = tiny_checkpoint("qwen3_moe")
    with pytest.raises(CheckpointError, match="inside the source checkpoint"):
        run_experiment(topk_cfg(f"export.dir={ckpt}/patched"), tmp_path / "run")


def test_not_enough_disk_refused_before_loading(topk_cfg, tmp_path, monkeypatch, no_model_load):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(CheckpointError, match=r"needs up to \d+ bytes .* has only 100 bytes"):
        run_experiment(topk_cfg("export.mode=full"), tmp_path / "run")


def test_missing_data_refused_before_loading(topk_cfg, tmp_path, no_model_load):
    with pytest.raises(DataError, match="nope.jsonl"):
        run_experiment(topk_cfg(f"data.heldout.path={tmp_path}/nope.jsonl"), tmp_path / "run")


@pytest.mark.parametrize("args, message", [
    (["experiment=router_usage", "model=local"], "model.path is not set"),
    (["experiment=topk_override", "topk_override.top_k=0"], "topk_override.top_k=0: expected 1 <= k <="),
    (["experiment=topk_sweep", "topk_sweep.max_k=two"], "topk_sweep.max_k='two': expected an integer or null"),
    (["experiment=router_usage", "model.path=./no/such/dir"], "does not exist locally"),
])
def test_cli_user_error_is_one_line_and_exit_2(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moesurgeon", *args, "progress=false",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "moesurgeon: error: " in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_cli_full_error_keeps_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moesurgeon", "experiment=router_usage", "model=local",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "model.path is not set" in proc.stderr
