"""Expert x expert similarity of OUTPUTS on calibration tokens (`browse.data=true`; needs the model).

Two experts with unrelated weights can still compute nearly the same function on the tokens that
matter (weights are only defined up to a permutation of the hidden units, outputs are not). For
each MoE layer: the hidden states entering the block are captured on up to `max_tokens` real
(non-padding) calibration tokens through a router hook (the router sees exactly what the experts
see), then EVERY expert is run on all of them, routed or not, and the cosine of experts i and j is
<O_i, O_j> / (|O_i| |O_j|) with O_e the expert's outputs on all tokens as one vector. The Gram
matrix is accumulated over token chunks, so memory stays at one chunk's outputs of all experts.
"""

from __future__ import annotations

import torch

from ..arch import ArchAdapter
from ..block_runner import run_blocks
from ..data import TokenBlocks
from .similarity import nearest, summary

_CHUNK = 64  # tokens per expert call


def expert_output_similarity(model: torch.nn.Module, adapter: ArchAdapter, blocks: TokenBlocks, *,
                             batch_size: int = 8, max_tokens: int = 512, progress: bool = False) -> dict[int, dict]:
    """{layer index: {"experts", "matrix", "nearest", "summary", "tokens"}} for every MoE layer."""
    layers = adapter.moe_layers(model)
    captured: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    have = dict.fromkeys(captured, 0)

    def capture(index: int):
        def hook(module, inputs, output, batch) -> None:
            if have[index] >= max_tokens:
                return
            hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
            hidden = hidden[batch.real(hidden.device)][: max_tokens - have[index]]
            captured[index].append(hidden.detach())
            have[index] += hidden.shape[0]
        return hook

    run_blocks(model, blocks, batch_size, hooks=[(layer.router, capture(layer.index)) for layer in layers],
               progress=progress, desc="browse: calibration tokens")
    out: dict[int, dict] = {}
    with torch.no_grad():
        for layer in layers:
            if not captured[layer.index]:
                continue
            hidden = torch.cat(captured[layer.index])
            gram = torch.zeros(layer.num_experts, layer.num_experts, dtype=torch.float64)
            for start in range(0, hidden.shape[0], _CHUNK):
                chunk = hidden[start:start + _CHUNK]
                outs = torch.stack([adapter.run_expert(layer, chunk, e).reshape(-1).double().cpu()
                                    for e in range(layer.num_experts)])
                gram += outs @ outs.T
            norms = gram.diagonal().clamp_min(1e-300).sqrt()
            sim = gram / norms[:, None] / norms[None, :]
            out[layer.index] = {"experts": list(range(layer.num_experts)), "matrix": sim.tolist(),
                                "nearest": nearest(sim), "summary": summary(sim), "tokens": int(hidden.shape[0])}
    return out
