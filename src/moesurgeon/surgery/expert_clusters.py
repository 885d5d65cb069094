"""Which experts a merge puts together: per-expert features, cosine distances, hierarchical clustering.

    distances = output_distances(model, adapter, train_blocks, calib_tokens=512)   # {layer index: [E, E]}
    distances = weight_distances(model, adapter)  |  router_distances(model, adapter)
    clusters = cluster_experts(distances[i], n_clusters=12, linkage="average", groups=1)

Features (distance = 1 - cosine of two experts' feature vectors):
- output: every expert is run (`adapter.run_expert`, weight 1, routed or not) on the SAME calibration
  tokens of each layer: the hidden states entering the MoE block, captured by a router hook on real
  tokens of blocks spread evenly over the calibration set. The feature is the expert's MEAN output
  vector [H] over those tokens, as HC-SMoE clusters by. (The token-by-token alternative, the cosine of
  the concatenated outputs as the browser's output similarity shows it, is computed in the same pass
  and returned as `token_distance` for comparison.)
- weight: every parameter of the experts module with one slice per expert (dim 0 = E), flattened and
  concatenated (a strided sample of at most `max_elements` values per expert when larger);
- router: the experts' router rows.

Clustering: agglomerative, bottom-up, `single` (closest members), `complete` (farthest members) or
`average` (mean pairwise distance, UPGMA) linkage, updated with the Lance-Williams formulas. Ties go
to the pair of clusters whose smallest members come first. Where the family limits routing to groups
of contiguous experts, each group is clustered on its own into the same number of clusters, so every
group keeps the same number of experts and group-limited routing stays exact after the export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..arch import ArchAdapter, MoELayer
from ..block_runner import run_blocks
from ..data import TokenBlocks

__all__ = ["LINKAGES", "OutputDistances", "agglomerate", "calibration_blocks", "cluster_experts", "cosine_distance",
           "output_distances", "router_distances", "weight_distances"]

LINKAGES = ("average", "complete", "single")
_CHUNK_ELEMENTS = 1 << 25  # outputs of all experts held at once (E x tokens x H), float64: 256 MB at most


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """[n, n] float64 1 - cosine of the rows of `features` [n, d]; a zero row is at distance 1 from every other."""
    f = features.reshape(features.shape[0], -1).double()
    norms = f.norm(dim=1)
    unit = f / norms.clamp_min(1e-300)[:, None]
    dist = (1.0 - unit @ unit.T).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def _gram_distance(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    dist = (1.0 - gram / norms[:, None] / norms[None, :]).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def agglomerate(distance: torch.Tensor | np.ndarray, n_clusters: int, linkage: str = "average") -> list[list[int]]:
    """Cluster n items with a symmetric distance matrix [n, n] into `n_clusters` groups (each a sorted list of
    item indices; groups ordered by their smallest item)."""
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r}: expected one of {list(LINKAGES)}")
    d = torch.as_tensor(distance, dtype=torch.float64).cpu().numpy().copy()
    n = d.shape[0]
    if d.shape != (n, n):
        raise ValueError(f"distance matrix has shape {d.shape}, expected a square [n, n]")
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters={n_clusters}: expected 1..{n} for {n} items")
    clusters = [[i] for i in range(n)]
    np.fill_diagonal(d, np.inf)
    while len(clusters) > n_clusters:
        # np.argmin takes the first minimum in row-major order: the pair whose smallest members come first
        flat = int(np.argmin(np.where(np.triu(np.ones_like(d, dtype=bool), 1), d, np.inf)))
        i, j = divmod(flat, d.shape[0])
        ni, nj = len(clusters[i]), len(clusters[j])
        if linkage == "single":
            row = np.minimum(d[i], d[j])
        elif linkage == "complete":
            row = np.maximum(d[i], d[j])
        else:  # average: mean distance over all member pairs, from the two clusters' means
            row = (ni * d[i] + nj * d[j]) / (ni + nj)
        d[i], d[:, i] = row, row
        d[i, i] = np.inf
        clusters[i] = sorted(clusters[i] + clusters[j])
        d = np.delete(np.delete(d, j, axis=0), j, axis=1)
        del clusters[j]
    return clusters


def cluster_experts(distance: torch.Tensor, n_clusters: int, linkage: str = "average", groups: int = 1
                    ) -> list[list[int]]:
    """Clusters of one layer's E experts; with `groups` > 1 the contiguous groups of E/groups experts are
    clustered separately into n_clusters/groups clusters each (experts never leave their group)."""
    E = distance.shape[0]
    if E % groups or n_clusters % groups:
        raise ValueError(f"{E} experts into {n_clusters} clusters cannot be split evenly over {groups} groups")
    size, per_group = E // groups, n_clusters // groups
    out: list[list[int]] = []
    for g in range(groups):
        lo = g * size
        part = distance[lo:lo + size, lo:lo + size]
        out += [[lo + e for e in c] for c in agglomerate(part, per_group, linkage)]
    return out


# ---------------------------------------------------------------------------------------------- features
def weight_distances(model, adapter: ArchAdapter, max_elements: int = 1 << 16) -> dict[int, torch.Tensor]:
    """{MoE layer index: [E, E]} 1 - cosine of the experts' flattened weights (all of the experts module's
    per-expert parameters; a strided sample of at most `max_elements` values per expert)."""
    out = {}
    for layer in adapter.moe_layers(model):
        params = [p for p in getattr(layer.block, adapter.experts_attr).parameters()
                  if p.ndim >= 1 and p.shape[0] == layer.num_experts]
        if not params:
            raise ValueError(f"{layer.block_name}: its experts module holds no parameter with one slice per expert "
                             f"(dim 0 = {layer.num_experts}); weight similarity needs fused expert weights")
        total = sum(p[0].numel() for p in params)
        stride = max(1, -(-total // max_elements))
        flat = torch.cat([p.detach().reshape(layer.num_experts, -1).float().cpu() for p in params], dim=1)
        out[layer.index] = cosine_distance(flat[:, ::stride])
    return out


def router_distances(model, adapter: ArchAdapter) -> dict[int, torch.Tensor]:
    """{MoE layer index: [E, E]} 1 - cosine of the experts' router rows."""
    out = {}
    for layer in adapter.moe_layers(model):
        weight = layer.router.weight.detach().float().cpu()
        out[layer.index] = cosine_distance(weight.reshape(layer.num_experts, -1))
    return out


