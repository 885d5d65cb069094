"""Is this step checkpoint intact? Read every file of a `step-NNNNNN/` directory and check it.

Disks fill up, copies get cut short, files get swapped between runs. Every file a resume reads is
therefore read into memory and checked before anything is restored: present and non-empty,
parseable, of the expected kind, its step matching its directory, and (`check_fits`) its tensor
shapes matching the model being resumed. Torch files are only ever loaded with weights_only=True:
a damaged or foreign checkpoint must never get to run code.

Each problem raises `DamagedCheckpointError` naming the one file and what is wrong with it, in
words safe to show (`failure_reason` keeps torch's diagnosis but never its advice to load with
weights_only=False). checkpointing.py, which writes these directories and resumes from them,
decides what a damaged step means: fall back to an older one, or give up with ResumeError.

The layout of a step directory (its file names, the `step-*` pattern) is defined here, because
checking a checkpoint is where every part of it has to be known; checkpointing.py imports it.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

STEP_DIR = re.compile(r"^step-(\d+)$")
META, LORA, OPTIMIZER, SCHEDULER = "trainer_state.json", "lora.safetensors", "optimizer.pt", "scheduler.pt"


def rng_file_name(rank: int) -> str:
    return f"rng-rank{rank}.pt"


# ---------------------------------------------------------------------------- errors
class ResumeError(ValueError):
    """A checkpoint cannot be resumed as asked; the message says why and what to do."""


class DamagedCheckpointError(ResumeError):
    """One file of one checkpoint is missing, unreadable or from elsewhere: an older step may still do."""

    def __init__(self, file: Path, problem: str):
        self.file, self.problem = file, problem
        super().__init__(f"{file}: {problem}")


# ---------------------------------------------------------------------------- reading, checked
def failure_reason(err: BaseException) -> str:
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
                                           f"by router-LoRA training ({failure_reason(err)})") from None
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
        raise DamagedCheckpointError(path, "is not readable JSON: truncated or overwritten "
                                           f"({failure_reason(err)})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(path, f"holds a JSON {type(meta).__name__}, expected an object")
    for key, ok, expected in _META_FIELDS:
        if not ok(meta.get(key)):
            raise DamagedCheckpointError(path, f"has {key}={meta.get(key)!r}, expected {expected}: it was not "
                                               "written by router-LoRA training, or was edited")
    named = STEP_DIR.match(ckpt.name)
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
                                           f"({failure_reason(err)})") from None
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


def check_fits(ckpt: Path, state: dict, lora_params: dict[str, torch.nn.Parameter], optimizer) -> None:
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
                                                    "LoRA setup (another router_lora.lora.rank or model)")
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
