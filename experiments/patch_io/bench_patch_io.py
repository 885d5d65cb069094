"""Benchmark: patching a large MoE checkpoint with moesurgeon.io vs copying it.

Builds a synthetic Qwen3-MoE-like checkpoint (random bf16, one tensor per expert
projection, a router `model.layers.L.mlp.gate.weight` in every layer, shards cut
in state-dict order the way HF writers do, so routers land in most shards) under
--workdir, then in the same run:
  1. times `cp -r` of it (and `cp -r --reflink=never`, and the fsync of the copy);
  2. runs the patch "new routers for all layers + num_experts_per_tok" in a child
     process, once per --modes entry; the child reports its peak RSS (VmHWM);
  3. prints bytes written / bytes changed, patch time / cp time, peak RSS, and the
     filesystem's free-space delta (the physical cost, seeing through reflinks).
Every timing is the best of 2 runs (page cache warm: the checkpoint was just written).
Everything it creates is deleted at the end (unless --keep).

Example:  PYTHONPATH=src python experiments/patch_io/bench_patch_io.py --workdir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))


def build_checkpoint(root: Path, args) -> dict:
    """Write the synthetic checkpoint with moesurgeon's streaming shard writer (memory: one random block)."""
    import torch

    from moesurgeon.io.shard_layout import parse_size, shard_names, split_greedy, write_index
    from moesurgeon.io.shard_writer import OutTensor, write_shard

    torch.manual_seed(0)
    block = torch.randn(96 << 20, dtype=torch.bfloat16)  # 192 MiB of random bf16, sliced for every tensor
    h, m, heads, kv, hd, vocab = args.hidden, args.moe_intermediate, 32, 4, 128, args.vocab
    specs = [("model.embed_tokens.weight", (vocab, h))]
    for layer in range(args.layers):
        p = f"model.layers.{layer}"
        specs += [(f"{p}.self_attn.q_proj.weight", (heads * hd, h)), (f"{p}.self_attn.k_proj.weight", (kv * hd, h)),
                  (f"{p}.self_attn.v_proj.weight", (kv * hd, h)), (f"{p}.self_attn.o_proj.weight", (h, heads * hd)),
                  (f"{p}.self_attn.q_norm.weight", (hd,)), (f"{p}.self_attn.k_norm.weight", (hd,))]
        for e in range(args.experts):
            x = f"{p}.mlp.experts.{e}"
            specs += [(f"{x}.gate_proj.weight", (m, h)), (f"{x}.up_proj.weight", (m, h)),
                      (f"{x}.down_proj.weight", (h, m))]
        specs += [(f"{p}.mlp.gate.weight", (args.experts, h)), (f"{p}.input_layernorm.weight", (h,)),
                  (f"{p}.post_attention_layernorm.weight", (h,))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    items, cursor = [], 0
    for name, shape in specs:
        numel = 1
        for d in shape:
            numel *= d
        if cursor + numel > block.numel():
            cursor = 0
        items.append(OutTensor(name, "BF16", shape, numel * 2, block[cursor:cursor + numel].view(shape)))
        cursor += numel + 4099  # shift so tensors differ
    root.mkdir(parents=True)
    groups = split_greedy(items, [t.nbytes for t in items], parse_size(args.shard_size))
    weight_map = {}
    for file, group in zip(shard_names(len(groups)), groups, strict=True):
        write_shard(str(root / file), group, {"format": "pt"}, fsync=False)
        weight_map.update({t.name: file for t in group})
    total = sum(t.nbytes for t in items)
    write_index(root / "model.safetensors.index.json", weight_map, {"total_size": total})
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": h,
              "moe_intermediate_size": m, "num_hidden_layers": args.layers, "num_experts": args.experts,
              "num_experts_per_tok": 8, "vocab_size": vocab, "torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (root / "generation_config.json").write_text('{"do_sample": true}')
    routers = {n for n, _ in specs if n.endswith(".mlp.gate.weight")}
    return {"bytes": total, "shards": len(groups), "shards_with_router": len({weight_map[r] for r in routers})}


def child_patch(src: str, out: str, mode: str, shard_size: str, result: str) -> None:
    """Runs in the measured child process: build the router patch and write it."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from moesurgeon.io import CheckpointReader, Patch, write_patched_checkpoint

    with CheckpointReader(src) as reader:
        routers = [n for n in reader.tensor_names() if n.endswith(".mlp.gate.weight")]
        replace = {n: (reader.get(n).float() * 0.5).to(torch.bfloat16) for n in routers}
    patch = Patch(replace=replace, config_edits={"num_experts_per_tok": 4})
    report = write_patched_checkpoint(src, out, patch, mode=mode, max_shard_size=shard_size)
    summary = {k: v for k, v in vars(report).items() if k not in ("files_copied",)}
    summary["process_s"] = time.perf_counter() - t0
    # Peak RSS of THIS process image. Not wait4()'s ru_maxrss: Linux carries the parent's high-water mark
    # over (v)fork+exec into the child's ru_maxrss, and the parent held the 192 MiB generator block.
    status = Path("/proc/self/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    summary["peak_rss_bytes"] = int(hwm.split()[1]) * 1024
    Path(result).write_text(json.dumps(summary))


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def settle(path: Path, timeout_s: float = 30.0) -> int:
    """Free bytes once the filesystem stops changing: XFS frees deleted files' blocks in the background."""
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        os.sync()
        now = free_bytes(path)
        if now == last:
            break
        last = now
        time.sleep(0.5)
    return last


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def measure_cp(src: Path, work: Path, repeats: int = 2) -> dict:
    """Best of `repeats` runs (the figure most favourable to cp, so the ratios are not flattered)."""
    res = {}
    for label, extra in (("cp -r", []), ("cp -r --reflink=never", ["--reflink=never"])):
        runs = []
        for _ in range(repeats):
            dst = work / "cp-copy"
            wall = timed(["cp", "-r", *extra, str(src), str(dst)])
            flush = timed(["sync", *map(str, dst.iterdir())])  # fsync each copied file, like the patch does
            runs.append((wall, wall + flush))
            shutil.rmtree(dst)
            os.sync()
        res[label] = {"wall_s": min(r[0] for r in runs), "wall_plus_fsync_s": min(r[1] for r in runs)}
    return res


def measure_patch(src: Path, work: Path, mode: str, shard_size: str, repeats: int = 2) -> dict:
    """Best (shortest wall) of `repeats` runs, like measure_cp."""
    runs = [measure_patch_once(src, work, mode, shard_size) for _ in range(repeats)]
    return min(runs, key=lambda r: r["wall_s"])


def measure_patch_once(src: Path, work: Path, mode: str, shard_size: str) -> dict:
    out, result = work / f"patched-{mode}", work / f"report-{mode}.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    free_before = settle(work)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(src), str(out), shard_size, str(result)],
                            env=env)
    status = proc.wait()
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"patch child failed with status {status}")
    res = json.loads(result.read_text())
    res.update(wall_s=wall, physical_bytes=free_before - settle(work))
    shutil.rmtree(out)
    return res


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT met"


