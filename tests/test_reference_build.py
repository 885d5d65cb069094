"""The reference-model build pipeline (slow: downloads two Debian packages unless cached, trains a few steps)."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from moesurgeon.lora.schedule import lr_factor
from moesurgeon.reference import DOMAINS
from moesurgeon.reference.chunking import pack_units
from moesurgeon.reference.corpus import split_heldout
from moesurgeon.reference.debian_packages import fetch_deb
from moesurgeon.reference.documents import CorpusError, Document
from moesurgeon.reference.evaluation import eval_windows, evaluate, specialization_metrics, top2_share_by_domain
from moesurgeon.reference.settings import ReferenceBuildConfig
from moesurgeon.reference.train import lr_at, make_model_config, param_counts

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


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = ReferenceBuildConfig(steps=100, warmup_steps=10, lr=3e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 3e-3 * 1 / 10
    assert lr_at(9, cfg) == 3e-3
    assert lr_at(10, cfg) == 3e-3  # cosine starts at the peak
    assert lr_at(55, cfg) == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5))  # half way down
    assert lr_at(99, cfg) == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90))))
    # after warmup it is the package's schedule, bit for bit
    assert all(lr_at(s, cfg) == 3e-3 * lr_factor(s, 100, 10, "cosine", 0.1) for s in range(10, 100))


def test_specialization_metrics_extremes():
    same = np.ones((2, 4, 8))  # every domain spreads evenly over 8 experts
    m = specialization_metrics(same)
    assert m["jsd_bits"] == pytest.approx(0.0, abs=1e-12)
    assert m["pairwise_jsd_bits"] == pytest.approx(0.0, abs=1e-12)
    assert m["top2_share"] == pytest.approx(2 / 8)
    apart = np.zeros((2, 4, 8))
    for d in range(4):
        apart[:, d, 2 * d : 2 * d + 2] = [3.0, 1.0]  # each domain has its own two experts, 3:1
    m = specialization_metrics(apart)
    assert m["jsd_bits"] == pytest.approx(2.0)  # log2(4 domains)
    assert m["pairwise_jsd_bits"] == pytest.approx(1.0)
    assert m["top2_share"] == pytest.approx(1.0)
    apart[:, 0, 7] = 4.0  # domain 0: 3, 1, 4 -> top two hold 7 of 8
    assert top2_share_by_domain(apart, DOMAINS) == pytest.approx(
        {"code": 7 / 8, "english": 1.0, "russian": 1.0, "math": 1.0})


def _tiny_reference_model():
    from transformers import Qwen3MoeForCausalLM

    cfg = ReferenceBuildConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, num_experts=4,
                               moe_intermediate_size=16, top_k=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(make_model_config(cfg, vocab_size=50, eos_id=0, pad_id=1)).float().eval()


def test_param_counts_split_experts_from_the_rest():
    model = _tiny_reference_model()
    total, active = param_counts(model, num_experts=4, top_k=2)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert total == sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert expert > 0
    assert active == total - expert + expert * 2 // 4


def test_evaluate_counts_every_choice_and_matches_the_model_loss():
    model = _tiny_reference_model()
    ids = torch.randint(2, 50, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    windows = {"a": eval_windows(ids, 16), "b": eval_windows(ids[:40], 16)}
    assert [len(w) for w in windows["b"]] == [16, 16, 8]
    ppl, usage = evaluate(model, windows)
    # every token of every window chose top_k = 2 experts in each of the 2 layers
    assert usage.shape == (2, 2, 4)
    assert usage.sum(-1).tolist() == [[200.0, 80.0], [200.0, 80.0]]
    with torch.no_grad():
        losses = [(float(model(input_ids=w[None], labels=w[None]).loss), len(w) - 1) for w in windows["b"]]
    expected = math.exp(sum(loss * n for loss, n in losses) / sum(n for _, n in losses))
    assert ppl["b"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_reduced_build_via_experiment(tmp_path):
    from helpers_hydra import compose_cfg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moesurgeon.runner import run_experiment

    cfg = compose_cfg([
        "experiment=build_reference", "progress=false",
        "build_reference.steps=3", "build_reference.max_corpus_chars_per_domain=60000",
        "build_reference.heldout_bytes_per_domain=8000", "build_reference.shipped_train_bytes_per_domain=20000",
        f"build_reference.cache_dir={_cache_dir(tmp_path)}", "build_reference.install=false",
    ])
    assert cfg.task == "build_reference"
    metrics = run_experiment(cfg, tmp_path / "out")

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
    assert metrics["params_total"] == sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert 0 < metrics["params_active"] < metrics["params_total"]
    for dom in DOMAINS:
        assert metrics[f"heldout_ppl_{dom}"] > 1 and metrics[f"unigram_ppl_{dom}"] > 1
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())
