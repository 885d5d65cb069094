"""Usage statistics and expert scores from several processes (moesurgeon/distributed.py) equal a one-process run.

Two CPU processes (gloo, a file store in tmp_path) each run every other batch of the same blocks and add
their sums; counts, tokens and co-activation must equal the single-process figures exactly, float sums to
float64 rounding. `experiment=router_usage` under torchrun is checked end to end in the same way (slow:
`pytest -m slow tests/test_distributed_stats.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from moesurgeon.arch import get_adapter
from moesurgeon.data import TokenBlocks
from moesurgeon.distributed import DistributedMismatchError, Shard, check_same
from moesurgeon.probe import profile_usage, score_experts
from tiny_models import tiny_model, write_tiny_jsonl

SRC = Path(__file__).resolve().parents[1] / "src"
FAMILIES = ("qwen3_moe",)  # the sums are family-independent; the families are covered in test_expert_scores


def blocks() -> TokenBlocks:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (11, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    mask[9, 2:] = 0
    return TokenBlocks(ids, mask, torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 1]), ["a", "b", "c"])


def measure(family: str, shard: Shard | None):
    torch.set_num_threads(1)
    model = tiny_model(family)
    adapter = get_adapter(model)
    usage, _ = profile_usage(model, adapter, blocks(), batch_size=2, progress=False, shard=shard)
    scores, _ = score_experts(model, adapter, blocks(), batch_size=2, progress=False, by_label=True, shard=shard)
    return usage, scores


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        shard = Shard(rank, world)
        results = {family: measure(family, shard) for family in FAMILIES}
        try:
            check_same(shard, "the test value", f"value-{rank}")
            mismatch = "not refused"
        except DistributedMismatchError as err:
            mismatch = str(err)
        check_same(shard, "the test value", "same")  # equal values pass
        torch.save({"results": results, "mismatch": mismatch}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_add_up_to_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for family in FAMILIES:
        usage, scores = measure(family, None)
        for got in ranks:
            g_usage, g_scores = got["results"][family]
            for name in ("tokens", "counts", "coact"):
                assert torch.equal(getattr(g_usage, name), getattr(usage, name)), (family, name)
            for name in ("gate_mass", "prob_sum", "entropy_sum"):
                torch.testing.assert_close(getattr(g_usage, name), getattr(usage, name), rtol=1e-12, atol=1e-12)
            assert torch.equal(g_scores.counts, scores.counts) and torch.equal(g_scores.tokens, scores.tokens)
            for name in ("gate_mass", "saliency_sum", "norm_sum"):
                torch.testing.assert_close(getattr(g_scores, name), getattr(scores, name), rtol=1e-12, atol=1e-12)
        assert int(usage.tokens[0].sum()) == 110 - 4 - 8  # every real token once, not once per process
    for got in ranks:
        assert "differ in the test value" in got["mismatch"] and "{'value-0': [0], 'value-1': [1]}" in got["mismatch"]


def test_more_processes_than_batches_refused():
    from moesurgeon.distributed import check_batches

    with pytest.raises(DistributedMismatchError, match=r"3 batches for 4 processes.*--nproc_per_node 3"):
        check_batches(Shard(0, 4), 3)
    check_batches(Shard(0, 4), 4)


@pytest.mark.slow  # three interpreters and a process group: ~1 min; `pytest -m slow`
def test_router_usage_under_torchrun_equals_one_process(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    data = write_tiny_jsonl(tmp_path / "data.jsonl")
    common = ["experiment=router_usage", f"model.path={ckpt}", "data=jsonl", "data.label_field=domain",
              f"data.heldout.path={data}", "data.block_size=16", "data.batch_size=2", "progress=false", "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    one, two = tmp_path / "one", tmp_path / "two"
    for run, launcher in ((one, [sys.executable, "-m", "moesurgeon"]),
                          (two, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "moesurgeon"])):
        proc = subprocess.run([*launcher, *common, f"hydra.run.dir={run}"], capture_output=True, text=True,
                              timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = load_file(str(one / "usage_stats.safetensors")), load_file(str(two / "usage_stats.safetensors"))
    assert a.keys() == b.keys()
    for name in ("tokens", "counts", "coact"):
        assert torch.equal(a[name], b[name]), name
    for name in ("gate_mass", "prob_sum", "entropy_sum"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-12)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["tokens"] == json.loads((one / "metrics.json").read_text())["tokens"]
