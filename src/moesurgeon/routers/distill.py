"""Distil a custom router into the family's standard router weights, for checkpoints that need no custom code.

Why not the router-LoRA trainer (moesurgeon/lora)? Its objective is next-token loss plus load
balancing over whole-model forwards; here the target is the custom router's *selection*, per layer.
Selections depend only on the router input, so the teacher is run once with the custom routers in
place on a random sample of whole blocks (about `max_tokens` real tokens), and for every such token
each layer's router input, the custom (edited) logits and the custom top-k are cached. Each
layer's router weight (and a router bias where the family has one as a Parameter, gpt_oss) is
then trained on that cache alone — teacher forcing, no model forwards in the loop, seconds on a
CPU. The update is full-rank: E x H parameters per layer, the size of a rank-E/2 LoRA on that
matrix, so low rank would save nothing worth the extra machinery; merging is writing it back.

Student logits are the family's own: the router's forward is called with the trainable tensors
(`torch.func.functional_call`), so fp32 casts and biases are exactly the family's.

Loss per token, in the family's choice space (logits; sigmoid score + correction bias for
deepseek_v3): a pairwise ranking term, softplus(margin - (c_selected - c_other)) over every
(selected, not selected) pair of the teacher's top-k, which is what top-k agreement needs; plus
`kl_weight` x KL(teacher distribution || student distribution) over all experts, which keeps the
routing weights close. The group limit of deepseek_v3 is not modelled in the loss; it is in the
measured agreement.

Agreement is measured end to end by the caller (agreement.py) on held-out data: later layers then
see hidden states shaped by the student's earlier choices, as a deployed checkpoint would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..arch import ArchAdapter, MoELayer
from ..data import TokenBlocks
from ..hooks import forward_hooks
from ..models import input_device
from .agreement import label_groups
from .errors import RouterConfigError
from .selection import has_choice_bias
from .substitute import is_substituted

log = logging.getLogger("moesurgeon")


@dataclass
class DistillConfig:
    steps: int = 300              # optimizer steps per layer
    lr: float = 1e-2
    batch_tokens: int = 4096      # cached tokens per step
    max_tokens: int = 50_000      # real tokens (whole blocks) run and cached; memory ~ max_tokens x hidden x 4 B per layer
    margin: float = 1.0           # ranking margin, in logits (x0.1 in sigmoid choice space)
    kl_weight: float = 0.5
    train_bias: bool = True       # also train a router bias Parameter where the family has one (gpt_oss)
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_tokens", "max_tokens"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RouterConfigError(f"distill.{key}={v!r}: expected a positive integer")
        if not self.lr > 0:
            raise RouterConfigError(f"distill.lr={self.lr!r}: expected a positive learning rate, e.g. 1e-2")
        if self.kl_weight < 0 or self.margin < 0:
            raise RouterConfigError(f"distill.kl_weight={self.kl_weight}, distill.margin={self.margin}: expected >= 0")


@dataclass
class TeacherCache:
    hidden: torch.Tensor   # [N, H] router inputs
    logits: torch.Tensor   # [N, E] float32, the custom router's (edited) logits
    indices: torch.Tensor  # [N, k] the custom router's selection


def sample_blocks(blocks: TokenBlocks, max_tokens: int, seed: int = 0) -> TokenBlocks:
    """A seeded random subset of whole blocks holding about `max_tokens` real tokens (all blocks if fewer).

    Whole blocks, not scattered tokens, so the teacher pass costs max_tokens forwards rather than the split."""
    if blocks.num_tokens() <= max_tokens:
        return blocks
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    counts = blocks.attention_mask.sum(-1)[order].cumsum(0)
    take = order[: int((counts < max_tokens).sum()) + 1].sort().values
    return TokenBlocks(blocks.input_ids[take], blocks.attention_mask[take], blocks.labels[take], list(blocks.label_names))


@torch.no_grad()
def collect_teacher(model, adapter: ArchAdapter, blocks: TokenBlocks, batch_size: int = 8, max_tokens: int = 50_000,
                    scope: Callable[[str], AbstractContextManager] | None = None, seed: int = 0) -> dict[int, TeacherCache]:
    """Run the model (custom routers substituted) on ~max_tokens real tokens and cache them per MoE layer."""
    layers = adapter.moe_layers(model)
    device = input_device(model)
    parts: dict[int, list[tuple]] = {layer.index: [] for layer in layers}
    state = {"keep": None}

    def hook_for(layer: MoELayer):
        def hook(module, inputs, output):
            keep = state["keep"].to(output[0].device)
            h = inputs[0].reshape(-1, inputs[0].shape[-1])[keep]
            parts[layer.index].append((h.cpu(), output[0].reshape(-1, output[0].shape[-1])[keep].float().cpu(),
                                       output[2].reshape(-1, output[2].shape[-1])[keep].cpu()))
        return hook

    with forward_hooks([(layer.router, hook_for(layer)) for layer in layers]):
        for label, group in label_groups(sample_blocks(blocks, max_tokens, seed)).items():
            with scope(label) if scope is not None else nullcontext():
                for batch in group.batches(batch_size):
                    state["keep"] = batch["attention_mask"].reshape(-1).bool()
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return {i: TeacherCache(*(torch.cat(c) for c in zip(*p))) for i, p in parts.items() if p}


def _choice(layer: MoELayer, adapter: ArchAdapter, logits: torch.Tensor) -> torch.Tensor:
    if has_choice_bias(layer):
        return logits.sigmoid() + layer.router.e_score_correction_bias.float()
    return logits


def _log_dist(adapter: ArchAdapter, logits: torch.Tensor) -> torch.Tensor:
    if adapter.scoring == "sigmoid":
        s = logits.sigmoid().clamp_min(1e-30)
        return (s / s.sum(-1, keepdim=True)).log()
    return logits.log_softmax(dim=-1)


def distill_loss(layer: MoELayer, adapter: ArchAdapter, student: torch.Tensor, teacher: torch.Tensor,
                 indices: torch.Tensor, margin: float, kl_weight: float) -> torch.Tensor:
    unit = 0.1 if has_choice_bias(layer) or adapter.scoring == "sigmoid" else 1.0
    c = _choice(layer, adapter, student) / unit
    selected = torch.zeros_like(c, dtype=torch.bool).scatter_(1, indices, True)
    pos = c.gather(1, indices)                                   # [N, k]
    gap = pos.unsqueeze(-1) - c.unsqueeze(1)                     # [N, k, E]: selected minus every expert
    pairs = (~selected).unsqueeze(1).expand_as(gap)
    rank = F.softplus(margin - gap)[pairs].mean()
    if kl_weight == 0:
        return rank
    target = _log_dist(adapter, teacher).exp()                   # 0 where the teacher has -inf
    kl = F.kl_div(_log_dist(adapter, student), target, reduction="batchmean")
    return rank + kl_weight * kl


def _params(layer: MoELayer, train_bias: bool) -> dict[str, torch.Tensor]:
    """float32 copies of every router Parameter; the weight (and a bias, if asked) require grad.
    All are passed so that a bf16 model's bias does not meet float32 inputs in F.linear."""
    out = {}
    for name, p in layer.router.named_parameters(recurse=False):
        trainable = name == "weight" or (train_bias and name == "bias")
        out[name] = p.detach().float().clone().requires_grad_(trainable)
    if "weight" not in out:
        raise RouterConfigError(f"{layer.router_name} has no `weight` Parameter: distillation trains routers that "
                                "hold an [experts, hidden] weight")
    return out