def calibration_blocks(blocks: TokenBlocks, tokens: int) -> TokenBlocks:
    """The fewest blocks, spread evenly over `blocks` (every label, not the first file's), holding at least
    `tokens` real tokens; all blocks when they hold fewer."""
    real = blocks.attention_mask.sum(dim=1)
    n = len(blocks)
    count = min(n, max(1, -(-tokens // max(blocks.block_size, 1))))
    while True:
        index = torch.unique(torch.linspace(0, n - 1, count).round().long())
        if int(real[index].sum()) >= tokens or count >= n:
            break
        count = min(n, count + max(1, count // 8))
    return TokenBlocks(blocks.input_ids[index], blocks.attention_mask[index], blocks.labels[index],
                       list(blocks.label_names))


@dataclass
class OutputDistances:
    mean_distance: dict[int, torch.Tensor]   # layer index -> [E, E] 1 - cosine of the mean outputs (HC-SMoE)
    token_distance: dict[int, torch.Tensor]  # layer index -> [E, E] 1 - cosine of the concatenated outputs
    tokens: int                              # calibration tokens every expert of every layer ran on


def output_distances(model, adapter: ArchAdapter, blocks: TokenBlocks, calib_tokens: int = 512,
                     batch_size: int = 8, progress: bool = False) -> OutputDistances:
    """Every expert of every MoE layer run on the same `calib_tokens` real tokens of `blocks` (module docstring)."""
    layers = adapter.moe_layers(model)
    chosen = calibration_blocks(blocks, calib_tokens)
    captured: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    have = dict.fromkeys(captured, 0)

    def capture(layer: MoELayer):
        def hook(module, inputs, output, batch) -> None:
            if have[layer.index] >= calib_tokens:
                return
            hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
            hidden = hidden[batch.real(hidden.device)][: calib_tokens - have[layer.index]]
            captured[layer.index].append(hidden.detach())
            have[layer.index] += hidden.shape[0]
        return hook

    run_blocks(model, chosen, batch_size, hooks=[(layer.router, capture(layer)) for layer in layers],
               progress=progress, desc="merge: calibration tokens")
    tokens = min(have.values()) if have else 0
    if tokens < 2:
        raise ValueError(f"the calibration data gave {tokens} real token(s) per MoE layer; output similarity needs "
                         "at least 2: use a larger data.train")
    means, grams = {}, {}
    with torch.no_grad():
        for layer in layers:
            hidden = torch.cat(captured.pop(layer.index))[:tokens]
            total = torch.zeros(layer.num_experts, hidden.shape[-1], dtype=torch.float64)
            gram = torch.zeros(layer.num_experts, layer.num_experts, dtype=torch.float64)
            step = max(1, min(tokens, _CHUNK_ELEMENTS // (layer.num_experts * hidden.shape[-1])))
            for start in range(0, tokens, step):
                chunk = hidden[start:start + step]
                outs = torch.stack([adapter.run_expert(layer, chunk, e).double().cpu()
                                    for e in range(layer.num_experts)])         # [E, t, H]
                total += outs.sum(dim=1)
                flat = outs.reshape(layer.num_experts, -1)
                gram += flat @ flat.T
            means[layer.index] = cosine_distance(total / tokens)
            grams[layer.index] = _gram_distance(gram)
    return OutputDistances(means, grams, tokens)
