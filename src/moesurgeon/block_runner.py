"""The one loop that runs token blocks through a model: every measurement in moesurgeon goes through it.

    done = run_blocks(model, blocks, batch_size=8, hooks=[(layer.router, fn)], by_label=True, scope=scope)
    done.tokens_per_s

`run_blocks` is moesurgeon's `run_with_hooks`: it cuts `TokenBlocks` into batches (one label group at
a time with `by_label=True`, each group inside `scope(label)` when given), moves ids, mask and labels
to the model's input device, runs the forward pass under `torch.no_grad()` with the hooks registered
(through `hooks.forward_hooks`, so they are removed in `finally`), shows a tokens/s progress bar,
and returns the forward throughput. Only the forward pass is timed, CUDA-synchronised.

A hook is `fn(module, inputs, output, batch)`: the usual forward-hook arguments plus the `Batch` being
run. Routers see a flat [B*S, H] batch and no attention mask, so a router hook keeps the real tokens
with `batch.real(device)`; `BatchSlot` is the one place that hands the batch in flight to hooks.
`on_output(batch, output)` receives the model's output after each forward (perplexity reads the
logits there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import TokenBlocks
from .distributed import Shard, check_batches
from .hooks import forward_hooks
from .models import input_device

__all__ = ["Batch", "BatchHook", "BatchSlot", "Scope", "Throughput", "count_batches", "label_groups", "run_blocks"]

Scope = Callable[[str], AbstractContextManager]


@dataclass
class Batch:
    """One batch of blocks as the model runs it (tensors on the model's input device)."""

    input_ids: torch.Tensor | None  # [B, S]; None only when a RouterUsageProbe user gives no ids
    attention_mask: torch.Tensor  # [B, S], 0 on padding
    label_ids: torch.Tensor  # [B] long, index into the blocks' label_names, -1 = unlabelled
    label: str | None = None  # the label group being run (run_blocks(by_label=True)), else None
    _real: torch.Tensor = field(init=False, repr=False)
    _groups: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # flattened once per batch: every hook of the forward reads the same mask and label groups
        self._real = self.attention_mask.reshape(-1).bool()
        # unlabelled rows (-1) count in the first group, as in a run over unlabelled data
        self._groups = self.label_ids.clamp_min(0).repeat_interleave(self.attention_mask.shape[-1])

    def real(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[B*S] bool, True on real tokens, in the flat order routers see the batch; on `device` if given
        (a model spread over several devices runs each router on its own)."""
        return self._real if device is None else self._real.to(device)

    def flat(self, tokens: int, device: torch.device | str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(real-token mask [T], label-group index [T]) on `device` for a hook that saw `tokens` flat tokens;
        refuses a batch whose mask does not cover those tokens (`where`: the module, for the message)."""
        real = self.real(device)
        if real.numel() != tokens:
            raise ValueError(f"the batch's attention mask of {real.numel()} tokens does not match the {tokens} tokens "
                             f"{where} saw; pass the mask of the batch being run")
        return real, self._groups.to(device)


BatchHook = Callable[[nn.Module, tuple, Any, Batch], Any]


class BatchSlot:
    """Holds the batch in flight so that forward hooks can read it (which tokens are real, their labels)."""

    def __init__(self) -> None:
        self.batch: Batch | None = None

    def bind(self, fn: BatchHook) -> Callable[[nn.Module, tuple, Any], Any]:
        """A plain forward hook that calls `fn` with the batch in flight (None outside `holding`)."""

        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            return fn(module, inputs, output, self.batch)

        return hook

    @contextmanager
    def holding(self, batch: Batch | None) -> Iterator[None]:
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None


@dataclass
class Throughput:
    """Real (non-padding) tokens run and the seconds their forward passes took."""

    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def label_groups(blocks: TokenBlocks) -> dict[str, TokenBlocks]:
    """{label: its blocks} in label order, empty groups left out; unlabelled data is one group 'all'.

    With labels, unlabelled blocks (label -1) belong to no group."""
    if not blocks.label_names:
        return {"all": blocks}
    groups = {name: blocks.select(name) for name in blocks.label_names}
    return {name: b for name, b in groups.items() if len(b)}


def count_batches(blocks: TokenBlocks, batch_size: int, by_label: bool = False) -> int:
    """How many batches `run_blocks` runs for these arguments."""
    groups = list(label_groups(blocks).values()) if by_label else [blocks]
    return sum(-(-len(g) // batch_size) for g in groups)


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    blocks: TokenBlocks,
    batch_size: int = 8,
    *,
    hooks: Iterable[tuple[nn.Module, BatchHook]] = (),
    by_label: bool = False,
    scope: Scope | None = None,
    on_output: Callable[[Batch, Any], None] | None = None,
    progress: bool = False,
    desc: str = "run",
    shard: Shard | None = None,
) -> Throughput:
    """Run `blocks` through `model` in batches of `batch_size`; see the module docstring.

    `by_label=True` batches each label group separately, in label order (two runs of the same blocks
    line up token for token); `scope(label)` then wraps each group's forwards (e.g.
    `RoleContext.data_label`, so label-triggered roles apply).
    `shard` (torchrun, moesurgeon/distributed.py): run only the batches i with i mod world == rank, counting
    batches across label groups, so each batch is exactly the one a single process would run."""
    if scope is not None and not by_label:
        raise ValueError("run_blocks(scope=...) enters scope(label) for each label group: pass by_label=True too")
    device = input_device(model)
    groups: dict[str | None, TokenBlocks] = dict(label_groups(blocks)) if by_label else {None: blocks}
    slot = BatchSlot()
    done = Throughput()
    total = sum(group.num_tokens() for group in groups.values())
    if shard is not None and shard.active:
        # every process must get a batch: one without would wait forever in the sums' all-reduce
        check_batches(shard, count_batches(blocks, batch_size, by_label))
        total = -(-total // shard.world)  # about this process's share, for the bar only
    index = -1
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress, leave=False)
    try:
        with forward_hooks([(module, slot.bind(fn)) for module, fn in hooks]):
            for label, group in groups.items():
                with scope(label) if scope is not None else nullcontext():
                    for raw in group.batches(batch_size):
                        index += 1
                        if shard is not None and not shard.owns(index):
                            continue
                        batch = Batch(raw["input_ids"].to(device), raw["attention_mask"].to(device),
                                      raw["label_ids"].to(device), label)
                        tokens = int(raw["attention_mask"].sum())  # from the CPU copy: no device sync
                        t0 = time.perf_counter()
                        with slot.holding(batch):
                            output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        done.seconds += time.perf_counter() - t0
                        done.tokens += tokens
                        bar.update(tokens)
                        if on_output is not None:
                            on_output(batch, output)
                        del output  # free the logits before the next forward allocates its own
    finally:
        bar.close()
    return done
