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

Trust on resume: disks fill up, copies get cut short, files get swapped between runs. Every file a
resume reads is therefore read into memory and checked (present, parseable, shapes matching the
model) before anything is restored; torch files are only ever loaded with weights_only=True. A
damaged step falls back to the newest older intact step with a WARNING naming both; if none is
intact, ResumeError lists each damaged file and says how to go on.

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
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes

from ..io.atomic_dir import fsync_dir
from .train_config import diff_settings, fingerprint

log = logging.getLogger("moesurgeon")

STATE_DIR = "train_state"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TRASH = ".trash-"
META, LORA, OPTIMIZER, SCHEDULER = "trainer_state.json", "lora.safetensors", "optimizer.pt", "scheduler.pt"


class ResumeError(ValueError):
    """A checkpoint cannot be resumed as asked; the message says why and what to do."""


class DamagedCheckpointError(ResumeError):
    """One file of one checkpoint is missing, unreadable or from elsewhere: an older step may still do."""

    def __init__(self, file: Path, problem: str):
        self.file, self.problem = file, problem
        super().__init__(f"{file}: {problem}")


def rng_file_name(rank: int) -> str:
    return f"rng-rank{rank}.pt"


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
    found = [(int(m.group(1)), p) for p in state_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
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


# ---------------------------------------------------------------------------- reading, checked
def _reason(err: BaseException) -> str:
    """A short description of why a file did not load, safe to show."""
    text = str(err).strip()
    if "weights_only" in text:
        # torch's UnpicklingError advises reloading with weights_only=False, i.e. running whatever
        # code a file that just failed the check contains: keep its diagnosis, never that advice
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        text = found.group(1) if found else ""
        if "weights_only" in text or not text:
            text = "it holds objects other than tensors and plain values"
    text = text.splitlines()[0].split(". ")[0] if text else "the file ends early"
    return f"{type(err).__name__}: {text[:160]}"


def _existing(ckpt: Path, name: str) -> Path:
    path = ckpt / name
    if not path.is_file():
        raise DamagedCheckpointError(path, "is missing: the checkpoint is incomplete, or files were deleted or moved")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(path, "is empty (0 bytes): it was cut off while being written or copied")
    return path


def _load_torch(ckpt: Path, name: str, looks_right, expected: str):
    path = _existing(ckpt, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols just before failing on them
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # `from None`: the chained torch error would print the weights_only=False advice after all
        raise DamagedCheckpointError(path, "is not a readable torch file: truncated, overwritten or not written "
                                           f"by router-LoRA training ({_reason(err)})") from None
    if not looks_right(obj):
        raise DamagedCheckpointError(path, f"loads, but holds a {type(obj).__name__}, expected {expected}")
    return obj


def _is_optimizer_state(o) -> bool:
    return (isinstance(o, dict) and isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in o["param_groups"]))


def _is_position(v) -> bool:
    return isinstance(v, dict) and all(isinstance(v.get(k), int) for k in ("epoch", "offset", "num_blocks"))


_META_FIELDS = (("step", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
                ("world_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
                ("data_position", _is_position, "integers epoch, offset and num_blocks"),
                ("fingerprint", lambda v: isinstance(v, str), "a string"))


def read_meta(ckpt: Path) -> dict:
    path = _existing(ckpt, META)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: broken JSON, and bytes that are not UTF-8
        raise DamagedCheckpointError(path, f"is not readable JSON: truncated or overwritten ({_reason(err)})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(path, f"holds a JSON {type(meta).__name__}, expected an object")
    for key, ok, expected in _META_FIELDS:
        if not ok(meta.get(key)):
            raise DamagedCheckpointError(path, f"has {key}={meta.get(key)!r}, expected {expected}: it was not "
                                               "written by router-LoRA training, or was edited")
    named = _STEP_DIR.match(ckpt.name)
    if named and int(named.group(1)) != meta["step"]:
        raise DamagedCheckpointError(path, f"says step {meta['step']}, but its directory is {ckpt.name}: the file "
                                           "belongs to another step or run")
    return meta


def read_checkpoint(ckpt: Path, rank: int | None = None) -> dict:
    """Read and check every file of `ckpt` into memory; restore nothing. Raises DamagedCheckpointError.

    Every rank's random state is checked, not only `rank`'s, so that all processes reach the same
    verdict and resume the same step; the returned `rng` is `rank`'s (absent when rank is None).
    """
    meta = read_meta(ckpt)
    path = _existing(ckpt, LORA)
    try:
        lora = load_file(str(path))
    except Exception as err:
        raise DamagedCheckpointError(path, "is not a readable safetensors file: truncated or overwritten "
                                           f"({_reason(err)})") from None
    state = {"meta": meta, "lora": lora,
             "optimizer": _load_torch(ckpt, OPTIMIZER, _is_optimizer_state, "an optimizer state (state, param_groups)"),
             "scheduler": _load_torch(ckpt, SCHEDULER, lambda o: isinstance(o, dict), "a scheduler state (a dict)")}
    for r in range(meta["world_size"]):
        rng = _load_torch(ckpt, rng_file_name(r), lambda o: isinstance(o, dict) and {"python", "numpy"} <= set(o)
                          and isinstance(o.get("torch"), torch.Tensor), "a random state (python, numpy, torch)")
        if r == rank:
            state["rng"] = rng
    if rank is not None and "rng" not in state:
        raise DamagedCheckpointError(ckpt / rng_file_name(rank), f"does not exist: the checkpoint was written "
                                                                 f"by {meta['world_size']} processes, this is "
                                                                 f"process {rank}; relaunch with that many")
    return state


def _check_fits(ckpt: Path, state: dict, lora_params: dict[str, torch.nn.Parameter], optimizer) -> None:
    """Refuse tensors that do not fit this model: typically a file copied over from another run."""
    saved, lora_file, opt_file = state["lora"], ckpt / LORA, ckpt / OPTIMIZER
    missing, extra = sorted(set(lora_params) - set(saved)), sorted(set(saved) - set(lora_params))
    if missing or extra:
        raise DamagedCheckpointError(lora_file, f"holds other LoRA tensors than this model: {len(missing)} missing "
                                                f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}; it belongs to "
                                                "another model or LoRA setup")
    for name, param in lora_params.items():
        if saved[name].shape != param.shape:
            raise DamagedCheckpointError(lora_file, f"tensor {name!r} has shape {list(saved[name].shape)}, this model "
                                                    f"expects {list(param.shape)}: the file comes from another run or "
                                                    "LoRA setup (another lora.rank or model)")
    groups, moments = state["optimizer"]["param_groups"], state["optimizer"]["state"]
    found, expected = [len(g["params"]) for g in groups], [len(g["params"]) for g in optimizer.param_groups]
    if found != expected:
        raise DamagedCheckpointError(opt_file, f"has parameter groups of sizes {found}, this model's optimizer has "
                                               f"{expected}: the file comes from another run or LoRA setup")
    names = {id(p): n for n, p in lora_params.items()}
    ours = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, param in zip([i for g in groups for i in g["params"]], ours):
        per_param = moments.get(idx)  # anything but a dict fails optimizer.load_state_dict, named there
        for key, value in per_param.items() if isinstance(per_param, dict) else ():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise DamagedCheckpointError(opt_file, f"{key} of tensor {names.get(id(param), idx)!r} has shape "
                                                       f"{list(value.shape)}, this model expects {list(param.shape)}: "
                                                       "the file comes from another run or LoRA setup")


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
        raise DamagedCheckpointError(ckpt / name, f"loads, but cannot be restored ({_reason(err)})") from None


def load_checkpoint(ckpt: Path, *, lora_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    rank: int) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG in place from `ckpt` exactly
    (no fallback); return the metadata. Nothing is touched when a file is damaged or does not fit."""
    state = read_checkpoint(ckpt, rank)
    _check_fits(ckpt, state, lora_params, optimizer)
    _restore(ckpt, state, lora_params, optimizer, scheduler, rank)
    return state["meta"]


# ---------------------------------------------------------------------------- choosing, with fallback
def _with_older(ckpt: Path) -> list[Path]:
    """`ckpt`, then the older step-* directories beside it, newest first."""
    named = _STEP_DIR.match(ckpt.name)
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
        f"To go on, delete {where} and train from the start, or start without resume (resume=false) in another "
        "run directory; to keep the damaged files for inspection, move them out of the way first"
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
            f"resume=true but {run_dir / STATE_DIR} holds no checkpoint: resume continues the run in the same "
            "run directory (pass hydra.run.dir=<that run's dir>), or pass resume=<path to its train_state>; "
            "use resume=auto to start fresh when there is nothing to resume"
        )
    path = Path(str(resume)).expanduser()
    for candidate in (path, path / STATE_DIR):
        if (candidate.is_dir() and _STEP_DIR.match(candidate.name)) or (candidate / META).is_file():
            parent = candidate.parent if _STEP_DIR.match(candidate.name) else candidate
            return newest_intact(parent, _with_older(candidate))
        found = step_dirs(candidate)
        if found:
            return newest_intact(candidate, [p for _, p in reversed(found)])
    raise ResumeError(
        f"resume={str(resume)!r} holds no router-LoRA checkpoint: expected a run directory with "
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
            "(resume=false, or another run directory)"
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

    where = ckpt.parent if _STEP_DIR.match(ckpt.name) else ckpt
    return _first_usable(_with_older(ckpt), use, where)
