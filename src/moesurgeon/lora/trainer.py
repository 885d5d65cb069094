"""The router-LoRA training loop: AdamW, warmup + decay, accumulation, clipping, checkpoints, DDP.

One process or many (`accelerate launch` / `torchrun`): `accelerate.Accelerator` wraps the model
in DistributedDataParallel when there are several processes and is a no-op otherwise. Only the
model goes through `accelerator.prepare`; the optimizer and scheduler stay plain torch objects,
because accelerate's scheduler wrapper steps once per process, which would change the schedule
with the number of processes.

Determinism: the data order is a function of (seed, epoch) (data_stream.py); checkpoints hold
weights, optimizer, scheduler, data position and every process's RNG (checkpointing.py). Given
the same threads and versions, stopping at any checkpoint and resuming gives bit-identical
weights to an uninterrupted run.

The loss of one optimizer step is mean over micro-batches of (lm + aux_coef * aux), each
micro-batch's lm loss a mean over its real tokens; DDP then averages over processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch import ArchAdapter
from ..data import TokenBlocks
from .checkpointing import STATE_DIR, resume_checkpoint, save_checkpoint
from .data_stream import BlockStream
from .losses import lm_loss, load_balancing_loss, routing_entropy_bits
from .schedule import make_scheduler
from .train_config import TrainConfig
from .train_log import TrainLog

log = logging.getLogger("moesurgeon")


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed in total (including those before a resume)
    start_step: int  # 0, or the checkpoint step this invocation resumed from
    seconds: float  # wall time of this invocation's loop
    tokens: int  # real input tokens processed by this invocation, all processes
    history: list[dict] = field(default_factory=list)  # the logged steps

    def metrics(self) -> dict[str, float]:
        out = {"train/steps": self.steps, "train/start_step": self.start_step, "train/seconds": self.seconds,
               "train/tokens": self.tokens, "train/tokens_per_s": self.tokens / max(self.seconds, 1e-9)}
        if self.history:
            for key in ("loss", "lm_loss", "aux_loss"):
                out[f"train/first_{key}"] = self.history[0][key]
                out[f"train/final_{key}"] = self.history[-1][key]
        return out


def make_accelerator(device: str = "cpu"):
    from accelerate import Accelerator

    # cpu=True keeps a CPU run on CPU when a GPU is visible; mixed precision is done with our own
    # autocast (router_lora.train.precision) so that one code path serves one and many processes
    return Accelerator(cpu=str(device).startswith("cpu"), mixed_precision="no")


def _hf_model(peft_model):
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def _checkpointing(hf_model, enable: bool) -> None:
    # transformers 5 renamed gradient_* to activation_checkpointing_* (the old names warn)
    if hasattr(hf_model, "activation_checkpointing_enable"):
        if enable:
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf_model.activation_checkpointing_disable()
    elif enable:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf_model.gradient_checkpointing_disable()


def train_router_lora(
    peft_model,
    blocks: TokenBlocks,
    tcfg: TrainConfig,
    *,
    accelerator,
    top_k: int,
    adapter: ArchAdapter,
    layer_names: list[str],
    run_dir: Path,
    settings: dict,
    resume_from: Path | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the LoRA factors of `peft_model` in place for `tcfg.steps` optimizer steps.

    `settings` (the training-relevant config) is stored in every checkpoint and compared on resume.
    `on_step(step)` runs after each completed step (tests use it to simulate a kill).
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    scheduler = make_scheduler(optimizer, tcfg.steps, tcfg.warmup_steps, tcfg.schedule, tcfg.min_lr_ratio)
    stream = BlockStream(blocks, tcfg.batch_size, seed=tcfg.seed, rank=rank, world=world)
    start = 0
    if resume_from is not None:
        # a damaged resume_from (or one whose files do not fit this model) falls back to an older step
        resume_from, meta = resume_checkpoint(resume_from, settings=settings, world_size=world, lora_params=named,
                                              optimizer=optimizer, scheduler=scheduler, rank=rank)
        stream.load_state_dict(meta["data_position"])
        start = int(meta["step"])
        log.info("resumed from %s at step %d/%d", resume_from, start, tcfg.steps)

    if tcfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (no enable_input_require_grads hack) and with the
        # parametrization PEFT installs on the router weight inside forward
        _checkpointing(_hf_model(peft_model), True)
    model = accelerator.prepare_model(peft_model)
    device = accelerator.device
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if tcfg.precision == "bf16" else nullcontext())
    report = TrainLog(enabled=accelerator.is_main_process, tb_dir=run_dir / "tb", total_steps=tcfg.steps,
                      start_step=start, progress=progress, layer_names=layer_names)
    result = TrainResult(steps=start, start_step=start, seconds=0.0, tokens=0)
    window = torch.zeros(4, dtype=torch.float64)  # lm sum, aux sum, micro-batches, tokens since last log
    t0 = t_log = time.perf_counter()
    model.train()
    try:
        for step in range(start, tcfg.steps):
            for micro in range(tcfg.grad_accum):
                batch = stream.next_batch()
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                last = micro == tcfg.grad_accum - 1
                # no_sync: skip the all-reduce on the micro-batches before the last one
                with nullcontext() if last else accelerator.no_sync(model):
                    with autocast:
                        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
                    lm, _ = lm_loss(out.logits, ids, mask)
                    aux = load_balancing_loss(out.router_logits, top_k, mask, adapter)
                    total = lm + tcfg.aux_coef * aux if tcfg.aux_coef > 0 else lm
                    accelerator.backward(total / tcfg.grad_accum)
                window += torch.tensor([lm.item(), aux.item(), 1.0, float(mask.sum())], dtype=torch.float64)
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
                         if tcfg.max_grad_norm is not None else None)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            result.steps = done
            report.advance()

            if done % tcfg.log_every == 0 or done == tcfg.steps:
                summed = accelerator.reduce(window.to(device), reduction="sum").cpu()  # collective
                now = time.perf_counter()
                n = max(float(summed[2]), 1.0)
                scalars = {"lm_loss": float(summed[0]) / n, "aux_loss": float(summed[1]) / n, "lr": lr,
                           "tokens_per_s": float(summed[3]) / max(now - t_log, 1e-9)}
                scalars["loss"] = scalars["lm_loss"] + tcfg.aux_coef * scalars["aux_loss"]
                if grad_norm is not None:
                    scalars["grad_norm"] = float(grad_norm)
                result.tokens += int(summed[3])
                report.step(done, scalars, routing_entropy_bits(out.router_logits, mask, adapter))
                result.history.append({"step": done, **scalars})
                window.zero_()
                t_log = now
            if (tcfg.save_every and done % tcfg.save_every == 0) or done == tcfg.steps:
                save_checkpoint(run_dir / STATE_DIR, done, lora=named, optimizer=optimizer, scheduler=scheduler,
                                data_position=stream.state_dict(), settings=settings, accelerator=accelerator,
                                keep_last=tcfg.keep_last)
            if on_step is not None:
                on_step(done)
    finally:
        report.close()
        model.eval()
        if tcfg.gradient_checkpointing:
            _checkpointing(_hf_model(peft_model), False)
    result.seconds = time.perf_counter() - t0
    return result
