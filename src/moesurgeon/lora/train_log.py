"""What a training run reports while it runs: a console progress bar and TensorBoard scalars.

Only the main process reports (the others hold the same numbers after the reduction). With the
progress bar off (progress=false, or no TTY in CI) the same figures go to the log every
`log_every` steps, so a batch job still shows its loss curve.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("moesurgeon")


class TrainLog:
    def __init__(self, *, enabled: bool, tb_dir: Path | None, total_steps: int, start_step: int,
                 progress: bool, layer_names: list[str]):
        self.enabled = enabled
        self.progress = progress
        self.layer_names = layer_names
        self.total = total_steps
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint, so a resumed
            # run's curves do not show those steps twice
            self.writer = SummaryWriter(log_dir=str(tb_dir), purge_step=start_step or None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="router LoRA", unit="step",
                        disable=not progress, dynamic_ncols=True)

    def step(self, step: int, scalars: dict[str, float], entropy_bits: list[float] | None = None) -> None:
        """Record the figures of optimizer step `step` (1-based)."""
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            for name, h in zip(self.layer_names, entropy_bits or []):
                self.writer.add_scalar(f"routing_entropy_bits/{name}", h, step)
            if entropy_bits:
                self.writer.add_scalar("routing_entropy_bits/mean", sum(entropy_bits) / len(entropy_bits), step)
        if self.progress and self.bar is not None:
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", aux=f"{scalars['aux_loss']:.3f}",
                                 lr=f"{scalars['lr']:.2e}", tok_s=f"{scalars['tokens_per_s']:.0f}")
        else:
            log.info("step %d/%d loss %.4f (lm %.4f, aux %.4f) lr %.2e %.0f tok/s", step, self.total,
                     scalars["loss"], scalars["lm_loss"], scalars["aux_loss"], scalars["lr"], scalars["tokens_per_s"])

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