def report(info: dict, cp: dict, patches: dict, fs: str) -> None:
    gb = 1e9
    print(f"\n== filesystem {fs}: checkpoint {info['bytes'] / gb:.2f} GB in {info['shards']} shards, "
          f"{info['shards_with_router']} of them hold a router ==")
    for label, r in cp.items():
        print(f"{label:<24} {r['wall_s']:7.2f} s   (+ fsync of the copy: {r['wall_plus_fsync_s']:7.2f} s)")
    for mode, r in patches.items():
        methods = sorted(set(r["reuse_method"].values()))
        ratio = r["bytes_written_tensors"] / r["bytes_changed_tensors"]
        print(f"\n-- patch mode={mode}: routers of all layers ({r['bytes_changed_tensors'] / 1e6:.2f} MB) + top-k --")
        print(f"shard methods                          {methods}")
        print(f"bytes written (tensor shards)          {r['bytes_written_tensors'] / 1e6:12.2f} MB")
        print(f"bytes written (index+config+sidecars)  {r['bytes_written_other'] / 1e6:12.3f} MB")
        print(f"physical disk used (free-space delta)  {r['physical_bytes'] / 1e6:12.2f} MB")
        print(f"bytes written / bytes changed          {ratio:12.3f}   (goal <= 1.01: {verdict(ratio <= 1.01)})")
        print(f"patch wall (child process, incl. python+torch start) {r['wall_s']:7.2f} s;"
              f" in-process write {r['elapsed_s']:7.2f} s")
        # On a reflink filesystem plain `cp -r` (coreutils >= 9) clones too, so also compare with a real copy.
        for cp_label in cp:
            for label, t in (("wall", r["wall_s"]), ("in-process", r["elapsed_s"])):
                q = t / cp[cp_label]["wall_s"] if cp[cp_label]["wall_s"] > 0 else float("inf")
                print(f"patch {label:<10} / {cp_label:<22} {q:10.3f}   (goal <= 0.05: {verdict(q <= 0.05)})")
        rss = r["peak_rss_bytes"]
        print(f"peak RSS of the patch process          {rss / 2**20:12.1f} MiB (goal < 1 GB: {verdict(rss < 1e9)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp", help="where the temporary checkpoint and copies go")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--moe-intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", default="1GB", help="shard size of the synthetic checkpoint and of the output")
    ap.add_argument("--modes", default="reuse,full")
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint (printed path)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_patch(args.child[1], args.child[2], args.child[0], args.child[3], args.child[4])

    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="moesurgeon-bench-", dir=args.workdir))
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", str(work)],
                        capture_output=True, text=True).stdout.split()[0]
    try:
        t0 = time.perf_counter()
        info = build_checkpoint(work / "source", args)
        print(f"built {info['bytes'] / 1e9:.2f} GB checkpoint in {time.perf_counter() - t0:.1f} s at {work}")
        os.sync()
        cp = measure_cp(work / "source", work)
        patches = {mode: measure_patch(work / "source", work, mode, args.shard_size) for mode in args.modes.split(",")}
        report(info, cp, patches, fs)
        print(f"\nbenchmark total {time.perf_counter() - t0:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps({"fs": fs, "checkpoint": info, "cp": cp, "patch": patches}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
