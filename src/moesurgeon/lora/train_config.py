"""Typed, validated training settings (`router_lora.train`) and the run fingerprint.

Validation runs before the model is loaded, so a zero learning rate or a negative step count
stops in milliseconds with the offending key named.

The fingerprint is the subset of the whole config that decides the trained weights (model, data,
domain, LoRA shape, optimiser, schedule, precision, seed, number of processes), hashed. A
checkpoint stores it; resuming under a different fingerprint would silently mix two experiments,
so it is refused with the keys that differ. Logging and checkpoint cadence are left out: changing
them does not change the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import ClassVar

from .schedule import SCHEDULES

log = logging.getLogger("moesurgeon")

PRECISIONS = ("fp32", "bf16")


class TrainConfigError(ValueError):
    """A training setting is invalid; the message names the key, the value and a valid example."""


@dataclass
class TrainConfig:
    """Optimisation settings of router LoRA: `router_lora.train.*` (the experiment's defaults are these).
    Every key but save_every, keep_last and log_every decides the trained weights (the run's fingerprint:
    resuming with a different value is refused)."""

    steps: int = 80                 # optimizer steps
    lr: float = 1e-3                # peak learning rate (AdamW)
    warmup_steps: int = 8           # linear warmup
    schedule: str = "cosine"        # cosine | linear | constant
    min_lr_ratio: float = 0.0       # floor of the decay, as a fraction of lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 8             # blocks per micro-batch, per process
    grad_accum: int = 1             # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # gradient clipping; null: off
    aux_coef: float = 0.01          # load-balancing loss weight: total = lm + aux_coef * aux
    precision: str = "fp32"         # fp32 | bf16 (autocast; LoRA weights and AdamW state stay fp32)
    gradient_checkpointing: bool = False  # recompute activations in backward (memory for time)
    seed: int = 0                   # data order (the experiment config sets it to the run's `seed`)
    save_every: int = 20            # checkpoint every N steps (0: only at the end); always at the last step
    keep_last: int = 2              # checkpoints kept in <run dir>/train_state
    log_every: int = 5              # progress bar / TensorBoard (<run dir>/tb) cadence, in steps
    # not training-relevant: excluded from the fingerprint
    NON_RESULT: ClassVar[tuple[str, ...]] = ("save_every", "keep_last", "log_every")

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        _positive_int("router_lora.train.steps", self.steps, "router_lora.train.steps=100")
        _positive_int("router_lora.train.batch_size", self.batch_size, "router_lora.train.batch_size=8")
        _positive_int("router_lora.train.grad_accum", self.grad_accum, "router_lora.train.grad_accum=1")
        _positive_int("router_lora.train.log_every", self.log_every, "router_lora.train.log_every=5")
        _positive_int("router_lora.train.keep_last", self.keep_last, "router_lora.train.keep_last=2")
        for key, value in (("router_lora.train.warmup_steps", self.warmup_steps),
                           ("router_lora.train.save_every", self.save_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TrainConfigError(f"{key}={value!r}: expected an integer >= 0")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise TrainConfigError(f"router_lora.train.lr={self.lr!r}: the learning rate must be a positive number, "
                                   "e.g. router_lora.train.lr=1e-4")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"router_lora.train.schedule={self.schedule!r}: expected one of {list(SCHEDULES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainConfigError(f"router_lora.train.min_lr_ratio={self.min_lr_ratio!r}: expected a number in [0, 1]")
        if self.weight_decay < 0:
            raise TrainConfigError(f"router_lora.train.weight_decay={self.weight_decay!r}: expected a number >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainConfigError(f"router_lora.train.betas={list(self.betas)}: expected two numbers in [0, 1), "
                                   "e.g. [0.9, 0.999]")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise TrainConfigError(f"router_lora.train.max_grad_norm={self.max_grad_norm!r}: expected a positive "
                                   "number, or null for no clipping")
        if self.aux_coef < 0:
            raise TrainConfigError(f"router_lora.train.aux_coef={self.aux_coef!r}: expected a number >= 0 (0 turns "
                                   "the load-balancing loss off)")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"router_lora.train.precision={self.precision!r}: expected one of {list(PRECISIONS)}")
        if self.warmup_steps > self.steps:
            # not an error, so that a quick `router_lora.train.steps=3` works with the default warmup
            log.warning("router_lora.train.warmup_steps=%d exceeds router_lora.train.steps=%d: the learning rate "
                        "never reaches its peak (router_lora.train.lr)", self.warmup_steps, self.steps)

    def result_settings(self) -> dict:
        """The settings that decide the trained weights."""
        out = {k: v for k, v in asdict(self).items() if k not in self.NON_RESULT}
        out["betas"] = list(self.betas)
        return out


def _positive_int(key: str, value, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TrainConfigError(f"{key}={value!r}: expected a positive integer, e.g. {example}")


def fingerprint(settings: dict) -> str:
    """Stable hash of a JSON-able dict of training-relevant settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two nested setting dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
