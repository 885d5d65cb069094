"""Routing specialization of the embedded model vs the same architecture at random initialization.

    python experiments/reference_model/measure_specialization.py [--seeds 0 1 2]

Profiles the held-out split (labelled by domain) with the project's RouterUsageProbe and prints,
for the trained model and for randomly initialised models of the same config:
- mean over MoE layers of the Jensen-Shannon divergence between domain usage distributions (bits)
- each domain's share of selections taken by its two most used experts per layer
Writes specialization.json and the trained model's heatmap next to this script when --write is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moesurgeon.arch import get_adapter
from moesurgeon.config import asset_path
from moesurgeon.data import DataSpec, load_blocks
from moesurgeon.models import ModelSpec, load_model
from moesurgeon.probe import layer_metrics, profile_usage


def summarize(model, blocks):
    stats, _ = profile_usage(model, get_adapter(model), blocks, batch_size=8, progress=False)
    m = layer_metrics(stats)
    return stats, {"jsd_bits_mean": m["jsd_bits/mean"],
                   **{k.replace("/", "_"): v for k, v in m.items() if k.startswith("top2_share/")}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--write", action="store_true", help="write specialization.json + heatmap beside this script")
    args = p.parse_args()
    torch.set_num_threads(2)
    model_dir = asset_path("reference_model")
    model, tok, _ = load_model(ModelSpec(path=model_dir))
    blocks = load_blocks(DataSpec(path=asset_path("reference_data/heldout.jsonl"), label_field="domain", block_size=256), tok)
    stats, trained = summarize(model, blocks)
    random_runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        rnd = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).eval()
        random_runs.append(summarize(rnd, blocks)[1])
    rand_jsd = sum(r["jsd_bits_mean"] for r in random_runs) / len(random_runs)
    result = {
        "trained": trained,
        "random_init": random_runs,
        "random_init_jsd_bits_mean_avg": rand_jsd,
        "jsd_ratio_trained_over_random": trained["jsd_bits_mean"] / rand_jsd if rand_jsd > 0 else float("inf"),
        "heldout_tokens": blocks.num_tokens(),
    }
    print(json.dumps(result, indent=1))
    if args.write:
        here = Path(__file__).parent
        (here / "specialization.json").write_text(json.dumps(result, indent=1) + "\n")
        from moesurgeon.recipes.common import layer_short_names
        from moesurgeon.viz import plot_usage

        plot_usage(stats.usage_share().permute(1, 0, 2).numpy(), stats.group_names, layer_short_names(stats.layer_names),
                   here / "usage_heatmap.png", title="embedded reference model: share of routed tokens per domain")


if __name__ == "__main__":
    main()
