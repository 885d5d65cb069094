"""Writing a figure to disk: the one place every figure module in ``moesurgeon.viz`` saves through.

Keeping the resolution and the directory handling here means heatmaps, line and bar plots
come out alike (same dpi) and a new figure module cannot drift from them.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["save_figure"]

DPI = 120


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Save ``fig`` as ``path`` (format from its suffix), creating missing parent directories; return the path.

    ``Figure.savefig`` renders with the Agg canvas whatever the pyplot backend is, so this
    works headless and leaves no global state behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
