"""Router-LoRA resume on hostile checkpoints: truncated, empty, garbage, missing and foreign files, and
kills while a checkpoint is being written. A damaged newest step must fall back to the previous intact
one (and the run still end bit-identical to an uninterrupted one); with nothing intact, ResumeError
must name the files and the way out, and never repeat torch's advice to load with weights_only=False."""

from __future__ import annotations

import logging
import random
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moesurgeon.arch import get_adapter
from moesurgeon.lora import ResumeError, RouterLoraSpec, find_resume_dir, lora_state, wrap_routers
from moesurgeon.lora import checkpointing
from moesurgeon.lora.checkpointing import STATE_DIR, read_checkpoint
from helpers_lora import train_tiny
from tiny_models import tiny_model

# 6 steps, a checkpoint every 2, all three kept: step-000002, -000004, -000006
OPTS = dict(steps=6, save_every=2, keep_last=3, grad_accum=2, batch_size=3)
FILES = ["trainer_state.json", "lora.safetensors", "optimizer.pt", "scheduler.pt", "rng-rank0.pt"]
TORCH_ADVICE = "weights_only=False"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run (trained once per module): its directory and its final LoRA weights."""
    run = tmp_path_factory.mktemp("finished")
    final = lora_state(train_tiny(tiny_model("qwen3_moe"), run, **OPTS))
    return run, {k: v.clone() for k, v in final.items()}


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run's checkpoints, free to damage."""
    out = tmp_path / "run"
    shutil.copytree(finished[0] / STATE_DIR, out / STATE_DIR)
    return out


def step(run: Path, n: int) -> Path:
    return run / STATE_DIR / f"step-{n:06d}"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(max(path.stat().st_size, 64)))


def assert_same_weights(peft_model, expected: dict) -> None:
    got = lora_state(peft_model)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def full_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(err))  # chained exceptions too: torch's would show there


# ----------------------------------------------------------------------------- fall back to an older step
@pytest.mark.parametrize("name", FILES)
def test_truncated_file_falls_back_and_training_ends_as_uninterrupted(name, run, finished, caplog):
    truncate(step(run, 6) / name)
    with caplog.at_level(logging.WARNING, logger="moesurgeon"):
        ckpt = find_resume_dir(True, run)
    assert ckpt == step(run, 4)
    warning = caplog.text
    assert f"step-000006/{name}" in warning and "previous intact step 4" in warning
    assert TORCH_ADVICE not in warning

    assert_same_weights(train_tiny(tiny_model("qwen3_moe"), run, resume_from=ckpt, **OPTS), finished[1])
    assert read_checkpoint(step(run, 6), rank=0)["meta"]["step"] == 6  # rewritten whole
    assert not any(p.name.startswith((".tmp", ".trash")) for p in (run / STATE_DIR).iterdir())


