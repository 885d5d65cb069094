"""Training the reference MoE: its Qwen3-MoE config, domain-balanced batches, the loss and the AdamW loop.

Plain PyTorch on CPU, deterministic for a fixed seed and thread count: the shipped weights are
reproducible bit for bit, so every number-affecting detail here (the order of a multiplication in the
schedule, the reduction in the balance loss) is part of the build's definition and must not change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..arch import get_adapter
from ..lora.schedule import lr_factor
from .settings import ReferenceBuildConfig


def make_model_config(cfg: ReferenceBuildConfig, vocab_size: int, eos_id: int, pad_id: int):
    """The ``Qwen3MoeConfig`` of the reference model: every layer sparse, tied embeddings."""
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


def _router_param_ids(model: torch.nn.Module) -> set[int]:
    return {id(p) for layer in get_adapter(model).moe_layers(model) for p in layer.router.parameters()}


def param_counts(model: torch.nn.Module, num_experts: int, top_k: int) -> tuple[int, int]:
    """(total, active-per-token) parameters; tied embeddings counted once.

    Expert parameters are those of the MoE blocks other than their routers (the reference model has
    no shared experts); a token uses ``top_k / num_experts`` of them."""
    moe_layers = get_adapter(model).moe_layers(model)
    in_experts = {id(p) for layer in moe_layers for p in layer.block.parameters()} - _router_param_ids(model)
    seen: set[int] = set()
    total = expert = 0
    for p in model.parameters():  # remove_duplicate: tied weights once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in in_experts:
            expert += p.numel()
    active = total - expert + expert * top_k // num_experts
    return total, active


def lr_at(step: int, cfg: ReferenceBuildConfig) -> float:
    """Learning rate of optimizer step ``step``: linear warmup, then cosine down to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        # The shipped build multiplies before dividing. `cfg.lr * lr_factor(...)` is the same warmup
        # but rounds differently by 1 ulp on some steps (2, 5, 6, 10, ... of the shipped config),
        # which would change the shipped weights, so the warmup keeps this order.
        return cfg.lr * (step + 1) / cfg.warmup_steps
    # after warmup the package's schedule is bit-identical to the build's original formula
    return cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, "cosine", cfg.min_lr_ratio)


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

    Same formula and scale as transformers' ``load_balancing_loss_func`` and moesurgeon's
    ``lora.losses.load_balancing_loss`` (``top_k`` when perfectly balanced), but those pool the
    statistics of all layers, which lets individual layers leave experts unused; this one balances
    every layer. Applying the package's loss to one layer at a time gives the same value in exact
    arithmetic but not in floating point: its gradients differ in the last bits whenever the tokens
    per step are not a power of two, and its value by 1 ulp on some steps, so the build keeps this
    reduction to stay reproducible.
    """
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        probs = logits.float().softmax(-1)
        sel = probs.topk(top_k, dim=-1).indices
        frac = F.one_hot(sel, num_experts).float().mean(0)  # [k, E] share of tokens per slot
        losses.append((frac * probs.mean(0)).sum() * num_experts)
    return torch.stack(losses).mean()


def _optimizer(model: torch.nn.Module, cfg: ReferenceBuildConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms, biases and the routers are not decayed."""
    routers = _router_param_ids(model)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 and id(p) not in routers else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def train_model(
    model: torch.nn.Module,
    streams: Sequence[torch.Tensor],
    cfg: ReferenceBuildConfig,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``cfg.steps`` steps on domain-balanced windows of ``streams`` (one token
    stream per domain); returns throughput and the final LM / balance losses (mean of the last 50 steps)."""
    from tqdm.auto import tqdm

    opt = _optimizer(model, cfg)
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
            # out.loss already contains transformers' pooled aux loss: swap it for the per-layer one
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
