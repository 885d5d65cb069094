"""Heatmap figures for router statistics: layer x expert usage per group, and expert co-activation.

Inputs are numpy arrays (or lists) with documented shapes; a wrong shape raises a
``ValueError`` that names the shape received and the one expected. Figures are built
with ``matplotlib.figure.Figure`` directly: no pyplot, so no global backend state and
nothing is shown on screen; saving uses the Agg renderer whatever the backend is. Line and bar
plots (top-k sweeps, per-layer values) are in ``moesurgeon.viz.plots``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .saving import save_figure

__all__ = ["plot_usage", "plot_coactivation", "conditional_coactivation", "check_usage", "contrast_panels"]

# Grey for NaN cells (never-selected experts, the co-activation diagonal) so they
# are not mistaken for a low value on either colormap.
_BAD = "#c8c8c8"
_SEQUENTIAL = colormaps["viridis"].with_extremes(bad=_BAD)
_DIVERGING = colormaps["RdBu_r"].with_extremes(bad=_BAD)
_MAX_COLS = 4


def _positive_max(a: np.ndarray) -> float:
    # A colour scale needs a non-zero span even for an all-zero or all-NaN panel.
    finite = a[np.isfinite(a)]
    return float(finite.max()) if finite.size and finite.max() > 0 else 1e-12


def _layer_ticks(ax, layer_names: Sequence[str]) -> None:
    # Panels share y, so ticks set here apply to all of them; others only hide the labels.
    n = len(layer_names)
    step = max(1, math.ceil(n / 24))  # at most ~24 labels keeps them legible
    ticks = list(range(0, n, step))
    ax.set_yticks(ticks, [layer_names[i] for i in ticks], fontsize=8)


def contrast_panels(usage: np.ndarray, group_names: Sequence[str], diff_of: tuple[int, int] | None):
    """Difference panels for ``plot_usage``: ``[(array [L, E], title), ...]``.

    Two groups (or an explicit ``diff_of``) give one ``a - b`` panel; more groups give,
    for each group, the group minus the mean of the others, which shows what is
    specific to each domain instead of one arbitrary pair.
    """
    g = usage.shape[0]
    if g < 2:
        return []
    if diff_of is not None or g == 2:
        a, b = diff_of if diff_of is not None else (0, 1)
        if not (0 <= a < g and 0 <= b < g) or a == b:
            raise ValueError(f"diff_of={diff_of} must be two different group indices in [0, {g}) for {g} groups")
        return [(usage[a] - usage[b], f"{group_names[a]} − {group_names[b]}")]
    total = usage.sum(axis=0)
    return [(usage[i] - (total - usage[i]) / (g - 1), f"{group_names[i]} − mean(others)") for i in range(g)]


def _heat_grid(sub, panels, layer_names, *, cmap, vmin, vmax, cbar_label, heading) -> None:
    ncols = min(len(panels), _MAX_COLS)
    nrows = math.ceil(len(panels) / ncols)
    axes = sub.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    used = []
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        data, name = panels[k]
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(name, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        ax.tick_params(axis="x", labelsize=8, labelbottom=True)
        if k == 0:
            _layer_ticks(ax, layer_names)
        ax.tick_params(axis="y", labelleft=k % ncols == 0)
        if k >= len(panels) - ncols:
            ax.set_xlabel("expert", fontsize=9)
        if k % ncols == 0:
            ax.set_ylabel("layer", fontsize=9)
        used.append(ax)
    sub.colorbar(im, ax=used, label=cbar_label, shrink=0.9)
    if heading:  # on a plain Figure this would replace the main title
        sub.suptitle(heading, fontsize=10)


def check_usage(usage, group_names: Sequence[str], layer_names: Sequence[str]) -> np.ndarray:
    """``usage`` as a float array [groups, layers, experts], or a ValueError naming the shapes."""
    usage = np.asarray(usage, dtype=float)
    if usage.ndim != 3 or 0 in usage.shape:
        raise ValueError(f"usage must have shape [groups, layers, experts], none empty; got shape {usage.shape}")
    g, n_layers, _ = usage.shape
    if len(group_names) != g or len(layer_names) != n_layers:
        raise ValueError(
            f"usage has shape {usage.shape} = [groups, layers, experts] but got {len(group_names)} group_names "
            f"and {len(layer_names)} layer_names; expected {g} and {n_layers}"
        )
    return usage


def plot_usage(
    usage: np.ndarray,
    group_names: list[str],
    layer_names: list[str],
    path: Path | str,
    *,
    title: str,
    diff_of: tuple[int, int] | None = None,
    value_label: str = "share of routed tokens",
) -> Path:
    """Layer x expert heatmaps of ``usage [G, L, E]``, one panel per group, shared colour scale.

    With two or more groups, difference panels (see ``contrast_panels``) follow on a
    diverging colormap centred at 0.
    """
    usage = check_usage(usage, group_names, layer_names)
    g, n_layers, n_experts = usage.shape
    contrasts = contrast_panels(usage, group_names, diff_of)
    side_by_side = len(contrasts) == 1 and g <= 3
    ncols = min(g, _MAX_COLS)
    # Grow panels with the grid size, but keep the whole figure within ~20 x 16 inches.
    panel_w = min(max(n_experts * 0.07, 2.6), 8.0, 18.0 / (g + 1 if side_by_side else ncols))
    panel_h = min(max(n_layers * 0.15, 2.0), 7.0)
    usage_rows = math.ceil(g / ncols)
    if side_by_side:
        size = ((g + 1) * panel_w + 2.8, panel_h + 1.4)
    else:
        rows = usage_rows + (math.ceil(len(contrasts) / ncols) if contrasts else 0)
        size = (ncols * panel_w + 1.6, rows * panel_h + 1.2 * (1 + bool(contrasts)))
    fig = Figure(figsize=size, layout="constrained")
    fig.suptitle(title, fontsize=12)
    if contrasts:
        if side_by_side:
            top, bottom = fig.subfigures(1, 2, width_ratios=[g * panel_w + 1.4, panel_w + 1.4])
        else:
            top, bottom = fig.subfigures(2, 1, height_ratios=[usage_rows, math.ceil(len(contrasts) / ncols)])
    else:
        top, bottom = fig, None
    groups = [(usage[i], group_names[i]) for i in range(g)]
    _heat_grid(top, groups, layer_names, cmap=_SEQUENTIAL, vmin=0.0, vmax=_positive_max(usage),
               cbar_label=value_label, heading="per group" if contrasts else "")
    if bottom is not None:
        span = max(_positive_max(np.abs(d)) for d, _ in contrasts)
        _heat_grid(bottom, contrasts, layer_names, cmap=_DIVERGING, vmin=-span, vmax=span,
                   cbar_label=f"difference in {value_label}", heading="difference (red: more, blue: less)")
    return save_figure(fig, path)


def conditional_coactivation(coact: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """``P(j | i) = coact[i, j] / n_i`` from co-selection counts ``coact [E, E]``.

    ``n_i`` (tokens that selected expert i) is ``counts`` if given, else the diagonal
    of ``coact``; a matrix that is already conditional (unit diagonal) passes through. The
    diagonal of the result (always 1) and rows of never-selected experts are NaN, so plots
    can grey them out instead of drawing a trivial 1.
    """
    coact = np.asarray(coact, dtype=float)
    if coact.ndim != 2 or coact.shape[0] != coact.shape[1]:
        raise ValueError(f"coact must be a square [experts, experts] count matrix, got shape {coact.shape}")
    if (coact < 0).any():
        raise ValueError("coact holds negative values; expected co-selection counts")
    n = np.diag(coact).copy() if counts is None else np.asarray(counts, dtype=float)
    if n.shape != (coact.shape[0],):
        raise ValueError(f"counts must have shape ({coact.shape[0]},) for coact of shape {coact.shape}, got {n.shape}")
    if counts is None and n.sum() == 0 and coact.sum() > 0:
        raise ValueError(
            "coact has an all-zero diagonal, so per-expert selection counts are unknown; "
            "store them on the diagonal or pass counts=<[E] array>"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        p = coact / n[:, None]
    p[n == 0, :] = np.nan
    np.fill_diagonal(p, np.nan)
    return p


def plot_coactivation(
    coact: np.ndarray, path: Path | str, *, title: str, counts: np.ndarray | None = None
) -> Path:
    """Heatmap of ``P(expert j selected | expert i selected)`` from co-selection counts ``[E, E]``."""
    p = conditional_coactivation(coact, counts)
    side = min(max(p.shape[0] * 0.11, 4.5), 10.0)
    fig = Figure(figsize=(side + 1.6, side + 0.6), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(p, interpolation="nearest", cmap=_SEQUENTIAL, vmin=0.0, vmax=1.0)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.set_xlabel("expert j (also selected)")
    ax.set_ylabel("expert i (selected)")
    ax.set_title(title, fontsize=11)
    fig.colorbar(im, ax=ax, shrink=0.85, label="P(j | i)   (grey: diagonal / expert i never selected)")
    return save_figure(fig, path)
