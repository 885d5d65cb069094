"""Benchmark of the disk-only expert prune (`prune_checkpoint`) on a synthetic multi-shard checkpoint (>= 4 GB).

    python experiments/expert_surgery/bench_prune.py --dir /tmp/browse_bench --out /tmp/prune_bench

1. Uses (or writes, with experiments/browse/bench_browse.py's `write_checkpoint`) a qwen3_moe checkpoint
   with Qwen3-30B-A3B expert widths (hidden 2048, expert intermediate 768, 128 experts, bf16) at
   <dir>/checkpoint; it is only read.
2. Removes 50 % of the experts of every MoE layer (a seeded random choice: the point is I/O) with
   `prune_checkpoint` in a child process (peak RSS from wait4), and in the same run copies exactly the
   kept byte count of the source shards with `cp` (whole shards in order, then `dd` for the remainder of
   the next one), once as is and once followed by `sync` of the copies: the prune fsyncs every shard it
   writes, plain `cp` leaves the data in the page cache. Cold page cache (source pages dropped with
   posix_fadvise before each run, outputs removed) and then warm (sources read once before).
3. Checks the pruned output without loading a model: shard names one series, index and headers as
   planned, kept bytes = index total_size, router rows and a few renamed experts byte-equal to the source.
4. Prints the figures as JSON with the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from moesurgeon.arch import get_adapter
from moesurgeon.io import CheckpointReader

# the synthetic checkpoint and the page-cache helpers are the browser benchmark's (experiments/browse/)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "browse"))
from bench_browse import drop_cache, shard_files, write_checkpoint  # noqa: E402

# the child times the whole prune_checkpoint call (config, plan, headers, write, verification), not the
# interpreter and torch start-up, which the process wall time adds
PRUNE = ("import json, sys, time; from pathlib import Path; from moesurgeon.arch import get_adapter; "
         "from moesurgeon.surgery.prune_experts import prune_checkpoint; "
         "src, out, removed = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]); t0 = time.perf_counter(); "
         "config = json.loads((src / 'config.json').read_text()); "
         "r = prune_checkpoint(src, out, get_adapter(config), config, {int(k): v for k, v in removed.items()}); "
         "print(json.dumps({'bytes_written_tensors': r.bytes_written_tensors, 'call_s': time.perf_counter() - t0, "
         "'write_s': r.elapsed_s, 'reuse_method': r.reuse_method, 'notes': r.notes}))")


def run_child(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one child process. Dirty pages left by the step before are
    written first (`sync`, not timed): their writeback would otherwise be charged to whichever step runs next."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed with status {status}")
    return wall, usage.ru_maxrss * 1024, out


def choose_removed(config: dict, seed: int) -> dict[int, list[int]]:
    adapter = get_adapter(config)
    experts = adapter.num_experts_from_config(config)
    rng = random.Random(seed)
    return {i: sorted(rng.sample(range(experts), experts // 2)) for i in adapter.moe_layer_indices(config)}


def kept_bytes(reader: CheckpointReader, config: dict, removed: dict[int, list[int]]) -> int:
    """Bytes of the tensors the pruned checkpoint holds, counted from the source headers (not from the output)."""
    adapter = get_adapter(config)
    experts = adapter.num_experts_from_config(config)
    total = 0
    for name in reader.tensor_names():
        info = reader.header(name)
        layer = next((i for i in removed if name.startswith(adapter.disk_block_prefix(i) + ".")), None)
        parsed = adapter.split_expert_name(name, layer) if layer is not None else None
        if parsed is not None:
            total += 0 if parsed[0] in removed[layer] else info.nbytes
        elif layer is not None and info.shape[:1] == (experts,):  # router rows
            total += info.nbytes // experts * (experts - len(removed[layer]))
        else:
            total += info.nbytes
    return total


def cp_command(files: list[Path], count: int, dest: Path, sync: bool) -> list[str]:
    """cp of whole source shards in order, then dd of the remainder of the next one: exactly `count` bytes."""
    parts, left = [], count
    for i, path in enumerate(files):
        size = path.stat().st_size
        if size <= left:
            parts.append(f"cp {path} {dest}/{i}")
            left -= size
        elif left:
            parts.append(f"dd if={path} of={dest}/{i} bs=16M count={left} iflag=count_bytes status=none")
            left = 0
    if sync:
        parts.append(f"sync {dest}/*")
    return ["sh", "-c", " && ".join(parts)]


def check_output(src: Path, out: Path, config: dict, removed: dict[int, list[int]], kept: int) -> dict:
    """Index, headers and a few tensors of the pruned checkpoint against the source; no model is loaded."""
    adapter = get_adapter(config)
    experts = adapter.num_experts_from_config(config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)], names
    assert sorted(set(index["weight_map"].values())) == names
    assert index["metadata"]["total_size"] == kept, (index["metadata"]["total_size"], kept)
    assert json.loads((out / "config.json").read_text())["num_experts"] == experts // 2
    checked = 0
    with CheckpointReader(src) as s, CheckpointReader(out) as o:
        for layer, gone in removed.items():
            keep = [e for e in range(experts) if e not in gone]
            router = f"{adapter.disk_block_prefix(layer)}.{adapter.router_attr}.weight"
            assert o.header(router).shape == (len(keep), s.header(router).shape[1])
            assert torch.equal(o.get(router), s.get(router)[keep])
            for new in (0, len(keep) // 2, len(keep) - 1):  # first, middle, last kept expert
                for old_name, new_name in zip(adapter.expert_tensor_names(config, layer, keep[new]),
                                              adapter.expert_tensor_names(config, layer, new)):
                    assert o.header(new_name).shape == s.header(old_name).shape
                    assert torch.equal(o.get(new_name), s.get(old_name))
                    checked += 1
            assert adapter.expert_tensor_names(config, layer, len(keep))[0] not in o
        assert len(o) == len(s) - sum(len(g) for g in removed.values()) * len(adapter.expert_disk_suffixes)
    return {"check_shards": len(names), "check_tensors_compared": checked + len(removed), "check_ok": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/browse_bench"), help="holds checkpoint/ (written if absent)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/prune_bench"), help="scratch for outputs (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=128)
    args = ap.parse_args()
    ckpt = args.dir / "checkpoint"
    if not (ckpt / "WRITTEN").exists():
        write_checkpoint(ckpt, args.layers, args.experts, int(1e9))
    config = json.loads((ckpt / "config.json").read_text())
    files = shard_files(ckpt)
    removed = choose_removed(config, args.seed)
    with CheckpointReader(ckpt) as reader:
        kept = kept_bytes(reader, config, removed)
        tensor_total = sum(reader.header(n).nbytes for n in reader.tensor_names())
    figures: dict = {"checkpoint_bytes": sum(p.stat().st_size for p in files), "tensor_bytes": tensor_total,
                     "shards": len(files), "bytes_kept": kept, "experts_removed_per_layer": len(removed[0]),
                     "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()]}
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    pruned, copies = args.out / "pruned", args.out / "cp"
    for temp in ("cold", "warm"):
        if temp == "warm":
            run_child(["sh", "-c", " ".join(["cat", *map(str, files)]) + " > /dev/null"])
        for sync in (False, True):
            shutil.rmtree(copies, ignore_errors=True)
            copies.mkdir()
            if temp == "cold":
                drop_cache(files)
            figures[f"{temp}_cp{'_sync' if sync else ''}_s"] = round(run_child(cp_command(files, kept, copies, sync))[0], 3)
        assert sum(p.stat().st_size for p in copies.iterdir()) == kept
        shutil.rmtree(copies)
        shutil.rmtree(pruned, ignore_errors=True)
        if temp == "cold":
            drop_cache(files)
        wall, rss, text = run_child([sys.executable, "-c", PRUNE, str(ckpt), str(pruned), json.dumps(removed)])
        result = json.loads(text.strip().splitlines()[-1])
        written = result["bytes_written_tensors"]
        assert written == sum(p.stat().st_size for p in pruned.glob("*.safetensors"))
        call = result["call_s"]
        figures.update({f"{temp}_prune_process_s": round(wall, 3), f"{temp}_prune_s": round(call, 3),
                        f"{temp}_prune_write_s": round(result["write_s"], 3),
                        f"{temp}_peak_rss_mb": round(rss / 2**20, 1), f"{temp}_bytes_written": written,
                        f"{temp}_ratio_written_over_kept": round(written / kept, 5),
                        f"{temp}_ratio_prune_over_cp": round(call / figures[f"{temp}_cp_s"], 3),
                        f"{temp}_ratio_prune_over_cp_sync": round(call / figures[f"{temp}_cp_sync_s"], 3),
                        f"{temp}_ratio_process_over_cp_sync": round(wall / figures[f"{temp}_cp_sync_s"], 3)})
        figures["output_shards"] = sorted(result["reuse_method"].items())
    figures.update(check_output(ckpt, pruned, config, removed, kept))
    shutil.rmtree(args.out)
    figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
