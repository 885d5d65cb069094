"""Per-expert weight statistics of every MoE layer, from the per-tensor and per-slice scan results.

An expert is the set of its parts (gate/up/down matrices per expert on disk, or its slice of each
fused tensor). Its track values combine the parts: Frobenius norm sqrt(sum of squares), RMS over
all its weights, max |w|, the share of near-zero weights, NaN/inf count; the top singular value is
kept per part (a singular value of gate and down together means nothing).
"""

from __future__ import annotations

import math

from .layout import ModelLayout

METRICS = ("norm", "rms", "maxabs", "nearzero", "nonfinite")
METRIC_LABELS = {
    "norm": "Frobenius norm of all the expert's weights",
    "rms": "RMS of the expert's weights",
    "maxabs": "max |w|",
    "nearzero": "share of weights with |w| < 1% of their matrix's RMS",
    "nonfinite": "NaN or inf values",
}


def part_stats(part, expert: int, tensors: dict[str, dict], slices: dict[str, list]) -> dict | None:
    """Statistics of one part of one expert, or None when they were not computed (unreadable, other dtype)."""
    if part.fused:
        row = (slices.get(part.tensor) or [None] * (expert + 1))
        stats = row[expert] if expert < len(row) else None
    else:
        stats = tensors.get(part.tensor)
    if not stats or "numel" not in stats:
        return None
    return stats


def expert_tracks(layout: ModelLayout, tensors: dict[str, dict], slices: dict[str, list]) -> dict:
    """{"layers": {L: {metric: [per expert], "sigma1": {part: [...]}, "parts": [...], "missing": [...]}}}.

    Values are None where nothing could be read; `missing` lists "expert e: part" that were not.
    """
    layers: dict[int, dict] = {}
    for index, lay in layout.layers.items():
        experts = sorted(lay.parts)
        count = max(experts) + 1 if experts else 0
        parts = lay.part_names()
        row: dict = {m: [None] * count for m in METRICS}
        row["sigma1"] = {p: [None] * count for p in parts}
        row["sigma_change"] = {p: [None] * count for p in parts}
        row["detail"] = [None] * count
        missing = []
        for e in experts:
            numel = sumsq = nearzero = nonfinite = 0
            maxabs = 0.0
            detail = []
            for part in lay.parts[e]:
                s = part_stats(part, e, tensors, slices)
                if s is None:
                    err = (tensors.get(part.tensor) or {}).get("error", "not read")
                    missing.append(f"expert {e}: {part.part} ({err})")
                    detail.append({"part": part.part, "tensor": part.tensor, "fused": part.fused, "error": err})
                    continue
                numel += s["numel"]
                sumsq += s["sumsq"]
                nearzero += s["nearzero"]
                nonfinite += s["nonfinite"]
                maxabs = max(maxabs, s["maxabs"])
                if s.get("sigma1") is not None:
                    row["sigma1"][part.part][e] = s["sigma1"]
                    row["sigma_change"][part.part][e] = s.get("sigma_change")
                detail.append({"part": part.part, "tensor": part.tensor, "fused": part.fused,
                               **_derived(s)})
            row["detail"][e] = detail
            if numel:
                row["norm"][e] = math.sqrt(sumsq)
                row["rms"][e] = math.sqrt(sumsq / numel)
                row["maxabs"][e] = maxabs
                row["nearzero"][e] = nearzero / numel
                row["nonfinite"][e] = nonfinite
        row["parts"] = parts
        row["missing"] = missing
        row["storage"] = lay.storage
        layers[index] = row
    return {"layers": layers, "labels": METRIC_LABELS}


def _derived(s: dict) -> dict:
    n = max(1, s["numel"])
    out = {"numel": s["numel"], "norm": math.sqrt(s["sumsq"]), "rms": math.sqrt(s["sumsq"] / n),
           "maxabs": s["maxabs"], "nearzero": s["nearzero"] / n, "nonfinite": s["nonfinite"]}
    if s.get("sigma1") is not None:
        out["sigma1"] = s["sigma1"]
        out["sigma_change"] = s.get("sigma_change")
    return out


def tensor_rows(tensors: dict[str, dict]) -> dict[str, dict]:
    """Inventory statistics per tensor (norm, RMS, max |w|, near-zero share, sigma_1) for the table."""
    rows = {}
    for name, s in tensors.items():
        if "numel" in s:
            rows[name] = _derived(s)
        if s.get("error"):
            rows.setdefault(name, {})["error"] = s["error"]
    return rows
