"""Read the chosen shards once and turn every chunk into statistics, per tensor and per expert slice.

`scan_shards` plans the read units of each tensor (whole, expert slices of a fused tensor, row
blocks of a large one), reads them with `ChunkReader` (one shard open at a time, the next chunk
read while this one is computed) and folds the chunk statistics back together:

- `tensors[name]`: the tensor's numel, sum of squares, max |w|, near-zero and non-finite counts,
  its top singular value when it was read whole (a matrix), and `error` when part of it could not
  be read;
- `slices[name][e]`: the same for expert e of a fused tensor;
- `samples[key]`: strided weight samples of expert matrices ("tensor" or "tensor#e");
- `diffs[name]` / `slice_diffs[name][e]`: against the partner bytes of another checkpoint.

The result of each shard is self-contained, so it can be cached per shard (cache.py).
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .chunks import Batch, ChunkReader, Span, Unit, batch_bytes, new_pool, readable, split_tensor
from .inventory import Inventory
from .kernels import ChunkStats, Kernels

STAT_KEYS = ("numel", "sumsq", "maxabs", "nearzero", "nonfinite", "sigma1", "sigma_change")
DIFF_KEYS = ("equal", "delta_sumsq", "delta_maxabs", "partner_sumsq")


@dataclass(frozen=True)
class TensorPlan:
    """How to read one tensor: fused experts on dim 0?, keep a sample of how many weights, partner spans."""

    fused: bool = False
    sample: int = 0
    partners: Mapping[tuple[str, int], Span] = field(default_factory=dict)  # (kind, index) -> other checkpoint


@dataclass
class ShardResult:
    tensors: dict[str, dict] = field(default_factory=dict)
    slices: dict[str, list[dict | None]] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    diffs: dict[str, dict] = field(default_factory=dict)
    slice_diffs: dict[str, list[dict | None]] = field(default_factory=dict)


def plan_units(inv: Inventory, shard: str, plans: Mapping[str, TensorPlan], max_bytes: int) -> list[Unit]:
    path = inv.shards[shard].path
    units = []
    for meta in inv.tensors.values():
        if meta.shard != shard or not readable(meta.dtype) or meta.begin is None:
            continue
        plan = plans.get(meta.name, TensorPlan())
        for kind, index, span in split_tensor(path, meta.begin, meta.dtype, meta.shape, fused=plan.fused,
                                              max_bytes=max_bytes):
            partner = plan.partners.get((kind, index))
            units.append(Unit(meta.name, kind, index, span, partner))
    return units


def scan_shards(inv: Inventory, shards: list[str], plans: Mapping[str, TensorPlan], *, sigma_steps: int,
                max_bytes: int, workers: int = 1, on_bytes: Callable[[int], None] | None = None,
                on_shard: Callable[[str, ShardResult], None] | None = None) -> dict[str, ShardResult]:
    """Statistics of every readable tensor of `shards`; `on_shard` is called as each shard completes.

    `workers` threads compute at once (torch kernels release the GIL), each on whole batches with its own
    workspaces; results are folded in file order, so the numbers do not depend on `workers`.
    """
    all_units = {shard: plan_units(inv, shard, plans, max_bytes) for shard in shards}
    every = [u for units in all_units.values() for u in units]
    size = max(max((batch_bytes(u) for u in every), default=0), min(max_bytes, sum(batch_bytes(u) for u in every)))
    pool = new_pool(size, buffers=workers + 2)  # one per worker, one being read, one ready
    idle: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(workers):
        idle.put(Kernels(steps=sigma_steps))

    def compute(batch: Batch) -> list[tuple[Unit, ChunkStats | None, str | None]]:
        kernels = idle.get()
        try:
            out = []
            for unit, data, partner, error in batch.items():
                if error is not None:
                    out.append((unit, None, error))
                    continue
                sample = plans.get(unit.tensor, TensorPlan()).sample if unit.kind != "rows" else 0
                out.append((unit, kernels.stats(data, sigma=unit.kind != "rows", sample=sample, partner=partner), None))
            return out
        finally:
            idle.put(kernels)
            batch.release()

    threads = torch.get_num_threads()
    # parallel over batches (`workers`), never inside a kernel: these matrices are too small for intra-op
    # threads, whose OpenMP spinning measured +75 % CPU time for nothing (2 threads, one worker)
    torch.set_num_threads(1)
    try:
        return _scan(inv, shards, all_units, pool, workers, compute, on_bytes, on_shard)
    finally:
        torch.set_num_threads(threads)


def _scan(inv, shards, all_units, pool, workers, compute, on_bytes, on_shard) -> dict[str, ShardResult]:
    # one reader over every shard in turn: the next shard is read while the last batches of this one compute
    results: dict[str, ShardResult] = {}
    units = [u for shard in shards for u in all_units[shard]]
    shard_of = {id(u): shard for shard in shards for u in all_units[shard]}
    state = {"shard": None, "result": None, "folds": None}

    def finish() -> None:
        if state["shard"] is None:
            return
        result, folds = state["result"], state["folds"]
        for name, parts in folds.items():
            result.tensors.setdefault(name, {}).update(_plain(_merge(parts), STAT_KEYS))
            if any(p.equal is not None for p in parts):
                result.diffs[name] = _merge_diff(parts)
        results[state["shard"]] = result
        if on_shard is not None:
            on_shard(state["shard"], result)

    def fold(items: list) -> None:
        for item in items:
            shard = shard_of[id(item[0])]
            if shard != state["shard"]:
                finish()
                state.update(shard=shard, result=ShardResult(), folds={})
            _fold(inv, state["result"], state["folds"], [item])

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="browse-compute") as executor:
        pending: deque = deque()
        for batch in ChunkReader(units, max_bytes=len(pool[0]), pool=pool):
            pending.append((executor.submit(compute, batch), batch.nbytes))
            # fold finished batches in file order; never let more than `workers` wait (memory is the pool)
            while pending and (pending[0][0].done() or len(pending) > workers):
                fold(_next_done(pending, on_bytes))
        while pending:
            fold(_next_done(pending, on_bytes))
    finish()
    for shard in shards:  # a shard without readable tensors still gets its (empty) result
        if shard not in results:
            results[shard] = ShardResult()
            if on_shard is not None:
                on_shard(shard, results[shard])
    return results


def _next_done(pending: deque, on_bytes) -> list:
    """The results of the oldest submitted batch (waiting for it), counted on the progress bar."""
    future, nbytes = pending.popleft()
    items = future.result()
    if on_bytes is not None:
        on_bytes(nbytes)
    return items


def _fold(inv: Inventory, result: ShardResult, folds: dict[str, list[ChunkStats]], items: list) -> None:
    for unit, stats, error in items:
        if error is not None:
            result.tensors.setdefault(unit.tensor, {})["error"] = error
            continue
        if stats.sample is not None:
            key = unit.tensor if unit.kind == "whole" else f"{unit.tensor}#{unit.index}"
            result.samples[key] = stats.sample
        if unit.kind == "slice":
            count = inv.tensors[unit.tensor].shape[0]
            result.slices.setdefault(unit.tensor, [None] * count)[unit.index] = _plain(stats, STAT_KEYS)
            if stats.equal is not None:
                result.slice_diffs.setdefault(unit.tensor, [None] * count)[unit.index] = _plain(stats, DIFF_KEYS)
        folds.setdefault(unit.tensor, []).append(stats)


def _plain(stats: ChunkStats, keys: tuple[str, ...]) -> dict:
    return {k: getattr(stats, k) for k in keys if getattr(stats, k) is not None}


def _merge(parts: list[ChunkStats]) -> ChunkStats:
    if len(parts) == 1:
        return parts[0]
    merged = ChunkStats(sum(p.numel for p in parts), sum(p.sumsq for p in parts), max(p.maxabs for p in parts),
                        sum(p.nearzero for p in parts), sum(p.nonfinite for p in parts))
    return merged  # no singular value for a tensor read in pieces


def _merge_diff(parts: list[ChunkStats]) -> dict:
    compared = [p for p in parts if p.equal is not None]
    out = {"equal": all(p.equal for p in compared) and len(compared) == len(parts),
           "delta_sumsq": sum(p.delta_sumsq or 0.0 for p in compared),
           "delta_maxabs": max(p.delta_maxabs or 0.0 for p in compared),
           "partner_sumsq": sum(p.partner_sumsq or 0.0 for p in compared)}
    if len(compared) < len(parts):
        out["partial"] = f"{len(compared)} of {len(parts)} pieces compared"
    return out
