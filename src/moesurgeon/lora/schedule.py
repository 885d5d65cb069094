"""Learning-rate schedules: linear warmup, then cosine or linear decay (or constant) to a floor.

A plain function of the step, wrapped in `LambdaLR`, so the scheduler's state is just its step
counter: saving and restoring it on resume reproduces the uninterrupted curve exactly.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps  # never 0: the first step already moves the weights
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"router_lora.train.schedule={schedule!r}: expected one of {list(SCHEDULES)}")
    return min_ratio + (1.0 - min_ratio) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    if schedule not in SCHEDULES:
        raise ValueError(f"router_lora.train.schedule={schedule!r}: expected one of {list(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule, min_ratio)
    )
