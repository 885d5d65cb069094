"""The training objective of router LoRA: next-token loss plus a load-balancing loss we compute ourselves.

Why not use the model's `loss` / `aux_loss`?
- `loss` already contains `config.router_aux_loss_coef * aux_loss`; the experiment's own coefficient
  must be the one that applies (`total = lm + coef * aux`), so the LM part is computed here.
- Not every family returns `aux_loss` (DeepSeek-V3 in transformers 5.23 returns router logits but
  no aux loss), and padding handling differs. One function for every family keeps the objective
  comparable across them.

`load_balancing_loss` is the Switch-Transformer loss exactly as transformers computes it for
softmax routers (counts and probabilities summed over all layers, then E * sum_i f_i * P_i), so on
Qwen/Mixtral/OLMoE it equals the model's own `aux_loss` (tested). For sigmoid routers
(DeepSeek-V3) scores are normalised to sum to 1 per token first, and the selection used for f_i
is the plain top-k of the scores (the real selection also adds the correction bias and the group
limit, which carry no gradient anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over real tokens, and how many targets it averaged."""
    target_ok = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    targets = input_ids[:, 1:].masked_fill(~target_ok, -100)
    n = int(target_ok.sum())
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss / max(n, 1), n


def router_probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-token distribution over experts, [T, E] float32, summing to 1."""
    logits = logits.float()
    if scoring == "softmax":
        return logits.softmax(dim=-1)
    if scoring == "sigmoid":
        scores = logits.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    raise ValueError(f"scoring={scoring!r}: expected 'softmax' or 'sigmoid'")


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    attention_mask: torch.Tensor | None,
    scoring: str = "softmax",
) -> torch.Tensor:
    """Switch load-balancing loss over all MoE layers; padding excluded. 1.0 x k means perfectly balanced."""
    if not router_logits:
        raise ValueError(
            "the model returned no router logits with output_router_logits=True: the routers were replaced "
            "by a module of another class, so transformers' output recorder no longer sees them"
        )
    device = router_logits[0].device
    num_experts = router_logits[0].shape[-1]
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        probs = router_probs(logits.to(device).reshape(-1, num_experts), scoring)
        weight = (torch.ones(probs.shape[0], device=device) if attention_mask is None
                  else attention_mask.reshape(-1).to(device=device, dtype=torch.float32))
        if weight.shape[0] != probs.shape[0]:
            raise ValueError(
                f"router logits have {probs.shape[0]} rows but the attention mask covers {weight.shape[0]} "
                "tokens; pass the mask of the same batch"
            )
        chosen = probs.topk(top_k, dim=-1).indices  # no gradient flows through the choice (as in Switch)
        counts = counts.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * weight[:, None]).sum(0)
        rows = rows + weight.sum()
    rows = rows.clamp_min(1.0)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


@torch.no_grad()
def routing_entropy_bits(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor,
                         scoring: str = "softmax") -> list[float]:
    """Mean entropy (bits) of each MoE layer's distribution over experts, over real tokens."""
    mask = attention_mask.reshape(-1).float()
    out = []
    for logits in router_logits:
        p = router_probs(logits.reshape(-1, logits.shape[-1]), scoring).to(mask.device)
        h = -(p * p.clamp_min(1e-30).log2()).sum(-1)
        out.append(float((h * mask).sum() / mask.sum().clamp_min(1.0)))
    return out
