"""Save and resume router-LoRA training so that a resumed run ends bit-identical to an uninterrupted one.

A checkpoint is a directory `train_state/step-NNNNNN/` holding everything the next step depends on:
- `lora.safetensors`: the trainable LoRA factors (exact fp32 values);
- `optimizer.pt`, `scheduler.pt`: AdamW moments and step counters, the LR scheduler's counter;
- `rng-rank{R}.pt`: every process's Python / NumPy / torch (CPU and CUDA) random state;
- `trainer_state.json`: the step, the data position, and the run fingerprint with the settings
  behind it (checked on resume; see train_config.py).

Atomicity: everything is written into `.tmp-step-NNNNNN/` in the same directory, each file fsynced,
and the directory renamed into place once complete. A `step-*` directory that has to go (an older
one past keep_last, or the same step written by an interrupted attempt) is first renamed to
`.trash-*` and only then deleted, so a kill at any moment leaves whole `step-*` directories or none,
never half of one. The newest `step-*` is the one to resume; no pointer file has to be kept in sync.

Trust on resume: every file a resume reads is first read into memory and checked (present,
parseable, shapes matching the model; torch files only ever loaded with weights_only=True) by
checkpoint_check.py, before anything is restored; this module re-exports its names (ResumeError,
read_checkpoint, ...) for the callers that import them from here. A damaged step falls back to the
newest older intact step with a WARNING naming both; if none is intact, ResumeError lists each
damaged file and says how to go on.

All processes call `save_checkpoint` (each writes its own random state); only the main process
writes the rest. The directory must be on a filesystem every process sees. Every process checks
every rank's random state on resume, so all of them pick the same step.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors_bytes

from ..io.atomic_dir import fsync_dir
from .checkpoint_check import (
    LORA,
    META,
    OPTIMIZER,
    SCHEDULER,
    STEP_DIR,
    DamagedCheckpointError,
    ResumeError,
    check_fits,
    failure_reason,
    read_checkpoint,
    read_meta,
    rng_file_name,
)
from .train_config import diff_settings, fingerprint

log = logging.getLogger("moesurgeon")

STATE_DIR = "train_state"
_TRASH = ".trash-"


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
def _write_durable(path: Path, data: bytes) -> None:
    # fsync every file: renaming the directory into place only publishes what reached the disk, and
    # without it a power cut can leave a whole-looking step-* holding empty files
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_torch(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_durable(path, buffer.getvalue())


def step_dirs(state_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories in state_dir, oldest first (whole as written; resume still checks them)."""
    if not state_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in state_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def _set_aside(path: Path) -> Path:
    # a rename is atomic and rmtree is not: a kill during rmtree would leave half a step-* behind
    trash = path.parent / f"{_TRASH}{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    return trash


