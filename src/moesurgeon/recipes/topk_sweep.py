"""experiment=topk_sweep — held-out perplexity per label and tokens/s for k = 1 .. max_k.

setup (held-out blocks, model) -> for each k: set top-k in memory, measure -> table, plot, metrics.
One model load, one data load; k changes in memory between evaluations, so every point is measured
on the same blocks in the same process. Writes topk_sweep.csv, topk_sweep.png and metrics.json.
(A Hydra multirun over experiment=topk_override gives the same numbers plus one export per k.)
Settings: `topk_sweep.*` (TopkSweepSettings, recipes/settings.py).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from ..errors import ConfigError
from ..evaluate import evaluate_perplexity
from ..run_context import RunContext
from ..viz import plot_lines
from .settings import TopkSweepSettings

log = logging.getLogger("moesurgeon")


def plot_sweep(rows: list[dict], trained_k: int, path: Path) -> Path:
    """Perplexity change per label against the trained k, in percent, on a linear axis (the 1-10 %
    differences that matter; a log perplexity axis flattens them), with tokens/s on the right."""
    ks = [int(r["top_k"]) for r in rows]
    ref = ks.index(trained_k) if trained_k in ks else 0
    labels = [key[len("ppl/"):] for key in rows[0] if key.startswith("ppl/")]
    change = {g: [100.0 * (float(r[f"ppl/{g}"]) / float(rows[ref][f"ppl/{g}"]) - 1.0) for r in rows] for g in labels}
    return plot_lines(ks, change, path, xlabel="experts per token (top-k)",
                      ylabel=f"held-out perplexity change vs k={ks[ref]} (%)",
                      title=f"top-k sweep (trained with k={trained_k})",
                      secondary={"tokens/s": [float(r["tokens_per_s"]) for r in rows]})


def run(ctx: RunContext, settings: TopkSweepSettings) -> dict:
    # ---- setup
    model, _, blocks = ctx.load(splits=("heldout",))
    adapter, heldout = ctx.adapter, blocks["heldout"]
    layers = adapter.moe_layers(model)
    limit = min(adapter.max_top_k(layer) for layer in layers)
    max_k = settings.max_k or limit
    if not 1 <= max_k <= limit:
        raise ConfigError(f"topk_sweep.max_k={max_k}: expected 1 <= max_k <= {limit} for this model")
    original = adapter.get_top_k(layers[0])

    # ---- apply and measure, k by k
    rows, ks = [], list(range(1, max_k + 1))
    for k in ks:
        adapter.set_top_k(model, k)
        res = evaluate_perplexity(model, heldout, ctx.batch_size, ctx.progress, desc=f"top_k={k}")
        rows.append({"top_k": k, **{f"ppl/{g}": v for g, v in res.ppl.items()}, "tokens_per_s": res.tokens_per_s})
        log.info("k=%-3d %s  %.0f tok/s", k, "  ".join(f"{g}={v:.2f}" for g, v in res.ppl.items()), res.tokens_per_s)
    adapter.set_top_k(model, original)

    # ---- report
    with open(ctx.out_dir / "topk_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_sweep(rows, original, ctx.out_dir / "topk_sweep.png")
    metrics = {"trained_top_k": original}
    for row in rows:
        for key, v in row.items():
            if key != "top_k":
                metrics[f"k{row['top_k']}/{key}"] = v
    best = min(rows, key=lambda r: r["ppl/all"])
    metrics["best_k_by_ppl_all"] = best["top_k"]
    return metrics
