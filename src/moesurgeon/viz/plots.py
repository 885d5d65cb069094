"""Line and bar plots for router statistics: sweeps (e.g. perplexity vs top-k) and per-layer grouped bars.

Inputs are plain sequences keyed by series name; a length that does not match the x values
or the layer names raises a ``ValueError`` naming both. Like the heatmaps, figures are built
with ``matplotlib.figure.Figure`` directly (no pyplot, no global backend state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from .saving import save_figure

__all__ = ["plot_lines", "plot_layer_bars"]


def _check_series(name: str, series: dict[str, Sequence[float]], n: int) -> None:
    for key, ys in series.items():
        if len(ys) != n:
            raise ValueError(f"{name}[{key!r}] has {len(ys)} values but x has {n}; give one value per x")


def plot_lines(
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    path: Path | str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    secondary: dict[str, Sequence[float]] | None = None,
    secondary_ylabel: str | None = None,
) -> Path:
    """Sweep plot: one line per series (e.g. perplexity per domain vs top-k).

    ``secondary`` series (e.g. tokens/s) go on a right-hand axis, dashed, sharing the legend.
    """
    if not series:
        raise ValueError("series is empty; give at least one {name: values} entry")
    _check_series("series", series, len(x))
    _check_series("secondary", secondary or {}, len(x))
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", label=name)
    if logy:
        ax.set_yscale("log")
        # Plain numbers ("20", "30") read better than 2x10^1 for perplexities;
        # LogFormatter still thins minor labels on wide ranges.
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if secondary:
        ax2 = ax.twinx()
        for name, ys in secondary.items():
            ax2.plot(x, ys, marker="s", linestyle="--", color="0.35", label=name)
        ax2.set_ylabel(secondary_ylabel or ", ".join(secondary))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if all(float(v).is_integer() for v in x):  # e.g. top-k: no 2.5 ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(handles, labels, fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_layer_bars(
    values: dict[str, Sequence[float]],
    layer_names: list[str],
    path: Path | str,
    *,
    ylabel: str,
    title: str,
    colors: dict[str, object] | None = None,
) -> Path:
    """Grouped bars per layer (e.g. routing entropy or divergence between domains).

    ``colors`` ({series: matplotlib colour}) lets related series share a hue, e.g. a role's before
    (light) and after (dark) bars. The legend sits outside the axes, so it never covers a bar."""
    if not values:
        raise ValueError("values is empty; give at least one {name: per-layer values} entry")
    for key, ys in values.items():
        if len(ys) != len(layer_names):
            raise ValueError(f"values[{key!r}] has {len(ys)} entries but there are {len(layer_names)} layer_names")
    n_layers, n_series = len(layer_names), len(values)
    fig = Figure(figsize=(min(max(n_layers * 0.3 * max(1.0, n_series / 2), 6.0), 18.0), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / n_series
    pos = np.arange(n_layers)
    for k, (name, ys) in enumerate(values.items()):
        ax.bar(pos + (k - (n_series - 1) / 2) * width, ys, width=width, label=name,
               color=(colors or {}).get(name))
    step = max(1, math.ceil(n_layers / 40))
    ax.set_xticks(pos[::step])
    long_names = max(len(n) for n in layer_names) > 3
    ax.set_xticklabels([layer_names[i] for i in pos[::step]], rotation=60 if long_names else 0,
                       ha="right" if long_names else "center", fontsize=8)
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    if n_series > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return save_figure(fig, path)
