"""Write router-modified checkpoints through moesurgeon's export path (runs in the MAIN venv).

Loads a source checkpoint with transformers 5 (float32), adds seeded Gaussian noise to every MoE
router weight in memory, optionally changes top-k too, and exports with
`moesurgeon.export.export_patched_model(..., ExportOptions(verify_reload=True))` — the same
function the experiments use — so the written checkpoint differs from the source in its router
tensors (and, with --top-k, in config.json's `num_experts_per_tok`), every other shard reused.

    python make_router_patch.py --source SRC --out OUT [--scale 0.5] [--top-k 4] [--seed 0]

The noise is `scale * std(router weight) * N(0, 1)` per layer, so routing really changes (the
compat check also verifies that the patched outputs differ from the source's). Prints the export
report as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moesurgeon.arch import get_adapter
from moesurgeon.export import ExportOptions, export_patched_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scale", type=float, default=0.5, help="noise std relative to each router's weight std")
    ap.add_argument("--top-k", type=int, default=None, help="also change experts-per-token (config.json)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for layer in layers:
            w = layer.router.weight
            w.add_(torch.randn(w.shape, generator=gen) * (args.scale * float(w.std())))
    config_edits = {}
    if args.top_k is not None:
        adapter.set_top_k(model, args.top_k)
        config_edits = adapter.top_k_config_edit(args.top_k)
    probe = torch.randint(3, int(model.config.vocab_size), (2, 16), generator=gen)
    report = export_patched_model(model, adapter, args.source, args.out, ExportOptions(verify_reload=True),
                                  config_edits=config_edits, probe_input_ids=probe)
    if report["export/tensors_replaced"] != len(layers):
        print(f"expected {len(layers)} router tensors replaced, got {report['export/tensors_replaced']}",
              file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
