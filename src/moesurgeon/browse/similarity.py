"""Expert x expert similarity within a layer: cosine of weights (from the scan's samples), nearest neighbours.

The weight cosine of experts i and j is <w_i, w_j> / (|w_i| |w_j|) over all their parts, taken as
one vector. Each part contributes a strided sample at the same positions in every expert (see
kernels._strided_sample): when a part has no more weights than the sample size the value is exact,
otherwise an estimate whose error is about 1/sqrt(sample size) for unrelated experts. The page says
which. Only parts that every expert of the layer has, with equal sample lengths, are used.
"""

from __future__ import annotations

import torch

from .layout import ModelLayout


def cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N] cosine similarity in float64; a zero row has similarity 0 with everything."""
    x = rows.double()
    norms = x.norm(dim=1, keepdim=True)
    x = x / norms.clamp_min(1e-30)
    sim = x @ x.T
    zero = (norms.squeeze(1) == 0)
    sim[zero, :] = 0.0
    sim[:, zero] = 0.0
    return sim


def nearest(sim: torch.Tensor) -> list[list[float]]:
    """For each row, [index of the most similar other row, its similarity] (-1 when there is none)."""
    n = sim.shape[0]
    if n < 2:
        return [[-1, 0.0] for _ in range(n)]
    masked = sim.clone()
    masked.fill_diagonal_(float("-inf"))
    values, indices = masked.max(dim=1)
    return [[int(i), float(v)] for i, v in zip(indices.tolist(), values.tolist())]


def summary(sim: torch.Tensor) -> dict:
    """Mean and max off-diagonal similarity (the per-layer value of the overview track)."""
    n = sim.shape[0]
    if n < 2:
        return {"mean": None, "max": None}
    off = sim[~torch.eye(n, dtype=torch.bool)]
    return {"mean": float(off.mean()), "max": float(off.max())}


def weight_similarity(layout: ModelLayout, samples: dict[str, torch.Tensor], full: dict[str, bool]) -> dict:
    """{L: {"matrix": E x E, "nearest": ..., "summary": ..., "exact": bool, "weights": n}} from part samples.

    `full[key]`: the sample of that part holds every weight (exact similarity).
    """
    out: dict[int, dict] = {}
    for index, lay in layout.layers.items():
        experts = sorted(lay.parts)
        if len(experts) < 2:
            continue
        keys_per_expert = {e: [_key(p, e) for p in lay.parts[e]] for e in experts}
        by_part: dict[str, list[torch.Tensor | None]] = {}
        for e in experts:
            for part, key in zip(lay.parts[e], keys_per_expert[e]):
                by_part.setdefault(part.part, [None] * len(experts))[experts.index(e)] = samples.get(key)
        usable = [p for p, vs in by_part.items()
                  if all(v is not None for v in vs) and len({v.numel() for v in vs}) == 1]
        if not usable:
            continue
        rows = torch.cat([torch.stack([v.float() for v in by_part[p]]) for p in usable], dim=1)
        sim = cosine_matrix(rows)
        exact = all(full.get(_key(p, e), False) for e in experts for p in lay.parts[e] if p.part in usable)
        out[index] = {"experts": experts, "matrix": sim.tolist(), "nearest": nearest(sim), "summary": summary(sim),
                      "exact": exact, "weights": int(rows.shape[1]), "parts": usable,
                      "skipped_parts": sorted(set(by_part) - set(usable))}
    return out


def _key(part, expert: int) -> str:
    return f"{part.tensor}#{expert}" if part.fused else part.tensor


def sample_key(part, expert: int) -> str:
    """The key under which the scan stores the sample of this part of this expert."""
    return _key(part, expert)
