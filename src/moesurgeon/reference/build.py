"""Build (train) the embedded reference MoE from scratch, offline and deterministically.

Pipeline (:func:`build_reference`):

1. assemble the four-domain corpus with held-out splits (:mod:`.corpus`);
2. write the data directory (``train.jsonl`` subset, ``heldout.jsonl``,
   ``SOURCES.md``, licence texts);
3. train the byte-level BPE (:mod:`.tokenizer`) on the train split;
4. train a small ``Qwen3MoeForCausalLM`` with the load-balancing aux loss on
   domain-balanced batches (:mod:`.train`: plain PyTorch, AdamW, warmup + cosine);
5. evaluate held-out perplexity per domain (fp32, bf16 weights, reloaded
   checkpoint) against an add-one unigram baseline, and a quick routing
   specialisation check (JSD between the domains' expert usage, trained vs the
   same model at initialisation) (:mod:`.evaluation`);
6. save a standard, sharded (>= 2 safetensors shards + index), bf16 model
   directory, verify it loads with ``AutoModelForCausalLM``, and move it into
   place atomically (:mod:`.package`).

Library code: typed arguments only (no Hydra/DictConfig here).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from ..io.atomic_dir import atomic_output_dir
from ..io.stale_temp import tree_bytes
from . import DOMAINS
from .corpus import Corpus, build_corpus, copy_licences, sha256_file, shipped_train_subset, write_jsonl
from .evaluation import (
    eval_windows,
    evaluate,
    heldout_nll,
    specialization_metrics,
    top2_share_by_domain,
    unigram_nll,
)
from .package import NOTICE_TEXT, check_model_dir, copy_dir_atomic, save_model_dir, sources_markdown
from .settings import ReferenceBuildConfig
from .tokenizer import encode_documents, tokenizer_texts, train_tokenizer
from .train import make_model_config, param_counts, train_model

# the recipe (recipes/build_reference.py) installs a finished build with copy_dir_atomic
__all__ = ["ReferenceBuildConfig", "build_reference", "copy_dir_atomic"]


def _write_data_dir(corpus: Corpus, cfg: ReferenceBuildConfig, data_dir: Path) -> dict[str, int | str]:
    """train.jsonl (the shipped sample), heldout.jsonl, SOURCES.md and licences; returns their sizes and hashes."""
    metrics: dict[str, int | str] = {}
    with atomic_output_dir(data_dir, overwrite=True) as tmp:
        write_jsonl(shipped_train_subset(corpus, cfg.shipped_train_bytes_per_domain, cfg.seed), tmp / "train.jsonl")
        write_jsonl(corpus.heldout, tmp / "heldout.jsonl")
        (tmp / "SOURCES.md").write_text(sources_markdown(corpus, cfg), encoding="utf-8")
        copy_licences(tmp)
        for split in ("train", "heldout"):
            metrics[f"data_{split}_bytes"] = (tmp / f"{split}.jsonl").stat().st_size
            metrics[f"data_{split}_sha256"] = sha256_file(tmp / f"{split}.jsonl")
    return metrics


def _heldout_ppl(model: torch.nn.Module, windows: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    out = {}
    for dom in DOMAINS:
        nll, n = heldout_nll(model, windows[dom])
        out[dom] = math.exp(nll / n)
    return out


def build_reference(
    cfg: ReferenceBuildConfig,
    model_dir: Path,
    data_dir: Path,
    log: Callable[[str], None] | None = print,
) -> dict[str, float | int | str]:
    """Build the reference model into ``model_dir`` and its data into ``data_dir``.

    Both directories are written under temporary names and renamed into place
    at the end. Returns flat metrics.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3MoeForCausalLM

    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    metrics: dict[str, float | int | str] = {}

    # 1. corpus ---------------------------------------------------------------
    t = time.perf_counter()
    corpus = build_corpus(
        cfg.cache_dir,
        seed=cfg.seed,
        heldout_bytes=cfg.heldout_bytes_per_domain,
        max_chars_per_domain=cfg.max_corpus_chars_per_domain,
        math_train_docs=cfg.math_train_docs,
    )
    metrics["corpus_seconds"] = time.perf_counter() - t
    for dom, st in corpus.stats().items():
        for k, v in st.items():
            metrics[f"corpus_{dom}_{k}"] = v
    say(f"corpus: {len(corpus.train)} train / {len(corpus.heldout)} held-out documents")

    # 2. data dir -------------------------------------------------------------
    metrics.update(_write_data_dir(corpus, cfg, data_dir))

    # 3. tokenizer ------------------------------------------------------------
    t = time.perf_counter()
    tokenizer = train_tokenizer(
        tokenizer_texts(corpus, cfg.tokenizer_chars_per_domain),
        vocab_size=cfg.vocab_size,
        model_max_length=cfg.max_position_embeddings,
    )
    metrics["tokenizer_seconds"] = time.perf_counter() - t
    vocab = len(tokenizer)
    train_ids = {d: encode_documents(tokenizer, [x.text for x in corpus.domain_docs("train", d)]) for d in DOMAINS}
    ho_ids = {d: encode_documents(tokenizer, [x.text for x in corpus.domain_docs("heldout", d)]) for d in DOMAINS}
    for dom in DOMAINS:
        metrics[f"tokens_train_{dom}"] = len(train_ids[dom])
        metrics[f"tokens_heldout_{dom}"] = len(ho_ids[dom])
        if len(train_ids[dom]) <= cfg.seq_len + 1:
            raise ValueError(
                f"domain {dom!r} has only {len(train_ids[dom])} train tokens, not more than seq_len + 1 = "
                f"{cfg.seq_len + 1}: raise max_corpus_chars_per_domain or lower seq_len"
            )
    windows = {dom: eval_windows(ho_ids[dom], cfg.seq_len, cfg.eval_max_tokens_per_domain) for dom in DOMAINS}

    # 4. model + training -----------------------------------------------------
    mconf = make_model_config(cfg, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = Qwen3MoeForCausalLM(mconf).float()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False,
        max_new_tokens=64,
    )
    total, active = param_counts(model, cfg.num_experts, cfg.top_k)
    metrics["params_total"] = total
    metrics["params_active"] = active
    say(f"model: {total / 1e6:.2f} M params ({active / 1e6:.2f} M active), vocab {vocab}")

    _, usage_init = evaluate(model, windows)
    for k, v in specialization_metrics(usage_init).items():
        metrics[f"init_{k}"] = v

    streams = [torch.tensor(train_ids[dom], dtype=torch.long) for dom in DOMAINS]
    metrics.update(train_model(model, streams, cfg, log=say))

    # 5. evaluation -----------------------------------------------------------
    ppl32, usage = evaluate(model, windows)
    for k, v in specialization_metrics(usage).items():
        metrics[f"trained_{k}"] = v
    for dom, share in top2_share_by_domain(usage, DOMAINS).items():
        metrics[f"trained_top2_share_{dom}"] = share
    if metrics["init_jsd_bits"] > 0:
        metrics["jsd_ratio_trained_vs_init"] = metrics["trained_jsd_bits"] / metrics["init_jsd_bits"]

    for dom in DOMAINS:
        metrics[f"heldout_ppl_fp32_{dom}"] = ppl32[dom]
        unll, un = unigram_nll(train_ids[dom], windows[dom], vocab)
        metrics[f"unigram_ppl_{dom}"] = math.exp(unll / un)
        metrics[f"heldout_tokens_{dom}"] = un
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    # bf16-rounded weights, fp32 compute: isolates the storage precision
    m32 = Qwen3MoeForCausalLM(mconf).float()
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for dom, ppl in _heldout_ppl(m32, windows).items():
        metrics[f"heldout_ppl_bf16w_{dom}"] = ppl
    del m32

    # 6. save + verify + move into place ---------------------------------------
    with atomic_output_dir(model_dir, overwrite=True) as model_tmp:
        extra = {"SOURCES.md": sources_markdown(corpus, cfg), "NOTICE": NOTICE_TEXT}
        save_model_dir(model, tokenizer, model_tmp, cfg.max_shard_size, extra)
        problems = check_model_dir(model_tmp)
        if problems:
            raise RuntimeError("saved reference model is incomplete: " + "; ".join(problems))
        loaded = AutoModelForCausalLM.from_pretrained(str(model_tmp))
        metrics["loaded_dtype"] = str(next(loaded.parameters()).dtype).replace("torch.", "")
        for dom, ppl in _heldout_ppl(loaded, windows).items():
            metrics[f"heldout_ppl_{dom}"] = ppl
        del loaded
        metrics["model_size_bytes"] = tree_bytes(model_tmp)
        metrics["weights_size_bytes"] = sum(p.stat().st_size for p in model_tmp.glob("*.safetensors"))
        metrics["num_shards"] = len(list(model_tmp.glob("model-*.safetensors")))
        metrics["build_seconds"] = time.perf_counter() - t_start
        info = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                "metrics": metrics}
        info["config"]["cache_dir"] = None  # machine-specific
        (model_tmp / "reference_build.json").write_text(json.dumps(info, indent=2) + "\n")
        metrics["model_size_bytes"] = tree_bytes(model_tmp)
    metrics["build_seconds"] = time.perf_counter() - t_start
    say(
        "held-out ppl (model / unigram): "
        + ", ".join(f"{d} {metrics[f'heldout_ppl_{d}']:.2f} / {metrics[f'unigram_ppl_{d}']:.1f}" for d in DOMAINS)
    )
    say(
        f"routing JSD {metrics['trained_jsd_bits']:.3f} bits (init {metrics['init_jsd_bits']:.3f}), "
        f"top-2 share {metrics['trained_top2_share']:.2f} (init {metrics['init_top2_share']:.2f})"
    )
    return metrics
