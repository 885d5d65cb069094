"""Small helpers the recipes share (the run setup itself lives in moesurgeon/run_context.py)."""

from __future__ import annotations


def layer_short_names(layer_names: list[str]) -> list[str]:
    """'model.layers.3.mlp.gate' -> 'L3' for plot axes (files keep the full names)."""
    out = []
    for name in layer_names:
        parts = name.split(".")
        idx = next((p for p in parts if p.isdigit()), name)
        out.append(f"L{idx}")
    return out
