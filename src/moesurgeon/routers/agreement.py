"""Record which experts every real token selects in every MoE layer, and compare two such records.

Used to say how closely an exported standard router reproduces a custom one: run the same blocks
through the model with the custom router substituted and again with the exported weights, then
`topk_agreement` is the share of the custom router's selections (token x layer x slot) that the
other one also makes, order ignored: |S_custom ∩ S_other| / k, averaged.

Blocks are run one label group at a time, inside `scope(label)` when given (e.g.
`RoleContext.data_label`, so that label-triggered roles apply), always in the same order, so two
records of the same blocks line up token for token.
"""

from __future__ import annotations

import torch

from ..arch import ArchAdapter
from ..block_runner import Batch, Scope, label_groups, run_blocks
from ..data import TokenBlocks

__all__ = ["Scope", "agreement_metrics", "label_groups", "record_selections", "topk_agreement"]


def record_selections(model, adapter: ArchAdapter, blocks: TokenBlocks, batch_size: int = 8,
                      scope: Scope | None = None) -> dict[str, torch.Tensor]:
    """{label: selected experts [L, N, k] (int16)} over the N real tokens of each label group."""
    layers = adapter.moe_layers(model)
    taken: dict[str, list[list[torch.Tensor]]] = {}

    def hook_for(pos: int):
        def hook(module, inputs, output, batch: Batch) -> None:
            idx = output[2].reshape(-1, output[2].shape[-1])
            per_layer = taken.setdefault(batch.label, [[] for _ in layers])
            per_layer[pos].append(idx[batch.real(idx.device)].to("cpu", torch.int16))
        return hook

    run_blocks(model, blocks, batch_size, hooks=[(layer.router, hook_for(p)) for p, layer in enumerate(layers)],
               by_label=True, scope=scope)
    return {label: torch.stack([torch.cat(t) for t in per_layer]) for label, per_layer in taken.items()}


def topk_agreement(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[L]: mean over tokens of |reference ∩ other| / k for selections [L, N, k]."""
    if reference.shape != other.shape:
        raise ValueError(f"selection records differ in shape: {tuple(reference.shape)} vs {tuple(other.shape)}; "
                         "record the same blocks with the same top-k")
    hit = (reference.unsqueeze(-1) == other.unsqueeze(-2)).any(dim=-1)  # [L, N, k]
    return hit.float().mean(dim=(1, 2))


def agreement_metrics(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                      layer_indices: list[int], prefix: str) -> dict[str, float]:
    """Flat metrics: overall, per label group and per MoE layer agreement."""
    out: dict[str, float] = {}
    hits = tokens = 0.0
    per_layer = torch.zeros(len(layer_indices))
    for label in reference:
        agree = topk_agreement(reference[label], other[label])
        n = reference[label].shape[1]
        out[f"{prefix}/{label}"] = float(agree.mean())
        per_layer += agree * n
        hits += float(agree.mean()) * n
        tokens += n
    for pos, index in enumerate(layer_indices):
        out[f"{prefix}/layer{index}"] = float(per_layer[pos] / max(tokens, 1))
    out[f"{prefix}/all"] = hits / max(tokens, 1)
    return out
