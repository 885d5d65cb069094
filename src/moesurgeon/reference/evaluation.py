"""Held-out evaluation of the reference build: perplexity per domain against an add-one unigram baseline,
and how specialised the routing is (expert usage per domain, the JSD between the domains).

Perplexity is moesurgeon's own `evaluate_perplexity`; the routing is read with forward hooks on the
routers the architecture adapter lists, and summarised with the probe's entropy/JSD functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..arch import get_adapter
from ..data import TokenBlocks
from ..evaluate import evaluate_perplexity
from ..hooks import forward_hooks
from ..probe.stats import js_divergence_bits


def eval_windows(ids: Sequence[int], seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seq_len`` over a token stream (last one may be shorter)."""
    t = torch.tensor(list(ids)[: max_tokens] if max_tokens else list(ids), dtype=torch.long)
    return [t[i : i + seq_len] for i in range(0, len(t), seq_len) if len(t[i : i + seq_len]) >= 2]


def _blocks_by_length(windows: Sequence[torch.Tensor]) -> list[TokenBlocks]:
    """One unlabelled `TokenBlocks` per window length, shortest first: equal-length windows batch
    without padding, so every forward pass sees exactly the tokens of its windows."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    out = []
    for _, ws in sorted(by_len.items()):
        ids = torch.stack(ws)
        out.append(TokenBlocks(ids, torch.ones_like(ids), torch.full((len(ws),), -1, dtype=torch.long)))
    return out


def heldout_nll(model: torch.nn.Module, windows: Sequence[torch.Tensor], batch_size: int = 16) -> tuple[float, int]:
    """Summed next-token NLL (nats) and number of predicted tokens over ``windows``."""
    model.eval()
    total = 0.0
    n = 0
    for blocks in _blocks_by_length(windows):
        result = evaluate_perplexity(model, blocks, batch_size, progress=False)
        total += result.nll_sum["all"]
        n += result.tokens["all"]
    return total, n


def unigram_nll(train_ids: Sequence[int], windows: Sequence[torch.Tensor], vocab_size: int) -> tuple[float, int]:
    """Add-one smoothed unigram (estimated on ``train_ids``) scored on the same targets as the model."""
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    targets = np.concatenate([w[1:].numpy() for w in windows])
    return float(-logp[targets].sum()), int(targets.size)


def evaluate(
    model: torch.nn.Module, windows_by_domain: dict[str, list[torch.Tensor]], batch_size: int = 16
) -> tuple[dict[str, float], np.ndarray]:
    """Held-out perplexity per domain and top-k assignment counts ``[layers, domains, experts]``."""
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    num_experts = max(layer.num_experts for layer in layers)
    usage = torch.zeros(len(layers), len(windows_by_domain), num_experts, dtype=torch.float64)

    def counter(li: int, di: int):
        def hook(_module, _inputs, output) -> None:
            chosen = adapter.routing(layers[li], output).indices.reshape(-1).cpu()
            usage[li, di] += torch.bincount(chosen, minlength=num_experts)

        return hook

    ppl: dict[str, float] = {}
    for di, (dom, ws) in enumerate(windows_by_domain.items()):
        with forward_hooks([(layer.router, counter(li, di)) for li, layer in enumerate(layers)]):
            nll, n = heldout_nll(model, ws, batch_size)
        ppl[dom] = math.exp(nll / n)
    return ppl, usage.numpy()


def _top2(p: torch.Tensor) -> torch.Tensor:
    return p.topk(min(2, p.shape[-1]), dim=-1).values.sum(-1)


def specialization_metrics(usage: np.ndarray) -> dict[str, float]:
    """Routing specialisation summary of the usage counts returned by :func:`evaluate`.

    * ``jsd_bits``: mean over layers of the generalised Jensen-Shannon divergence
      between the domains' usage distributions (equal weights; max log2(#domains)).
    * ``pairwise_jsd_bits``: mean over layers and domain pairs of the two-way JSD (max 1).
    * ``top2_share``: mean over layers and domains of the share of a domain's routed
      assignments that go to its two most used experts (uniform = 2 / experts).
    """
    p = torch.as_tensor(usage, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)  # [L, D, E]
    domains = p.shape[1]
    pairs = [js_divergence_bits(p[:, [a, b]]) for a in range(domains) for b in range(a + 1, domains)]
    return {
        "jsd_bits": float(js_divergence_bits(p).mean()),
        "pairwise_jsd_bits": float(torch.stack(pairs).mean()),
        "top2_share": float(_top2(p).mean()),
    }


def top2_share_by_domain(usage: np.ndarray, domains: Sequence[str]) -> dict[str, float]:
    """{domain: mean over layers of the share of its assignments taken by its two most used experts}."""
    p = torch.as_tensor(usage, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    return {dom: float(_top2(p[:, di]).mean()) for di, dom in enumerate(domains)}
