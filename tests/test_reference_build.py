"""The reference-model build pipeline (slow: downloads two Debian packages unless cached, trains a few steps)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from moesurgeon.reference import DOMAINS
from moesurgeon.reference.corpus import CorpusError, Document, fetch_deb, pack_units, split_heldout

REPO = Path(__file__).resolve().parent.parent


def _cache_dir(tmp_path: Path) -> Path:
    # Reuse the user's download cache when there is one; otherwise a fresh temporary cache.
    env = os.environ.get("MOESURGEON_REFERENCE_CACHE")
    if env:
        return Path(env)
    home = Path("~/.cache/moesurgeon/reference").expanduser()
    return home if (home / "debs").is_dir() else tmp_path / "cache"


def test_fetch_deb_clear_error_when_apt_fails(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "apt-get"
    script.write_text("#!/bin/sh\necho 'E: Unable to locate package jargon-text' >&2\nexit 100\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    (fake / "dpkg-deb").write_text("#!/bin/sh\nexit 0\n")
    (fake / "dpkg-deb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ.get('PATH', '')}")
    with pytest.raises(CorpusError, match=r"(?s)apt-get download jargon-text.*apt-get update.*Unable to locate"):
        fetch_deb("jargon-text", tmp_path / "cache")


def test_pack_units_and_group_split():
    chunks = pack_units(["a" * 300] * 20, sep="\n\n", max_chars=1000, min_chars=200)
    assert all(200 <= len(c) <= 1000 for c in chunks)
    docs = [Document(f"text {i} " * 50, "english", f"s#{i}", "x", f"g{i // 3}") for i in range(60)]
    train, heldout = split_heldout(docs, target_bytes=2000, seed=0)
    assert heldout and train
    assert not {d.group for d in train} & {d.group for d in heldout}


@pytest.mark.slow
def test_reduced_build_via_experiment(tmp_path):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moesurgeon.recipes.build_reference import run

    cfg = OmegaConf.load(REPO / "conf/experiment/build_reference.yaml")
    assert cfg.task == "build_reference"
    cfg.reference.update(
        steps=3,
        max_corpus_chars=60_000,
        heldout_bytes=8_000,
        train_bytes=20_000,
        cache_dir=str(_cache_dir(tmp_path)),
        install=False,
    )
    cfg.progress = False
    metrics = run(cfg, tmp_path / "out")

    model_dir = tmp_path / "out/reference_model"
    data_dir = tmp_path / "out/reference_data"
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "SOURCES.md", "NOTICE", "reference_build.json"):
        assert (model_dir / name).is_file(), name
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) >= 2
    assert not list(tmp_path.glob("out/.*tmp*")), "temporary build directories left behind"

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert model.config.model_type == "qwen3_moe"
    out = model(**tok("x = 1", return_tensors="pt"))
    assert out.logits.shape[-1] == model.config.vocab_size

    for split in ("train", "heldout"):
        rows = [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]
        assert {r["domain"] for r in rows} == set(DOMAINS)

    assert metrics["installed"] == 0
    assert metrics["num_shards"] >= 2
    assert metrics["params_total"] > metrics["params_active"] > 0
    for dom in DOMAINS:
        assert metrics[f"heldout_ppl_{dom}"] > 1 and metrics[f"unigram_ppl_{dom}"] > 1
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())