def distill_layer(layer: MoELayer, adapter: ArchAdapter, cache: TeacherCache, cfg: DistillConfig
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train one router on its cache; returns (new float32 tensors by router attribute, stats)."""
    router = layer.router
    if is_substituted(router):
        raise RouterConfigError(f"{layer.router_name} still routes through a custom router: restore the "
                                "substitution before training the standard router")
    params = _params(layer, cfg.train_bias)
    device = router.weight.device
    hidden = cache.hidden.to(device, torch.float32)
    teacher, indices = cache.logits.to(device), cache.indices.to(device)
    opt = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + layer.index)
    n = hidden.shape[0]
    first = last = float("nan")
    for step in range(cfg.steps):
        for g in opt.param_groups:  # cosine decay to 10%: large steps first, then settle
            g["lr"] = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        rows = torch.randint(0, n, (min(cfg.batch_tokens, n),), generator=gen).to(device)
        logits = functional_call(router, params, (hidden[rows],))[0].float()
        loss = distill_loss(layer, adapter, logits, teacher[rows], indices[rows], cfg.margin, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if step == 0 else first
    with torch.no_grad():
        chosen = functional_call(router, params, (hidden,))[2]
        agree = (indices.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1).float().mean()
    return {k: v.detach() for k, v in params.items() if v.requires_grad}, {"first_loss": first, "final_loss": last,
                                                        "teacher_forced_agreement": float(agree), "tokens": n}


def distill_routers(model, adapter: ArchAdapter, caches: dict[int, TeacherCache], cfg: DistillConfig
                    ) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, float]]:
    """Train every cached layer's router; returns ({layer index: new tensors}, flat metrics)."""
    new, metrics = {}, {}
    for layer in adapter.moe_layers(model):
        if layer.index not in caches:
            continue
        tensors, stats = distill_layer(layer, adapter, caches[layer.index], cfg)
        new[layer.index] = tensors
        for key, value in stats.items():
            metrics[f"distill/{key}/layer{layer.index}"] = value
        log.info("distilled %s: loss %.4f -> %.4f, teacher-forced agreement %.3f on %d tokens", layer.router_name,
                 stats["first_loss"], stats["final_loss"], stats["teacher_forced_agreement"], stats["tokens"])
    return new, metrics


@torch.no_grad()
def write_router_tensors(model, adapter: ArchAdapter, new: dict[int, dict[str, torch.Tensor]],
                         store_dtype: torch.dtype | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Copy new router tensors into the model (rounded through `store_dtype`, the checkpoint's, so memory
    equals what an export writes); returns the previous tensors for undoing."""
    previous = {}
    for layer in adapter.moe_layers(model):
        if layer.index not in new:
            continue
        previous[layer.index] = {}
        for name, value in new[layer.index].items():
            target = getattr(layer.router, name)
            previous[layer.index][name] = target.detach().clone()
            v = value.to(store_dtype) if store_dtype is not None else value
            target.copy_(v.to(target.device, target.dtype).reshape(target.shape))
    return previous
