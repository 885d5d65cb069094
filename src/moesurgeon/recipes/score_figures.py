"""The expert-score figures every expert surgery writes: all criteria side by side, and one criterion per domain.

`expert_scores.png`: selection share, gate-mass share, REAP saliency and mean output norm per
layer x expert (all label groups pooled; saliency and norm relative to each layer's largest), the
experts the surgery removed crossed out.
`expert_scores_<criterion>_by_label.png`: the chosen criterion per label group, with each group's
difference from the mean of the others (pooled scores trade domains against each other; this
shows which domain loses what).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..probe import ExpertScores
from ..viz import plot_usage
from ..viz.score_heatmaps import plot_expert_scores

__all__ = ["draw_scores"]


def _shares(t: np.ndarray) -> np.ndarray:
    """Each layer's row as shares of the layer's total (0 where a layer saw nothing)."""
    total = t.sum(axis=-1, keepdims=True)
    return np.divide(t, total, out=np.zeros_like(t), where=total > 0)


def _of_layer_max(t: np.ndarray) -> np.ndarray:
    """[L, G, E] divided by each layer's largest value over groups and experts: the choice is per layer, and
    saliency and output norms differ by 10x between layers, which one colour scale would flatten."""
    top = t.max(axis=(1, 2), keepdims=True)
    return np.divide(t, top, out=np.zeros_like(t), where=top > 0)


def _tables(scores: ExpertScores, pooled: bool) -> dict[str, np.ndarray]:
    s = scores.merged() if pooled else scores
    return {"frequency": _shares(s.counts.double().numpy()), "gate_mass": _shares(s.gate_mass.numpy()),
            "reap": _of_layer_max(s.reap.numpy()), "output_norm": _of_layer_max(s.output_norm.numpy())}


_TITLES = {"frequency": "selection share (frequency)", "gate_mass": "gate-mass share",
           "reap": "REAP saliency / layer max", "output_norm": "mean output norm / layer max"}


def draw_scores(scores: ExpertScores, out_dir: Path, *, removed_rows: Mapping[int, Sequence[int]] | None,
                criterion: str | None, what: str, removed_label: str = "removed") -> list[Path]:
    """Write the score figures into out_dir; `removed_rows` is keyed by the row of the score tables."""
    pooled = {f"{_TITLES[k]}{' — the criterion' if k == criterion else ''}": v[:, 0]
              for k, v in _tables(scores, pooled=True).items()}
    paths = [plot_expert_scores(pooled, scores.layer_names, out_dir / "expert_scores.png", removed=removed_rows,
                                removed_label=removed_label, title=f"expert scores (all data) — {what}")]
    if criterion in _TITLES and len(scores.group_names) > 1:
        per_label = np.moveaxis(_tables(scores, pooled=False)[criterion], 1, 0)  # [G, L, E]
        paths.append(plot_usage(per_label, scores.group_names, scores.layer_names,
                                out_dir / f"expert_scores_{criterion}_by_label.png",
                                title=f"{_TITLES[criterion]} per label", value_label=_TITLES[criterion]))
    return paths