def save_checkpoint(state_dir: Path, step: int, *, lora: dict[str, torch.Tensor], optimizer, scheduler,
                    data_position: dict, settings: dict, accelerator, keep_last: int) -> Path:
    """Write checkpoint `step` atomically (collective: every process must call it)."""
    final = state_dir / f"step-{step:06d}"
    tmp = state_dir / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        for leftover in state_dir.glob(f"{_TRASH}*") if state_dir.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)  # left by a run killed while deleting
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_torch(rng_state(), tmp / rng_file_name(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tensors = {k: v.detach().cpu().contiguous() for k, v in lora.items()}
        _write_durable(tmp / LORA, save_safetensors_bytes(tensors))
        _save_torch(optimizer.state_dict(), tmp / OPTIMIZER)
        _save_torch(scheduler.state_dict(), tmp / SCHEDULER)
        meta = {"step": step, "data_position": data_position, "world_size": accelerator.num_processes,
                "fingerprint": fingerprint(settings), "settings": settings}
        _write_durable(tmp / META, (json.dumps(meta, indent=1, default=str) + "\n").encode())
        fsync_dir(tmp)
        # same step written by an earlier, interrupted attempt (or a damaged one resumed past): replace
        # it; between the two renames the step is absent, never half there
        old = _set_aside(final) if final.exists() else None
        os.rename(tmp, final)
        fsync_dir(state_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for _, stale in step_dirs(state_dir)[:-keep_last]:
            shutil.rmtree(_set_aside(stale), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------- restoring
def _restore(ckpt: Path, state: dict, lora_params, optimizer, scheduler, rank: int) -> None:
    # all was checked before; should a piece still fail, a fallback step restores every piece again
    name = LORA
    try:
        with torch.no_grad():
            for key, param in lora_params.items():
                param.copy_(state["lora"][key].to(param.device))
        name = OPTIMIZER
        optimizer.load_state_dict(state["optimizer"])
        name = SCHEDULER
        scheduler.load_state_dict(state["scheduler"])
        name = rng_file_name(rank)
        set_rng_state(state["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise DamagedCheckpointError(ckpt / name, f"loads, but cannot be restored ({failure_reason(err)})") from None


def load_checkpoint(ckpt: Path, *, lora_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    rank: int) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG in place from `ckpt` exactly
    (no fallback); return the metadata. Nothing is touched when a file is damaged or does not fit."""
    state = read_checkpoint(ckpt, rank)
    check_fits(ckpt, state, lora_params, optimizer)
    _restore(ckpt, state, lora_params, optimizer, scheduler, rank)
    return state["meta"]


# ---------------------------------------------------------------------------- choosing, with fallback
def _with_older(ckpt: Path) -> list[Path]:
    """`ckpt`, then the older step-* directories beside it, newest first."""
    named = STEP_DIR.match(ckpt.name)
    if not named:
        return [ckpt]
    return [ckpt, *(p for s, p in reversed(step_dirs(ckpt.parent)) if s < int(named.group(1)))]


def _first_usable(candidates: list[Path], use, where: Path) -> tuple[Path, dict]:
    """The first candidate `use` accepts (it returns the metadata), warning about each damaged one."""
    damaged: list[DamagedCheckpointError] = []
    for ckpt in candidates:
        try:
            meta = use(ckpt)
        except DamagedCheckpointError as err:
            damaged.append(err)
            continue
        for err in damaged:
            log.warning("checkpoint %s is damaged and skipped: %s; falling back to the previous intact step %d (%s)",
                        err.file.parent.name, err, int(meta["step"]), ckpt)
        return ckpt, meta
    listing = "\n".join(f"  - {err}" for err in damaged)
    raise ResumeError(
        f"cannot resume from {where}: none of its {len(damaged)} checkpoint(s) is intact:\n{listing}\n"
        f"To go on, delete {where} and train from the start, or start without resume (router_lora.resume=false) "
        "in another run directory; to keep the damaged files for inspection, move them out of the way first"
    )


def find_resume_dir(resume, run_dir: Path) -> Path | None:
    """Checkpoint to resume from: resume = false | true | auto | <checkpoint, train_state or run dir>.

    The newest intact step is returned: damaged newer ones are skipped with a WARNING (the model
    is not loaded yet, so shapes are checked later, by resume_checkpoint).
    """
    if resume in (None, False) or str(resume).lower() in ("false", "none", "null", ""):
        return None

    def newest_intact(state_dir: Path, candidates: list[Path]) -> Path:
        return _first_usable(candidates, lambda c: read_checkpoint(c)["meta"], state_dir)[0]

    if resume is True or str(resume).lower() in ("true", "auto"):
        found = step_dirs(run_dir / STATE_DIR)
        if found:  # even with auto, damaged steps are an error: starting over would hide lost training
            return newest_intact(run_dir / STATE_DIR, [p for _, p in reversed(found)])
        if str(resume).lower() == "auto":
            return None
        raise ResumeError(
            f"router_lora.resume=true but {run_dir / STATE_DIR} holds no checkpoint: resume continues the run in "
            "the same run directory (pass hydra.run.dir=<that run's dir>), or pass router_lora.resume=<path to its "
            "train_state>; use router_lora.resume=auto to start fresh when there is nothing to resume"
        )
    path = Path(str(resume)).expanduser()
    for candidate in (path, path / STATE_DIR):
        if (candidate.is_dir() and STEP_DIR.match(candidate.name)) or (candidate / META).is_file():
            parent = candidate.parent if STEP_DIR.match(candidate.name) else candidate
            return newest_intact(parent, _with_older(candidate))
        found = step_dirs(candidate)
        if found:
            return newest_intact(candidate, [p for _, p in reversed(found)])
    raise ResumeError(
        f"router_lora.resume={str(resume)!r} holds no router-LoRA checkpoint: expected a run directory with "
        f"{STATE_DIR}/step-*/, a {STATE_DIR} directory, or one step-* directory with {META}"
    )


def check_compatible(ckpt: Path, settings: dict, world_size: int) -> dict:
    """Refuse to resume a checkpoint written under other training settings; return its metadata."""
    meta = read_meta(ckpt)
    if meta.get("fingerprint") != fingerprint(settings):
        diffs = diff_settings(meta.get("settings", {}), settings)
        raise ResumeError(
            f"cannot resume from {ckpt}: it was written with a different training configuration "
            f"(fingerprint {meta.get('fingerprint')} vs {fingerprint(settings)}); differences: "
            f"{'; '.join(diffs[:8]) or 'unknown'}. Resume with the original settings, or start a new run "
            "(router_lora.resume=false, or another run directory)"
        )
    if int(meta.get("world_size", 1)) != world_size:
        raise ResumeError(f"checkpoint {ckpt} was written by {meta.get('world_size')} processes, this run has "
                          f"{world_size}: relaunch with the same number of processes")
    return meta


def resume_checkpoint(ckpt: Path, *, settings: dict, world_size: int, lora_params: dict[str, torch.nn.Parameter],
                      optimizer, scheduler, rank: int) -> tuple[Path, dict]:
    """Restore from `ckpt`, or else from the newest older intact step beside it; return (step dir, metadata).

    Damage (a missing, unreadable or foreign file) falls back; other settings or another number of
    processes do not: those are the caller's mistake, not the disk's, and raise ResumeError.
    """
    def use(candidate: Path) -> dict:
        check_compatible(candidate, settings, world_size)
        return load_checkpoint(candidate, lora_params=lora_params, optimizer=optimizer, scheduler=scheduler,
                               rank=rank)

    where = ckpt.parent if STEP_DIR.match(ckpt.name) else ckpt
    return _first_usable(_with_older(ckpt), use, where)
