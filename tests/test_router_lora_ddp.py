"""experiment=router_lora under DDP: two CPU processes (gloo, torchrun) on a tiny checkpoint.

Slow (two interpreters, a process group): run with `pytest -m slow tests/test_router_lora_ddp.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import write_tiny_jsonl

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.slow
def test_two_processes_finish_and_agree(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("qwen3_moe")
    data = write_tiny_jsonl(tmp_path / "data.jsonl")
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "moesurgeon", "experiment=router_lora", f"model.path={ckpt}", "data=jsonl",
        "data.label_field=domain", f"data.heldout.path={data}", f"data.train.path={data}", "data.block_size=32",
        "progress=false", "router_lora.domain=code", "router_lora.lora.rank=2", "router_lora.train.steps=4",
        "router_lora.train.warmup_steps=1", "router_lora.train.batch_size=2", "router_lora.train.lr=1e-2",
        "router_lora.train.log_every=2", "router_lora.train.save_every=2", "export.enabled=false",
        f"hydra.run.dir={run}",  # one run dir for both processes
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/num_processes"] == 2
    assert metrics["train/ranks_agree"] is True  # every process gathered: bit-identical LoRA weights
    assert metrics["train/steps"] == 4
    ckpt_dir = run / "train_state" / "step-000004"
    assert {p.name for p in ckpt_dir.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    # the adapter written by the main process is the trained state every process checkpointed
    final = load_file(str(ckpt_dir / "lora.safetensors"))
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == len(final) and all(torch.count_nonzero(t) for t in final.values())
