"""Which torch thread count to use on CPU: probed throughput of experiment=router_usage per `threads` value.

    python experiments/router_usage/bench_threads.py --rounds 3                  # the embedded model
    python experiments/router_usage/bench_threads.py --rounds 3 --busy 2         # with 2 CPU-bound neighbours

Runs the whole command once per thread count per round, alternating (1, 2, 1, 2, ...), and reads
`probe_tokens_per_s` from each run's metrics.json; prints the median per count and the per-round
ratio. `--busy N` starts N busy-looping processes for the duration, as other jobs sharing the cores
would. The default `threads=auto` (free cores at start) follows from these figures (README of this folder, "Threads").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(threads: str, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "moesurgeon", "experiment=router_usage", f"threads={threads}", "progress=false",
           f"hydra.run.dir={out}", *extra]
    subprocess.run(cmd, check=True, capture_output=True)
    return float(json.loads((out / "metrics.json").read_text())["probe_tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts to compare")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound neighbour processes to run meanwhile")
    ap.add_argument("extra", nargs="*", help="more overrides, e.g. model=local model.path=...")
    args = ap.parse_args()
    counts = args.threads.split(",")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        results: dict[str, list[float]] = {t: [] for t in counts}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for t in counts:
                    results[t].append(run_once(t, Path(tmp) / f"{t}-{r}", args.extra))
                    print(f"round {r} threads={t}: {results[t][-1]:,.0f} tokens/s", flush=True)
    finally:
        for h in hogs:
            h.kill()
    base = counts[0]
    print(f"\nbusy neighbours: {args.busy}")
    for t in counts:
        ratios = [a / b for a, b in zip(results[t], results[base])]
        print(f"threads={t}: median {statistics.median(results[t]):,.0f} tokens/s; "
              f"ratio to threads={base} per round: median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
