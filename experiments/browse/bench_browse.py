"""Benchmark of the checkpoint browser on a synthetic multi-shard MoE checkpoint (>= 4 GB by default).

    python experiments/browse/bench_browse.py --dir /tmp/browse_bench

1. Writes (once; reused when present) a qwen3_moe checkpoint with Qwen3-30B-A3B expert widths
   (hidden 2048, expert intermediate 768, 128 experts, bf16), tensor by tensor and shard by shard:
   the writer holds one tensor in memory, never the checkpoint.
2. In the same run, for a cold page cache (the shards' pages dropped with posix_fadvise before each
   read) and then a warm one: `cat <shards> > /dev/null`, and `build_browser` for each
   `--sigma-steps` value (in a child process, whose peak RSS is taken from wait4). Then a second
   browse that finds every shard in the statistics cache.
3. Prints the figures and the ratios browse / cat as JSON, with the load average before and after
   (the machine may be shared: the ratios hold only for the load they were measured under).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from moesurgeon.io.safetensors_format import encode_header, tensor_bytes

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 2048, 768, 32000, 32, 4, 128


def tensor_specs(layers: int, experts: int) -> list[tuple[str, tuple[int, ...]]]:
    specs = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.input_layernorm.weight", (HIDDEN,)), (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
                  (f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
                  (f"{p}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
                  (f"{p}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
                  (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
                  (f"{p}.self_attn.q_norm.weight", (HEAD_DIM,)), (f"{p}.self_attn.k_norm.weight", (HEAD_DIM,)),
                  (f"{p}.mlp.gate.weight", (experts, HIDDEN))]
        for e in range(experts):
            specs += [(f"{p}.mlp.experts.{e}.gate_proj.weight", (INTER, HIDDEN)),
                      (f"{p}.mlp.experts.{e}.up_proj.weight", (INTER, HIDDEN)),
                      (f"{p}.mlp.experts.{e}.down_proj.weight", (HIDDEN, INTER))]
    specs += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return specs


def make_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    # experts get different scales so the tracks are not flat
    expert = int(name.split(".experts.")[1].split(".")[0]) if ".experts." in name else 0
    scale = 0.02 * (1.0 + 0.5 * math.sin(expert))
    return (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)


def write_checkpoint(out: Path, layers: int, experts: int, shard_bytes: int) -> None:
    """Shard by shard, tensor by tensor: the header first (shapes are known), then each tensor's bytes."""
    out.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(layers, experts)
    shards, current, size = [], [], 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        head, _ = encode_header([(n, "BF16", s, math.prod(s) * 2) for n, s in shard], {"format": "pt"})
        with open(out / fname, "wb") as f:
            f.write(head)
            for name, shape in shard:
                f.write(tensor_bytes(make_tensor(name, shape, gen)))
                weight_map[name] = fname
                total += math.prod(shape) * 2
        print(f"wrote {fname} ({(out / fname).stat().st_size / 1e9:.2f} GB)", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": HIDDEN,
              "moe_intermediate_size": INTER, "intermediate_size": 6144, "num_experts": experts,
              "num_experts_per_tok": 8, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB, "norm_topk_prob": True,
              "mlp_only_layers": [], "decoder_sparse_step": 1, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "WRITTEN").write_text("complete\n")


def shard_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def drop_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed with status {status}")
    return wall, usage.ru_maxrss * 1024, out


BROWSE = ("import json, sys, torch; from pathlib import Path; from moesurgeon.browse import BrowseSettings, "
          "build_browser; torch.set_num_threads(int(sys.argv[4])); "
          "m = build_browser(Path(sys.argv[1]), Path(sys.argv[2]), cache_dir=Path(sys.argv[3]), progress=False, "
          "settings=BrowseSettings(sigma_steps=int(sys.argv[5]))); print(json.dumps(m))")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/browse_bench"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2, help="threads of the browse process (its compute workers)")
    ap.add_argument("--sigma-steps", default="5,0", help="browse.sigma_steps values to measure (0: no singular values)")
    args = ap.parse_args()
    ckpt, out = args.dir / "checkpoint", args.dir / "browser"
    if not (ckpt / "WRITTEN").exists():
        write_checkpoint(ckpt, args.layers, args.experts, int(args.shard_gb * 1e9))
    files = shard_files(ckpt)
    total = sum(p.stat().st_size for p in files)
    load_before = os.getloadavg()
    cache = args.dir / "cache"
    cat = ["sh", "-c", " ".join(["cat", *map(str, files)]) + " > /dev/null"]
    figures: dict = {"checkpoint_gb": round(total / 1e9, 3), "shards": len(files), "threads": args.threads,
                     "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load_before]}
    steps = [int(s) for s in args.sigma_steps.split(",")]
    for temp in ("cold", "warm"):
        if temp == "cold":
            drop_cache(files)
        else:
            run_child(cat)  # make sure every page is cached
        figures[f"{temp}_cat_s"] = round(run_child(cat)[0], 3)
        figures[f"{temp}_cat_gb_per_s"] = round(total / figures[f"{temp}_cat_s"] / 1e9, 3)
        for k in steps:
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            if temp == "cold":
                drop_cache(files)
            cmd = [sys.executable, "-c", BROWSE, str(ckpt), str(out), str(cache), str(args.threads), str(k)]
            wall, rss, text = run_child(cmd)
            metrics = json.loads(text.strip().splitlines()[-1])
            key = f"{temp}_sigma{k}"
            # build_browser's own wall time (the ratio); the process adds interpreter and torch start-up
            figures[f"{key}_browse_s"] = metrics["browse/wall_s"]
            figures[f"{key}_inventory_page_s"] = metrics["browse/inventory_s"]  # headers -> first page written
            figures[f"{key}_process_s"] = round(wall, 3)
            figures[f"{key}_peak_rss_mb"] = round(rss / 2**20, 1)
            figures[f"{key}_gb_per_s"] = round(total / metrics["browse/wall_s"] / 1e9, 3)
            figures[f"{key}_ratio_browse_over_cat"] = round(metrics["browse/wall_s"] / figures[f"{temp}_cat_s"], 3)
    cmd = [sys.executable, "-c", BROWSE, str(ckpt), str(out), str(cache), str(args.threads), str(steps[-1])]
    wall, rss, text = run_child(cmd)  # the cache of the last run is still there
    figures["cached_browse_s"] = json.loads(text.strip().splitlines()[-1])["browse/wall_s"]
    figures["cached_process_s"] = round(wall, 3)
    figures["cached_shards"] = json.loads(text.strip().splitlines()[-1])["browse/shards_cached"]
    figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
