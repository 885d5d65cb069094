"""Figures and a self-contained HTML page for router-usage statistics.

Everything here takes plain numpy arrays, so it knows nothing about models and can
be used on statistics loaded back from disk. Static figures use matplotlib's
object-oriented ``Figure`` API (no pyplot, no global backend state).

Modules: ``heatmaps`` (usage and co-activation heatmaps), ``plots`` (line and bar plots),
``html_report`` (the interactive page), ``saving`` (how every figure is written to disk).
"""

from moesurgeon.viz.heatmaps import conditional_coactivation, plot_coactivation, plot_usage
from moesurgeon.viz.html_report import write_usage_html
from moesurgeon.viz.plots import plot_layer_bars, plot_lines

__all__ = [
    "conditional_coactivation",
    "plot_coactivation",
    "plot_layer_bars",
    "plot_lines",
    "plot_usage",
    "write_usage_html",
]
