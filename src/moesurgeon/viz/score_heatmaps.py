"""Heatmaps of expert scores (probe/expert_scores.py): layer x expert per criterion, surgery choices marked.

`plot_expert_scores` draws one panel per criterion (selection share, gate-mass share, REAP
saliency, mean output norm), each with its own colour bar because the criteria have different
units; experts a surgery removed (or merged away) are crossed out, so the figure shows *why* they
went: low on the criterion that chose them, and where they stood on the others.
Per-domain panels of one criterion are `plot_usage` (viz/heatmaps.py) with the score as value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .saving import save_figure

__all__ = ["plot_expert_scores"]

_CMAP = colormaps["viridis"].with_extremes(bad="#c8c8c8")


def plot_expert_scores(
    tables: Mapping[str, np.ndarray],
    layer_names: Sequence[str],
    path: Path | str,
    *,
    title: str,
    removed: Mapping[int, Sequence[int]] | None = None,
    removed_label: str = "removed",
) -> Path:
    """One heatmap per entry of `tables` ({panel title: [layers, experts]}); `removed` maps a ROW of the
    tables (0..layers-1, not a decoder-layer index) to the experts to cross out."""
    if not tables:
        raise ValueError("tables is empty: pass at least one {title: [layers, experts] array}")
    arrays = {name: np.asarray(a, dtype=float) for name, a in tables.items()}
    shapes = {name: a.shape for name, a in arrays.items()}
    first = next(iter(arrays.values()))
    if first.ndim != 2 or any(s != first.shape for s in shapes.values()):
        raise ValueError(f"every table must be [layers, experts] with the same shape; got {shapes}")
    n_layers, n_experts = first.shape
    if len(layer_names) != n_layers:
        raise ValueError(f"{len(layer_names)} layer_names for tables with {n_layers} layers")
    for row, experts in (removed or {}).items():
        bad = [e for e in experts if not 0 <= e < n_experts]
        if not 0 <= row < n_layers or bad:
            raise ValueError(f"removed[{row}]={list(experts)}: rows must be in [0, {n_layers}) and experts in "
                             f"[0, {n_experts})")
    ncols = min(len(arrays), 2)
    nrows = math.ceil(len(arrays) / ncols)
    panel_w = min(max(n_experts * 0.09, 3.2), 9.0)
    panel_h = min(max(n_layers * 0.22, 1.8), 7.0)
    fig = Figure(figsize=(ncols * (panel_w + 1.3), nrows * panel_h + 1.3), layout="constrained")
    fig.suptitle(f"{title}\n(× = {removed_label})" if removed else title, fontsize=11)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    step = max(1, math.ceil(n_layers / 24))
    for ax, (name, data) in zip(axes.flat, arrays.items(), strict=False):
        finite = data[np.isfinite(data)]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1e-12
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=_CMAP, vmin=0.0, vmax=vmax)
        fig.colorbar(im, ax=ax, shrink=0.9)
        ax.set_title(name, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
        ax.tick_params(labelsize=7)
        ax.set_yticks(range(0, n_layers, step), [layer_names[i] for i in range(0, n_layers, step)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        if removed:
            xs = [e for row in sorted(removed) for e in removed[row]]
            ys = [row for row in sorted(removed) for _ in removed[row]]
            # white cross with a dark edge: visible on both ends of viridis
            size = max(6.0, 90.0 / max(n_experts / 16, 1))
            ax.scatter(xs, ys, marker="x", s=size, c="white", linewidths=1.8)
            ax.scatter(xs, ys, marker="x", s=size * 0.45, c="black", linewidths=0.8)
    for ax in list(axes.flat)[len(arrays):]:
        ax.set_axis_off()
    return save_figure(fig, path)
