"""model.path / model.tokenizer / model.device / config.json: every mistake stops at once, with its fix."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from moesurgeon.config import config_dir, register_resolvers
from moesurgeon.models import ModelLoadError, ModelSpec, load_config_dict, load_model
from moesurgeon.model_source import resolve_device, resolve_source
from moesurgeon.run_context import resolve_threads
from moesurgeon.runner import model_spec, run_experiment
from tiny_models import write_tiny_jsonl

register_resolvers()


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _edit_config(ckpt, **changes):
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def test_model_local_without_path_is_refused():
    cfg = compose_cfg(["experiment=router_usage", "model=local"])
    with pytest.raises(ModelLoadError, match="model.path is not set"):
        model_spec(cfg.model)


def test_default_device_is_the_best_available():
    assert compose_cfg(["experiment=router_usage", "model=local", "model.path=x/y"]).model.device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected or resolve_device("auto") == "mps"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
def test_cuda_on_a_cpu_build_says_what_to_do():
    with pytest.raises(ModelLoadError, match=r"model.device='cuda'.*model.device=auto"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="model.device='gpu0'"):
        resolve_device("gpu0")


def test_relative_typo_fails_at_once_without_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}: a local-looking path must fail without it")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for typo in ("models/Qwen3-30B-A3X", "./ckpt", "../elsewhere/model", "~/nope/model", "a/b/c"):
        with pytest.raises(ModelLoadError, match="does not exist locally"):
            resolve_source(typo)


def test_hub_id_offline_and_not_cached_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the hub cache, and HF_HUB_OFFLINE is set"):
        resolve_source("some-org/some-model", cache_dir=str(tmp_path / "cache"))


def _fake_hub_cache(ckpt, cache):
    """The layout huggingface_hub downloads into: relative symlinks from snapshots/<rev>/ into blobs/."""
    repo = cache / "models--acme--tiny-moe"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(ckpt.iterdir())):
        blob = repo / "blobs" / f"{i:064x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob.name}")
    return snap


def test_hub_id_resolves_to_its_cache_snapshot(tiny_checkpoint, tmp_path, monkeypatch):
    snap = _fake_hub_cache(tiny_checkpoint("qwen3_moe"), tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_source("acme/tiny-moe", cache_dir=str(tmp_path / "cache"))
    assert resolved == snap
    model, _, adapter = load_model(ModelSpec(path=str(resolved)))
    assert adapter.moe_layers(model)


def test_missing_tokenizer_names_model_tokenizer(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("olmoe")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in ckpt.glob("tokenizer*"):
        shutil.move(str(f), tok_dir / f.name)
    for f in ckpt.glob("special_tokens_map.json"):
        shutil.move(str(f), tok_dir / f.name)
    with pytest.raises(ModelLoadError, match="has no tokenizer.*model.tokenizer="):
        load_config_dict(ModelSpec(path=str(ckpt)))
    _, tokenizer, _ = load_model(ModelSpec(path=str(ckpt), tokenizer=str(tok_dir)))
    assert tokenizer("def add").input_ids


def test_token_ids_beyond_the_vocabulary_are_named(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe", vocab_size=40)  # the tokenizer has 90 tokens
    data = write_tiny_jsonl(tmp_path / "eval.jsonl")
    cfg = compose_cfg(["experiment=router_usage", f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}",
                       "data.label_field=domain", "data.block_size=32", "progress=false"])
    with pytest.raises(ModelLoadError, match=r"token id \d+, but the model's embedding has only 40 rows"):
        run_experiment(cfg, tmp_path / "run")


@pytest.mark.parametrize("changes, match", [
    ({"num_experts_per_tok": 0}, r"num_experts_per_tok=0; expected an integer from 1 to the expert count 8"),
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok=9; expected an integer from 1"),
    ({"num_experts_per_tok": 2.5}, r"num_experts_per_tok=2.5"),
    ({"num_experts": 0}, r"num_experts=0; expected a positive integer"),
    ({"num_experts": "eight"}, r"num_experts='eight'"),
])
def test_bad_config_json_values(tiny_checkpoint, changes, match):
    ckpt = tiny_checkpoint("qwen3_moe")
    _edit_config(ckpt, **changes)
    with pytest.raises(ModelLoadError, match=match):
        load_config_dict(ModelSpec(path=str(ckpt)))


def test_malformed_config_json_names_the_file(tiny_checkpoint):
    ckpt = tiny_checkpoint("mixtral")
    (ckpt / "config.json").write_text('{"model_type": "mixtral",')
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON"):
        load_config_dict(ModelSpec(path=str(ckpt)))


def test_missing_top_k_states_the_runtime_default(tiny_checkpoint, caplog):
    ckpt = tiny_checkpoint("mixtral")
    _edit_config(ckpt, num_experts_per_tok=None)
    with caplog.at_level("INFO", logger="moesurgeon"):
        load_config_dict(ModelSpec(path=str(ckpt)))
    assert "no num_experts_per_tok: transformers uses the mixtral default of 2" in caplog.text


def test_pickle_opt_in_is_real(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    src = tiny_checkpoint("olmoe")
    pkl = tmp_path / "pickle-ckpt"
    pkl.mkdir()
    state = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    torch.save(state, pkl / "pytorch_model.bin")  # transformers 5 no longer writes pickles itself
    for f in [*src.glob("tokenizer*"), src / "config.json"]:
        shutil.copy(f, pkl / f.name)
    assert not list(pkl.glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match="model.allow_pickle=true"):
        load_config_dict(ModelSpec(path=str(pkl)))
    model, _, adapter = load_model(ModelSpec(path=str(pkl), allow_pickle=True))
    assert len(adapter.moe_layers(model)) == 3


@pytest.mark.parametrize("value, device, busy, expected", [
    (None, "cpu", 0, "cores"), ("auto", "cpu", 0, "cores"), ("auto", "cpu", 10**6, 1), ("auto", "cuda", 0, None),
    (3, "cpu", 0, 3),
])
def test_thread_default(value, device, busy, expected):
    cores = len(os.sched_getaffinity(0))
    assert resolve_threads(value, device, busy) == (cores if expected == "cores" else expected)
    if expected == "cores" and cores > 1:  # one busy core elsewhere leaves one fewer thread
        assert resolve_threads(value, device, 1) == cores - 1


def test_bad_thread_count_is_refused():
    with pytest.raises(ValueError, match="threads=0"):
        resolve_threads(0, "cpu")


def test_export_from_a_hub_id_in_the_cache(tiny_checkpoint, tmp_path):
    """The whole command on a cached hub id: the export holds regular files, the snapshot is untouched."""
    snap = _fake_hub_cache(tiny_checkpoint("qwen3_moe"), tmp_path / "cache")
    before = {f.name: (f.is_symlink(), f.read_bytes()) for f in snap.iterdir()}
    data = write_tiny_jsonl(tmp_path / "eval.jsonl")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "moesurgeon", "experiment=topk_override", "topk_override.top_k=1",
                           "model.path=acme/tiny-moe", "data=jsonl", f"data.heldout.path={data}",
                           "data.label_field=domain", "data.block_size=32", "progress=false", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = list((out / "checkpoint").rglob("*"))
    assert exported and not [p for p in exported if p.is_symlink()]
    assert json.loads((out / "checkpoint" / "config.json").read_text())["num_experts_per_tok"] == 1
    assert {f.name: (f.is_symlink(), f.read_bytes()) for f in snap.iterdir()} == before
