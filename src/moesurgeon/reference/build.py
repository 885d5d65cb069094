"""Build (train) the embedded reference MoE from scratch, offline and deterministically.

Pipeline (:func:`build_reference`):

1. assemble the four-domain corpus with held-out splits (:mod:`.corpus`);
2. write the data directory (``train.jsonl`` subset, ``heldout.jsonl``,
   ``SOURCES.md``, licence texts);
3. train the byte-level BPE (:mod:`.tokenizer`) on the train split;
4. train a small ``Qwen3MoeForCausalLM`` with the load-balancing aux loss on
   domain-balanced batches (plain PyTorch, AdamW, warmup + cosine);
5. evaluate held-out perplexity per domain (fp32, bf16 weights, reloaded
   checkpoint) against an add-one unigram baseline, and a quick routing
   specialisation check (JSD between the domains' expert usage, trained vs the
   same model at initialisation);
6. save a standard, sharded (>= 2 safetensors shards + index), bf16 model
   directory, verify it loads with ``AutoModelForCausalLM``, and move it into
   place atomically.

Library code: typed arguments only (no Hydra/DictConfig here).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import (
    DOMAINS,
    Corpus,
    build_corpus,
    copy_licences,
    sha256_file,
    shipped_train_subset,
    write_jsonl,
)
from .tokenizer import encode_documents, save_tokenizer, train_tokenizer


@dataclass
class ReferenceBuildConfig:
    """Everything that determines a reference build."""

    seed: int = 0
    # training budget
    steps: int = 600
    batch_size: int = 16  # sequences per step, split evenly across the domains
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # architecture
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 16
    moe_intermediate_size: int = 128
    top_k: int = 2
    router_aux_loss_coef: float = 0.01
    aux_loss: str = "per_layer"  # "per_layer" (balance every layer) | "hf" (transformers' pooled loss)
    vocab_size: int = 4096
    max_position_embeddings: int = 2048
    # data
    heldout_bytes_per_domain: int = 80_000  # UTF-8 bytes of text in the held-out split
    shipped_train_bytes_per_domain: int = 300_000  # size of the shipped train.jsonl sample
    tokenizer_chars_per_domain: int = 1_500_000  # cap per domain for BPE training (balance)
    max_corpus_chars_per_domain: int | None = None  # cap for smoke builds
    math_train_docs: int = 2000
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/moesurgeon/reference"))
    # evaluation
    eval_max_tokens_per_domain: int | None = None
    # runtime / output
    threads: int = 2
    max_shard_size: str = "4MB"
    progress: bool = True

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        if self.batch_size % len(DOMAINS):
            raise ValueError(f"batch_size must be a multiple of {len(DOMAINS)} (domain-balanced batches)")
        if self.aux_loss not in ("per_layer", "hf"):
            raise ValueError(f"aux_loss must be 'per_layer' or 'hf', not {self.aux_loss!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError("top_k must be in [1, num_experts]")


# --------------------------------------------------------------------------- model


def make_model_config(cfg: ReferenceBuildConfig, vocab_size: int, eos_id: int, pad_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,  # unused: every layer is sparse
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=False,  # turned on explicitly in the training forward
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )


def param_counts(model: torch.nn.Module, num_experts: int, top_k: int) -> tuple[int, int]:
    """(total, active-per-token) parameters; tied embeddings counted once."""
    seen: set[int] = set()
    total = expert = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".mlp.experts." in name:
            expert += p.numel()
    active = total - expert + expert * top_k // num_experts
    return total, active


def lr_at(step: int, cfg: ReferenceBuildConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def sample_batch(
    streams: Sequence[torch.Tensor], gen: torch.Generator, batch_size: int, seq_len: int
) -> torch.Tensor:
    """Domain-balanced batch: ``batch_size / len(streams)`` random windows per domain."""
    per = batch_size // len(streams)
    rows = []
    for s in streams:
        starts = torch.randint(0, len(s) - seq_len, (per,), generator=gen)
        rows += [s[i : i + seq_len] for i in starts.tolist()]
    return torch.stack(rows)


def per_layer_balance_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss computed per MoE layer, averaged over layers.

    Same formula and scale as transformers' ``load_balancing_loss_func`` (``top_k`` when
    perfectly balanced), but that function pools the statistics of all layers, which
    lets individual layers leave experts unused; this one balances every layer.
    """
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        probs = logits.float().softmax(-1)
        sel = probs.topk(top_k, dim=-1).indices
        frac = F.one_hot(sel, num_experts).float().mean(0)  # [k, E] share of tokens per slot
        losses.append((frac * probs.mean(0)).sum() * num_experts)
    return torch.stack(losses).mean()


