"""Figures and a self-contained HTML page for router-usage statistics.

Everything here takes plain numpy arrays, so it knows nothing about models and can
be used on statistics loaded back from disk. Static figures use matplotlib's
object-oriented ``Figure`` API (no pyplot, no global backend state).
"""

from moesurgeon.viz.heatmaps import (
    conditional_coactivation,
    plot_coactivation,
    plot_layer_bars,
    plot_lines,
    plot_usage,
)
from moesurgeon.viz.html_report import write_usage_html

__all__ = [
    "conditional_coactivation",
    "plot_coactivation",
    "plot_layer_bars",
    "plot_lines",
    "plot_usage",
    "write_usage_html",
]
