"""Hooks owned by a context manager: registered on enter, removed in `finally`.

Every module hook moesurgeon installs goes through `forward_hooks`, so no handle outlives the
`with` block, also when the body raises. `count_hooks` lets tests assert that none remain.
Measurements register theirs through `block_runner.run_blocks`, which uses `forward_hooks` and also
hands each hook the batch in flight (its real-token mask).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle


@contextmanager
def forward_hooks(pairs: Iterable[tuple[nn.Module, Callable]]) -> Iterator[list[RemovableHandle]]:
    """Register `module.register_forward_hook(fn)` for each pair; remove them all on exit."""
    handles: list[RemovableHandle] = []
    try:
        for module, fn in pairs:
            handles.append(module.register_forward_hook(fn))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on any submodule of `model`."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
    return total