def train_model(
    model: torch.nn.Module,
    streams: Sequence[torch.Tensor],
    cfg: ReferenceBuildConfig,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    from tqdm.auto import tqdm

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and ".mlp.gate." not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    t0 = time.perf_counter()
    ntok = 0
    ema = None
    lm_hist: list[float] = []
    aux_hist: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train reference MoE", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x = sample_batch(streams, gen, cfg.batch_size, cfg.seq_len)
        out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        if cfg.aux_loss == "per_layer":
            lm_t = out.loss - cfg.router_aux_loss_coef * out.aux_loss
            aux_t = per_layer_balance_loss(out.router_logits, cfg.top_k)
            loss = lm_t + cfg.router_aux_loss_coef * aux_t
        else:  # transformers' load_balancing_loss_func: statistics pooled over all layers
            loss, aux_t = out.loss, out.aux_loss
            lm_t = loss - cfg.router_aux_loss_coef * aux_t
        aux = aux_t.item()
        lm = lm_t.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ntok += x.numel()
        lm_hist.append(lm)
        aux_hist.append(aux)
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        el = time.perf_counter() - t0
        bar.set_postfix(loss=f"{ema:.3f}", aux=f"{aux:.3f}", lr=f"{lr_at(step, cfg):.1e}", tok_s=f"{ntok / el:,.0f}")
        if log is not None and (step % 100 == 0 or step == cfg.steps - 1):
            log(f"step {step} lm {lm:.4f} aux {aux:.4f} tok/s {ntok / el:.0f}")
    bar.close()
    el = time.perf_counter() - t0
    tail = max(1, min(50, len(lm_hist)))
    model.eval()
    return {
        "train_seconds": el,
        "train_tokens": float(ntok),
        "train_tokens_per_s": ntok / el if el > 0 else 0.0,
        "train_final_lm_loss": float(np.mean(lm_hist[-tail:])) if lm_hist else float("nan"),
        "train_final_aux_loss": float(np.mean(aux_hist[-tail:])) if aux_hist else float("nan"),
    }


# --------------------------------------------------------------------------- evaluation


def eval_windows(ids: Sequence[int], seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seq_len`` over a token stream (last one may be shorter)."""
    t = torch.tensor(list(ids)[: max_tokens] if max_tokens else list(ids), dtype=torch.long)
    return [t[i : i + seq_len] for i in range(0, len(t), seq_len) if len(t[i : i + seq_len]) >= 2]


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, windows: Sequence[torch.Tensor], batch_size: int = 16) -> tuple[float, int]:
    """Summed next-token NLL (nats) and number of predicted tokens over ``windows``."""
    model.eval()
    total = 0.0
    n = 0
    # group equal-length windows so they batch without padding
    by_len: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    for _, ws in sorted(by_len.items()):
        for i in range(0, len(ws), batch_size):
            x = torch.stack(ws[i : i + batch_size])
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            n += x[:, 1:].numel()
    return total, n


def unigram_nll(train_ids: Sequence[int], windows: Sequence[torch.Tensor], vocab_size: int) -> tuple[float, int]:
    """Add-one smoothed unigram (estimated on ``train_ids``) scored on the same targets as the model."""
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    targets = np.concatenate([w[1:].numpy() for w in windows])
    return float(-logp[targets].sum()), int(targets.size)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, windows_by_domain: dict[str, list[torch.Tensor]], batch_size: int = 16
) -> tuple[dict[str, float], np.ndarray]:
    """Held-out perplexity per domain and top-k assignment counts ``[layers, domains, experts]``.

    Routing is captured with forward hooks on ``model.model.layers[i].mlp.gate``
    (output: logits, top-k weights, top-k indices).
    """
    layers = model.model.layers
    num_experts = model.config.num_experts
    usage = np.zeros((len(layers), len(windows_by_domain), num_experts), dtype=np.float64)
    cur = {"d": 0}

    def make_hook(li: int):
        def hook(_mod, _inp, out):
            idx = out[2].reshape(-1)
            usage[li, cur["d"]] += torch.bincount(idx, minlength=num_experts).numpy()

        return hook

    ppl: dict[str, float] = {}
    handles = [layer.mlp.gate.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        for di, (dom, ws) in enumerate(windows_by_domain.items()):
            cur["d"] = di
            nll, n = heldout_nll(model, ws, batch_size)
            ppl[dom] = math.exp(nll / n)
    finally:
        for h in handles:
            h.remove()
    return ppl, usage


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log2(p)).sum(-1)


def specialization_metrics(usage: np.ndarray) -> dict[str, float]:
    """Routing specialisation summary of the usage counts returned by :func:`evaluate`.

    * ``jsd_bits``: mean over layers of the generalised Jensen-Shannon divergence
      between the domains' usage distributions (equal weights; max log2(#domains)).
    * ``pairwise_jsd_bits``: mean over layers and domain pairs of the two-way JSD (max 1).
    * ``top2_share``: mean over layers and domains of the share of a domain's routed
      assignments that go to its two most used experts (uniform = 2 / experts).
    """
    p = usage / usage.sum(-1, keepdims=True)  # [L, D, E]
    gen = _entropy_bits(p.mean(1)) - _entropy_bits(p).mean(1)
    pair = []
    D = p.shape[1]
    for a in range(D):
        for b in range(a + 1, D):
            m = 0.5 * (p[:, a] + p[:, b])
            pair.append(_entropy_bits(m) - 0.5 * (_entropy_bits(p[:, a]) + _entropy_bits(p[:, b])))
    top2 = np.sort(p, axis=-1)[..., -2:].sum(-1)
    return {
        "jsd_bits": float(gen.mean()),
        "pairwise_jsd_bits": float(np.mean(pair)),
        "top2_share": float(top2.mean()),
    }


# --------------------------------------------------------------------------- files


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def replace_dir(src: Path, dest: Path) -> None:
    """Move a finished directory ``src`` to ``dest``, replacing ``dest`` (rename-based)."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_dir_atomic(src: Path, dest: Path) -> None:
    """Copy ``src`` next to ``dest`` under a temporary name, then swap it in."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, tmp)
    try:
        replace_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tmp_sibling(dest: Path) -> Path:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def sources_markdown(corpus: Corpus, cfg: ReferenceBuildConfig, extra: str = "") -> str:
    st = corpus.stats()
    lines = [
        "# Reference MoE: training sources and licences",
        "",
        "Built offline by `moesurgeon.reference.build` (seed "
        f"{cfg.seed}). Every domain below was used to train the tokenizer and the model; the "
        "held-out split of each domain was never trained on.",
        "",
        "| domain | source | obtained from | licence | raw text (chars) | train split: docs / bytes | "
        "held-out split: docs / bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for dom in DOMAINS:
        s = corpus.sources[dom]
        d = st[dom]
        lines.append(
            f"| `{dom}` | {s.name} | {s.origin} | {s.license} | {d['raw_chars']:,} | "
            f"{d['train_docs']:,} / {d['train_bytes']:,} | {d['heldout_docs']:,} / {d['heldout_bytes']:,} |"
        )
    lines += [
        "",
        "Bytes are UTF-8 bytes of document text. The model trains on the whole train split "
        "(domain-balanced batches); the tokenizer on an evenly strided sample of up to "
        f"{cfg.tokenizer_chars_per_domain:,} characters per domain of it.",
    ]
    lines += ["", "## Licence notes", ""]
    for dom in DOMAINS:
        lines.append(f"- `{dom}`: {corpus.sources[dom].license_note}")
    lines += [
        "",
        "## Licence position",
        "",
        "- The moesurgeon code, the generated `math` text and the model weights are distributed under "
        "Apache-2.0. The weights are a statistical model trained on the texts above, which do not appear "
        "in them verbatim; whether trained weights are a derivative work of their training data is not "
        "settled law, so this file (and `NOTICE`) lists every training source and its licence.",
        "- Texts shipped verbatim (`reference_data/*.jsonl`) keep their own licences, marked per record "
        "in the `license` field: `GPL-2.0-only` (Russian fortunes, fortune-mod-ru), `PSF-2.0` "
        "(CPython stdlib excerpts), public domain (Jargon File), `Apache-2.0` (generated maths). They "
        "are data files aggregated with, not linked into, the Apache-2.0 code. Licence texts are "
        "shipped alongside (`LICENSE.GPL-2.0.txt`, `LICENSE.PSF-2.0.txt`).",
        "- A model free of GPL-licensed training data would need the `russian` source replaced by a "
        "permissively licensed one; none was found among the offline sources (Debian, PyPI).",
        "",
        "## Splits",
        "",
        "Held-out documents are chosen per domain as whole source units (a whole stdlib file for "
        "`code`; a chunk of consecutive, globally de-duplicated lexicon entries / fortunes for "
        "`english` / `russian`; a whole generated worksheet from a separate RNG stream for `math`). "
        "`train.jsonl` ships a deterministic ~"
        f"{cfg.shipped_train_bytes_per_domain // 1000} KB per domain sample of the train split; "
        "`heldout.jsonl` is the complete held-out split.",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


NOTICE_TEXT = """moesurgeon reference MoE (weights and tokenizer)
Copyright the moesurgeon authors. Licensed under the Apache License, Version 2.0.

This model and its tokenizer were trained from scratch on the following texts
(see SOURCES.md for sizes, splits and licence notes):

  * CPython standard library source (Lib/*.py). Copyright (c) 2001- Python
    Software Foundation. PSF License Version 2 (LICENSE.PSF-2.0.txt).
  * The Jargon File, version 4.4.7 (Eric S. Raymond et al.), Debian package
    jargon-text. Public domain.
  * fortune-mod-ru, Russian fortune cookies. Copyright 2003 Pavel Maryanov and
    contributors, Debian package fortunes-ru. GNU GPL version 2
    (LICENSE.GPL-2.0.txt).
  * Arithmetic/structured maths text generated by moesurgeon itself.

No text from these sources is stored in the weights files; verbatim excerpts
shipped in reference_data/ keep their own licences (marked per record).
"""


def save_model_dir(model, tokenizer, dest: Path, max_shard_size: str, extra_files: dict[str, str]) -> None:
    model.save_pretrained(str(dest), max_shard_size=max_shard_size)
    # transformers 5 writes `num_local_experts`; add the hub key other runtimes read.
    cj = dest / "config.json"
    conf = json.loads(cj.read_text())
    conf.setdefault("num_experts", conf.get("num_local_experts"))
    cj.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tokenizer, dest)
    # Plain class name for runtimes that predate transformers 5's TokenizersBackend.
    tc = dest / "tokenizer_config.json"
    conf = json.loads(tc.read_text())
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    for name, text in extra_files.items():
        (dest / name).write_text(text, encoding="utf-8")
    copy_licences(dest)
    for p in dest.iterdir():
        p.chmod(0o644)


def tokenizer_texts(corpus: Corpus, chars_per_domain: int) -> list[str]:
    """Train texts for BPE, capped per domain so no single domain dominates the merges."""
    out: list[str] = []
    for dom in DOMAINS:
        docs = corpus.domain_docs("train", dom)
        size = sum(len(d.text) for d in docs)
        stride = max(1, math.ceil(size / max(1, chars_per_domain)))  # spread over the whole domain
        out += [d.text for d in docs[::stride]]
    return out


def check_model_dir(path: Path) -> list[str]:
    """Return a list of problems with a saved reference model directory (empty = fine)."""
    path = Path(path)
    problems = []
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json"):
        if not (path / name).exists():
            problems.append(f"missing {name}")
    shards = sorted(path.glob("model-*.safetensors"))
    if len(shards) < 2:
        problems.append(f"expected >= 2 safetensors shards, found {len(shards)}")
    idx = path / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        missing = {f for f in wm.values()} - {s.name for s in shards}
        if missing:
            problems.append(f"index refers to missing shards {sorted(missing)}")
    return problems


# --------------------------------------------------------------------------- driver


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
    data_tmp = _tmp_sibling(data_dir)
    try:
        shipped = shipped_train_subset(corpus, cfg.shipped_train_bytes_per_domain, cfg.seed)
        write_jsonl(shipped, data_tmp / "train.jsonl")
        write_jsonl(corpus.heldout, data_tmp / "heldout.jsonl")
        (data_tmp / "SOURCES.md").write_text(sources_markdown(corpus, cfg), encoding="utf-8")
        copy_licences(data_tmp)
        for split in ("train", "heldout"):
            metrics[f"data_{split}_bytes"] = (data_tmp / f"{split}.jsonl").stat().st_size
            metrics[f"data_{split}_sha256"] = sha256_file(data_tmp / f"{split}.jsonl")
        replace_dir(data_tmp, data_dir)
    finally:
        if data_tmp.exists():
            shutil.rmtree(data_tmp, ignore_errors=True)

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
            raise ValueError(f"domain {dom!r} has only {len(train_ids[dom])} train tokens (< seq_len)")
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
    p = usage / usage.sum(-1, keepdims=True)
    for di, dom in enumerate(DOMAINS):
        metrics[f"trained_top2_share_{dom}"] = float(np.sort(p[:, di], -1)[:, -2:].sum(-1).mean())
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
    for dom in DOMAINS:
        nll, n = heldout_nll(m32, windows[dom])
        metrics[f"heldout_ppl_bf16w_{dom}"] = math.exp(nll / n)
    del m32

    # 6. save + verify + move into place ---------------------------------------
    model_tmp = _tmp_sibling(model_dir)
    try:
        save_model_dir(
            model,
            tokenizer,
            model_tmp,
            cfg.max_shard_size,
            {
                "SOURCES.md": sources_markdown(corpus, cfg),
                "NOTICE": NOTICE_TEXT,
            },
        )
        problems = check_model_dir(model_tmp)
        if problems:
            raise RuntimeError("saved reference model is incomplete: " + "; ".join(problems))
        loaded = AutoModelForCausalLM.from_pretrained(str(model_tmp))
        metrics["loaded_dtype"] = str(next(loaded.parameters()).dtype).replace("torch.", "")
        for dom in DOMAINS:
            nll, n = heldout_nll(loaded, windows[dom])
            metrics[f"heldout_ppl_{dom}"] = math.exp(nll / n)
        del loaded
        metrics["model_size_bytes"] = _dir_size(model_tmp)
        metrics["weights_size_bytes"] = sum(p.stat().st_size for p in model_tmp.glob("*.safetensors"))
        metrics["num_shards"] = len(list(model_tmp.glob("model-*.safetensors")))
        metrics["build_seconds"] = time.perf_counter() - t_start
        info = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                "metrics": metrics}
        info["config"]["cache_dir"] = None  # machine-specific
        (model_tmp / "reference_build.json").write_text(json.dumps(info, indent=2) + "\n")
        metrics["model_size_bytes"] = _dir_size(model_tmp)
        replace_dir(model_tmp, model_dir)
    finally:
        if model_tmp.exists():
            shutil.rmtree(model_tmp, ignore_errors=True)
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
