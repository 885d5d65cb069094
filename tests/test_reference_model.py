"""The shipped reference MoE and its data: loadable with plain transformers, sharded, small, really trained."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from moesurgeon.reference import DOMAINS, reference_data_dir, reference_model_dir

ROLE_TAGS = [f"<|role={d}|>" for d in DOMAINS]


def _read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def model_dir():
    path = reference_model_dir()
    if not (path / "config.json").exists():
        pytest.fail(
            f"shipped reference model missing at {path}; build it with "
            "`python -m moesurgeon experiment=build_reference reference.install=true`"
        )
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    m = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return m.eval()


@pytest.fixture(scope="module")
def data():
    d = reference_data_dir()
    return {split: _read_jsonl(d / f"{split}.jsonl") for split in ("train", "heldout")}


def test_checkpoint_layout_and_size(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe"
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    # the shipped build (experiments/reference_model/README.md): 16 experts, top-2, both expert-count keys
    assert cfg["num_experts_per_tok"] == 2
    assert cfg["num_experts"] == cfg["num_local_experts"] == 16
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    for s in shards:
        assert (model_dir / s).is_file()
    assert not (model_dir / "model.safetensors").exists()
    # hub on-disk layout: one tensor per expert
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in index["weight_map"]
    assert "model.layers.0.mlp.gate.weight" in index["weight_map"]
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "SOURCES.md", "NOTICE"):
        assert (model_dir / name).is_file(), name
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024


def test_loads_with_plain_transformers(model):
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.config.model_type == "qwen3_moe"
    gate = model.model.layers[0].mlp.gate
    assert gate.weight.shape[0] == model.config.num_experts


def test_tokenizer(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    for text in [
        "def f(x):\n    return x ** 2  # square\n",
        "The Jargon File is a comprehensive compendium of hacker slang.",
        "Знание - сила.\n    -- Ф.Бэкон",
        "gcd(48, 36) = 12, 3/4 + 1/6 = 11/12",
        "  tabs\tand  spaces \n\n trailing ",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    for tag in ROLE_TAGS:
        ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, tag
        assert ids[0] in tokenizer.all_special_ids
    ids = tokenizer("<|role=math|>1234", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5  # role tag + one token per digit
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == ["1", "2", "3", "4"]


def test_data_files(data):
    for split, rows in data.items():
        assert rows, split
        assert {r["domain"] for r in rows} == set(DOMAINS), split
        for r in rows:
            assert isinstance(r["text"], str) and 100 <= len(r["text"]) <= 2500
        size = Counter()
        for r in rows:
            size[r["domain"]] += len(r["text"].encode())
        for dom in DOMAINS:
            lo, hi = (40_000, 120_000) if split == "heldout" else (150_000, 450_000)
            assert lo <= size[dom] <= hi, (split, dom, size[dom])
    heldout = {r["text"] for r in data["heldout"]}
    assert not heldout & {r["text"] for r in data["train"]}
    gpl = [r for r in data["train"] + data["heldout"] if r["domain"] == "russian"]
    assert all(r.get("license") == "GPL-2.0-only" for r in gpl)


def test_heldout_ppl_beats_unigram(model, tokenizer, data):
    """A small held-out sample per domain: model perplexity well below an add-one unigram (train split)."""
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    train_ids = tokenizer([r["text"] for r in data["train"]], add_special_tokens=False)["input_ids"]
    for dom in DOMAINS:
        counts = torch.ones(vocab, dtype=torch.float64)
        for r, ids in zip(data["train"], train_ids):
            if r["domain"] == dom:
                counts += torch.bincount(torch.tensor(ids + [eos]), minlength=vocab)[:vocab].double()
        logp = counts.log() - counts.sum().log()
        stream: list[int] = []
        for r in data["heldout"]:
            if r["domain"] == dom and len(stream) < 4 * 128:
                stream += tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [eos]
        x = torch.tensor(stream[: 4 * 128]).view(4, 128)  # 4 windows of 128 tokens
        with torch.no_grad():
            logits = model(input_ids=x).logits.float()
        nll = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1)))
        uni = float(-logp[x[:, 1:]].mean())
        ppl, uppl = math.exp(nll), math.exp(uni)
        assert ppl < 0.5 * uppl, (dom, ppl, uppl)
