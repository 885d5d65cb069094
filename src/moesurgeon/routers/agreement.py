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

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from ..arch import ArchAdapter
from ..data import TokenBlocks
from ..hooks import forward_hooks
from ..models import input_device

Scope = Callable[[str], AbstractContextManager]


def label_groups(blocks: TokenBlocks) -> dict[str, TokenBlocks]:
    """{label: its blocks} in label order; unlabelled data is one group 'all'."""
    if not blocks.label_names:
        return {"all": blocks}
    groups = {name: blocks.select(name) for name in blocks.label_names}
    return {name: b for name, b in groups.items() if len(b)}


@torch.no_grad()
def record_selections(model, adapter: ArchAdapter, blocks: TokenBlocks, batch_size: int = 8,
                      scope: Scope | None = None) -> dict[str, torch.Tensor]:
    """{label: selected experts [L, N, k] (int16)} over the N real tokens of each label group."""
    layers = adapter.moe_layers(model)
    device = input_device(model)
    out: dict[str, torch.Tensor] = {}
    for label, group in label_groups(blocks).items():
        taken: list[list[torch.Tensor]] = [[] for _ in layers]
        state = {"mask": None}

        def hook_for(pos: int):
            def hook(module, inputs, output):
                idx = output[2].reshape(-1, output[2].shape[-1])
                taken[pos].append(idx[state["mask"].to(idx.device)].to("cpu", torch.int16))
            return hook

        with forward_hooks([(layer.router, hook_for(p)) for p, layer in enumerate(layers)]):
            with scope(label) if scope is not None else nullcontext():
                for batch in group.batches(batch_size):
                    state["mask"] = batch["attention_mask"].reshape(-1).bool()
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        out[label] = torch.stack([torch.cat(t) for t in taken])
    return out


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
