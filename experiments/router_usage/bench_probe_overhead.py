"""Probe overhead: probed forward time / plain forward time, measured in the same process, plus peak memory.

    python experiments/router_usage/bench_probe_overhead.py                 # embedded default model
    python experiments/router_usage/bench_probe_overhead.py --model /models/X --device cuda

Timing alternates plain and probed passes over the same batches (A B A B ...) after a warm-up and
reports the median of per-round ratios, so machine-speed drift cancels. Peak memory is measured in
two child processes (one per mode): max RSS on CPU, torch.cuda.max_memory_allocated on GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from moesurgeon.config import asset_path
from moesurgeon.data import DataSpec, load_blocks
from moesurgeon.models import ModelSpec, load_model, max_positions
from moesurgeon.probe import RouterUsageProbe


def load(args):
    model, tok, adapter = load_model(ModelSpec(path=args.model, device=args.device, dtype=args.dtype))
    spec = DataSpec(path=args.data, label_field="domain", block_size=args.block_size, max_examples=args.max_examples)
    blocks = load_blocks(spec, tok, max_positions(model))
    batches = list(blocks.batches(args.batch_size))[: args.batches]
    return model, adapter, blocks, batches


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def one_pass(model, batches, device, probe=None):
    t0 = time.perf_counter()
    for b in batches:
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        if probe is None:
            model(input_ids=ids, attention_mask=mask)
        else:
            with probe.batch(attention_mask=mask, label_ids=b["label_ids"].clamp_min(0).to(device)):
                model(input_ids=ids, attention_mask=mask)
    sync(device)
    return time.perf_counter() - t0


def timing(args):
    model, adapter, blocks, batches = load(args)
    groups = blocks.label_names or ["all"]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    one_pass(model, batches, args.device)  # warm-up
    plain, probed, ratios = [], [], []
    for _ in range(args.rounds):
        tp = one_pass(model, batches, args.device)
        with RouterUsageProbe(model, adapter, group_names=groups) as probe:
            tq = one_pass(model, batches, args.device, probe)
        plain.append(tp)
        probed.append(tq)
        ratios.append(tq / tp)
    return {
        "tokens_per_pass": tokens,
        "plain_s_median": statistics.median(plain),
        "probed_s_median": statistics.median(probed),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "plain_tokens_per_s": tokens / statistics.median(plain),
    }


def peak_memory(args, mode):
    """Run one mode in a child process and return its peak memory in MiB."""
    cmd = [sys.executable, __file__, "--child", mode] + [a for a in sys.argv[1:] if a != "--child"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def child(args):
    model, adapter, blocks, batches = load(args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if args.child == "probe":
        with RouterUsageProbe(model, adapter, group_names=blocks.label_names or ["all"]) as probe:
            one_pass(model, batches, args.device, probe)
    else:
        one_pass(model, batches, args.device)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=asset_path("reference_model"))
    p.add_argument("--data", default=asset_path("reference_data/heldout.jsonl"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", choices=["plain", "probe"], default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    result = timing(args)
    result["peak_mib_plain"] = peak_memory(args, "plain")
    result["peak_mib_probe"] = peak_memory(args, "probe")
    result["goal_ratio_le_1_05"] = result["ratio_median"] <= 1.05
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