def test_zero_length_file_given_to_the_trainer_falls_back(run, finished, caplog):
    (step(run, 6) / "optimizer.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="moesurgeon"):  # the trainer checks too, not only find_resume_dir
        model = train_tiny(tiny_model("qwen3_moe"), run, resume_from=step(run, 6), **OPTS)
    assert "optimizer.pt: is empty (0 bytes)" in caplog.text and "previous intact step 4" in caplog.text
    assert_same_weights(model, finished[1])


@pytest.mark.parametrize("name", ["trainer_state.json", "rng-rank0.pt", "lora.safetensors"])
def test_garbage_bytes_fall_back(name, run, caplog):
    garbage(step(run, 6) / name)
    with caplog.at_level(logging.WARNING, logger="moesurgeon"):
        assert find_resume_dir(True, run) == step(run, 4)
    assert f"step-000006/{name}" in caplog.text and TORCH_ADVICE not in caplog.text


def test_missing_file_falls_back(run, caplog):
    (step(run, 6) / "scheduler.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="moesurgeon"):
        assert find_resume_dir(True, run) == step(run, 4)
    assert "step-000006/scheduler.pt: is missing" in caplog.text


# ----------------------------------------------------------------------------- nothing intact
def test_only_checkpoint_damaged_raises_resume_error(run):
    shutil.rmtree(step(run, 2))
    shutil.rmtree(step(run, 4))
    # a pickle of something other than tensors: exactly the file torch answers with its weights_only=False advice
    torch.save({"python": Path("x"), "numpy": 0, "torch": 0}, step(run, 6) / "rng-rank0.pt")
    with pytest.raises(ResumeError) as from_finder:
        find_resume_dir(True, run)
    with pytest.raises(ResumeError) as from_trainer:
        train_tiny(tiny_model("qwen3_moe"), run, resume_from=step(run, 6), **OPTS)
    for err in (from_finder.value, from_trainer.value):
        message = str(err)
        assert "step-000006/rng-rank0.pt: is not a readable torch file" in message
        assert f"delete {run / STATE_DIR}" in message and "router_lora.resume=false" in message
        assert TORCH_ADVICE not in full_text(err)


def test_every_checkpoint_damaged_lists_each_file(run):
    truncate(step(run, 6) / "lora.safetensors")
    (step(run, 4) / "trainer_state.json").write_bytes(b"")
    garbage(step(run, 2) / "optimizer.pt")
    with pytest.raises(ResumeError, match="none of its 3 checkpoint") as caught:
        find_resume_dir("auto", run)  # auto too: starting over would silently throw the training away
    for part in ("step-000006/lora.safetensors", "step-000004/trainer_state.json", "step-000002/optimizer.pt"):
        assert part in str(caught.value)


# ----------------------------------------------------------------------------- files from another run
def rank4_lora() -> dict[str, torch.Tensor]:
    model = tiny_model("qwen3_moe")
    wrapped = wrap_routers(model, get_adapter(model), RouterLoraSpec(rank=4))
    return {k: v.clone() for k, v in lora_state(wrapped).items()}


def rank4_optimizer_state() -> dict:
    params = [torch.nn.Parameter(v) for v in rank4_lora().values()]
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer.state_dict()


@pytest.mark.parametrize("name", ["lora.safetensors", "optimizer.pt"])
def test_file_from_another_run_names_the_tensor_and_both_shapes(name, run):
    shutil.rmtree(step(run, 2))
    shutil.rmtree(step(run, 4))
    target = step(run, 6) / name
    if name == "lora.safetensors":
        save_file(rank4_lora(), str(target))
    else:
        torch.save(rank4_optimizer_state(), target)
    assert find_resume_dir(True, run) == step(run, 6)  # readable: only the model can tell it does not fit
    with pytest.raises(ResumeError) as caught:
        train_tiny(tiny_model("qwen3_moe"), run, resume_from=step(run, 6), **OPTS)
    message = str(caught.value)
    assert f"step-000006/{name}" in message
    assert "'base_model.model.model.layers.0.mlp.gate.lora_A.default.weight' has shape [4, 32], this model " \
           "expects [2, 32]" in message


# ----------------------------------------------------------------------------- kills while saving
class Killed(Exception):
    pass


def kill_while_writing(monkeypatch, run):
    shutil.rmtree(step(run, 6))  # step 6 is written afresh, and the kill comes half-way through
    real = checkpointing._save_torch

    def save(obj, path):
        if path.name == "scheduler.pt" and path.parent.name == ".tmp-step-000006":
            raise Killed
        real(obj, path)

    monkeypatch.setattr(checkpointing, "_save_torch", save)


def kill_between_renames(monkeypatch, run):
    real = checkpointing._set_aside

    def set_aside(path):
        real(path)  # the old step-000006 is out of the way, the new one not yet renamed in
        raise Killed

    monkeypatch.setattr(checkpointing, "_set_aside", set_aside)


@pytest.mark.parametrize("kill", [kill_while_writing, kill_between_renames])
def test_kill_while_saving_leaves_whole_steps_or_none(kill, run, finished, monkeypatch):
    with monkeypatch.context() as patch:
        kill(patch, run)
        with pytest.raises(Killed):  # resuming at 4 rewrites step 6: the replacement path
            train_tiny(tiny_model("qwen3_moe"), run, resume_from=step(run, 4), **OPTS)
    for ckpt in (run / STATE_DIR).glob("step-*"):
        read_checkpoint(ckpt, rank=0)  # every step-* that is there is whole
    assert not step(run, 6).exists()
    ckpt = find_resume_dir(True, run)
    assert ckpt == step(run, 4)
    assert_same_weights(train_tiny(tiny_model("qwen3_moe"), run, resume_from=ckpt, **OPTS), finished[1])
    assert not any(p.name.startswith((".tmp", ".trash")) for p in (run / STATE_DIR).iterdir())
