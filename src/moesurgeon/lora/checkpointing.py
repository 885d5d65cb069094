"""Save and resume router-LoRA training so that a resumed run ends bit-identical to an uninterrupted one.

A checkpoint is a directory `train_state/step-NNNNNN/` holding everything the next step depends on:
- `lora.safetensors`: the trainable LoRA factors (exact fp32 values);
- `optimizer.pt`, `scheduler.pt`: AdamW moments and step counters, the LR scheduler's counter;
- `rng-rank{R}.pt`: every process's Python / NumPy / torch (CPU and CUDA) random state;
- `trainer_state.json`: the step, the data position, and the run fingerprint with the settings
  behind it (checked on resume; see train_config.py).

Atomicity: everything is written into `.tmp-step-NNNNNN/` in the same directory and renamed into
place once complete, so a `step-*` directory always holds a whole checkpoint — a kill at any
moment leaves either the previous checkpoints or the new one, never half of one. The newest
`step-*` is the one to resume; no pointer file has to be kept in sync.

All processes call `save_checkpoint` (each writes its own random state); only the main process
writes the rest. The directory must be on a filesystem every process sees.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io.atomic_dir import fsync_dir
from .train_config import diff_settings, fingerprint

log = logging.getLogger("moesurgeon")

STATE_DIR = "train_state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(ValueError):
    """A checkpoint cannot be resumed as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------- random state
def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def _as_python_state(state) -> tuple:
    version, internal, gauss = state
    return int(version), tuple(int(x) for x in internal), gauss


# ---------------------------------------------------------------------------- saving
def _save_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def step_dirs(state_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in state_dir, oldest first."""
    if not state_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in state_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def save_checkpoint(state_dir: Path, step: int, *, lora: dict[str, torch.Tensor], optimizer, scheduler,
                    data_position: dict, settings: dict, accelerator, keep_last: int) -> Path:
    """Write checkpoint `step` atomically (collective: every process must call it)."""
    final = state_dir / f"step-{step:06d}"
    tmp = state_dir / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_torch(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
        _save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        meta = {"step": step, "data_position": data_position, "world_size": accelerator.num_processes,
                "fingerprint": fingerprint(settings), "settings": settings}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        fsync_dir(tmp)
        if final.exists():  # same step written by an earlier, interrupted attempt: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(state_dir)
        for _, old in step_dirs(state_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------- resuming
def find_resume_dir(resume, run_dir: Path) -> Path | None:
    """Checkpoint to resume from: resume = false | true | auto | <checkpoint, train_state or run dir>."""
    if resume in (None, False) or str(resume).lower() in ("false", "none", "null", ""):
        return None
    if resume is True or str(resume).lower() in ("true", "auto"):
        found = step_dirs(run_dir / STATE_DIR)
        if found:
            return found[-1][1]
        if str(resume).lower() == "auto":
            return None
        raise ResumeError(
            f"resume=true but {run_dir / STATE_DIR} holds no checkpoint: resume continues the run in the same "
            "run directory (pass hydra.run.dir=<that run's dir>), or pass resume=<path to its train_state>; "
            "use resume=auto to start fresh when there is nothing to resume"
        )
    path = Path(str(resume)).expanduser()
    for candidate in (path, path / STATE_DIR):
        if (candidate / "trainer_state.json").is_file():
            return candidate
        found = step_dirs(candidate)
        if found:
            return found[-1][1]
    raise ResumeError(
        f"resume={str(resume)!r} holds no router-LoRA checkpoint: expected a run directory with "
        f"{STATE_DIR}/step-*/, a {STATE_DIR} directory, or one step-* directory with trainer_state.json"
    )


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ResumeError(f"checkpoint {ckpt} has no readable trainer_state.json ({err}); it is not a router-LoRA "
                          "checkpoint or it was damaged; resume from another step-* directory") from err


def check_compatible(ckpt: Path, settings: dict, world_size: int) -> dict:
    """Refuse to resume a checkpoint written under other training settings; return its metadata."""
    meta = read_meta(ckpt)
    if meta.get("fingerprint") != fingerprint(settings):
        diffs = diff_settings(meta.get("settings", {}), settings)
        raise ResumeError(
            f"cannot resume from {ckpt}: it was written with a different training configuration "
            f"(fingerprint {meta.get('fingerprint')} vs {fingerprint(settings)}); differences: "
            f"{'; '.join(diffs[:8]) or 'unknown'}. Resume with the original settings, or start a new run "
            "(resume=false, or another run directory)"
        )
    if int(meta.get("world_size", 1)) != world_size:
        raise ResumeError(f"checkpoint {ckpt} was written by {meta.get('world_size')} processes, this run has "
                          f"{world_size}: relaunch with the same number of processes")
    return meta


def load_checkpoint(ckpt: Path, *, lora_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    rank: int) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG in place; return the metadata."""
    meta = read_meta(ckpt)
    saved = load_file(str(ckpt / "lora.safetensors"))
    if set(saved) != set(lora_params):
        missing, extra = sorted(set(lora_params) - set(saved)), sorted(set(saved) - set(lora_params))
        raise ResumeError(f"checkpoint {ckpt} holds other LoRA tensors than this model: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}; it belongs to another model or LoRA setup")
    with torch.no_grad():
        for name, param in lora_params.items():
            param.copy_(saved[name].to(param.device))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = ckpt / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        raise ResumeError(f"checkpoint {ckpt} has no random state for process {rank} ({rng_file.name})")
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return meta
