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

from ..errors import ConfigError
from ..evaluate import evaluate_perplexity
from ..run_context import RunContext
from ..viz import plot_lines
from .settings import TopkSweepSettings

log = logging.getLogger("moesurgeon")


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
    ppl_series: dict[str, list[float]] = {}
    speed: list[float] = []
    for k in ks:
        adapter.set_top_k(model, k)
        res = evaluate_perplexity(model, heldout, ctx.batch_size, ctx.progress, desc=f"top_k={k}")
        rows.append({"top_k": k, **{f"ppl/{g}": v for g, v in res.ppl.items()}, "tokens_per_s": res.tokens_per_s})
        for g, v in res.ppl.items():
            ppl_series.setdefault(g, []).append(v)
        speed.append(res.tokens_per_s)
        log.info("k=%-3d %s  %.0f tok/s", k, "  ".join(f"{g}={v:.2f}" for g, v in res.ppl.items()), res.tokens_per_s)
    adapter.set_top_k(model, original)

    # ---- report
    with open(ctx.out_dir / "topk_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_lines(ks, ppl_series, ctx.out_dir / "topk_sweep.png", xlabel="experts per token (top-k)",
               ylabel="held-out perplexity", title=f"top-k sweep (trained with k={original})", logy=True,
               secondary={"tokens/s": speed})
    metrics = {"trained_top_k": original}
    for row in rows:
        for key, v in row.items():
            if key != "top_k":
                metrics[f"k{row['top_k']}/{key}"] = v
    best = min(rows, key=lambda r: r["ppl/all"])
    metrics["best_k_by_ppl_all"] = best["top_k"]
    return metrics
