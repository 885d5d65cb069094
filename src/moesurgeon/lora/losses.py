"""The training objective of router LoRA: next-token loss plus a load-balancing loss we compute ourselves.

Why not use the model's `loss` / `aux_loss`?
- `loss` already contains `config.router_aux_loss_coef * aux_loss`; the experiment's own coefficient
  must be the one that applies (`total = lm + coef * aux`), so the LM part is computed here.
- Not every family returns `aux_loss` (DeepSeek-V3 in transformers 5.23 returns router logits but
  no aux loss), and padding handling differs. One function for every family keeps the objective
  comparable across them.

`load_balancing_loss` is the Switch-Transformer loss exactly as transformers computes it for
softmax routers (counts and probabilities summed over all layers, then E * sum_i f_i * P_i), so on
Qwen/Mixtral/OLMoE it equals the model's own `aux_loss` (tested). The per-token distribution over
experts is the adapter's (`adapter.distribution`): for sigmoid routers (DeepSeek-V3) the scores
normalised to sum to 1 per token, and the selection used for f_i is the plain top-k of it (the
real selection also adds the family's choice bias and group limit, which carry no gradient anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..arch import ArchAdapter


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over real tokens, and how many targets it averaged."""
    target_ok = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    targets = input_ids[:, 1:].masked_fill(~target_ok, -100)
    n = int(target_ok.sum())
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss / max(n, 1), n


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    attention_mask: torch.Tensor | None,
    adapter: ArchAdapter,
) -> torch.Tensor:
    """Switch load-balancing loss over all MoE layers; padding excluded. 1.0 x k means perfectly balanced.
    `adapter` gives the family's distribution over experts."""
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
        probs = adapter.distribution(logits.to(device).reshape(-1, num_experts))
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
                         adapter: ArchAdapter) -> list[float]:
    """Mean entropy (bits) of each MoE layer's distribution over experts (the adapter's), over real tokens."""
    mask = attention_mask.reshape(-1).float()
    out = []
    for logits in router_logits:
        p = adapter.distribution(logits.reshape(-1, logits.shape[-1])).to(mask.device)
        h = -(p * p.clamp_min(1e-30).log2()).sum(-1)
        out.append(float((h * mask).sum() / mask.sum().clamp_min(1.0)))
    return out
