"""Steps every experiment shares: seeding, threads, and loading in the order that fails fastest.

`load_model_and_data` checks everything that needs no weights before the first weight is read:
model directory, config.json and tokenizer (seconds) -> data files, tokenized with the model's
tokenizer and checked against its vocabulary and positions (seconds) -> the export target (exists,
nested, writable, free disk) -> only then the model itself (minutes for a large one). A typo in
any setting therefore costs seconds, never a model load or a training run.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..config import data_spec, export_options, model_spec
from ..data import TokenBlocks, load_blocks
from ..errors import ConfigError
from ..models import check_token_ids, load_config_dict, load_model, load_tokenizer, local_dir, resolve_device

log = logging.getLogger("moesurgeon")

# threads=auto: torch's default (one thread per core) is right on an idle machine (the embedded model runs
# 1.66x faster with 2 threads than 1 on 2 idle cores) and disastrous on a shared one (0.2x with 2 threads
# when other jobs keep the cores busy: OpenMP threads spin waiting for a core). So auto counts the cores
# that are free when the run starts. Figures: experiments/router_usage/README.md, "Threads".


def setup(cfg: DictConfig) -> None:
    seed = int(cfg.get("seed", 0))
    random.seed(seed)
    torch.manual_seed(seed)


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def busy_cores(sample_s: float = 0.25) -> int:
    """Cores kept busy by other work, from /proc/stat over a short sample while this process waits
    (a run queue count or load average also counts our own helper threads and lags behind)."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(sample_s)
        total1, idle1 = _cpu_times()
    except (OSError, IndexError, ValueError):
        return int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    cores = os.cpu_count() or 1
    busy = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
    return int(busy * cores + 0.5)


def resolve_threads(value, device: str, busy: int | None = None) -> int | None:
    """`threads`: an integer, or auto/null -> the usable cores not busy with other work (at least 1) on CPU;
    None (torch's default) when the model runs on an accelerator."""
    if value not in (None, "auto"):
        if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
            raise ConfigError(f"threads={value!r}: expected a positive integer or auto")
        return int(value)
    if not device.startswith("cpu"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - (busy_cores() if busy is None else busy))


def apply_threads(cfg: DictConfig) -> None:
    spec = model_spec(cfg)
    device = "cuda" if spec.device_map else resolve_device(spec.device)
    n = resolve_threads(cfg.get("threads"), device)
    if n is not None:
        torch.set_num_threads(n)
        log.info("torch threads: %d (threads=%s, device %s)", n, cfg.get("threads"), device)


def source_dir(cfg: DictConfig) -> Path:
    """The local checkpoint directory of `model.path` (a hub id: its cache snapshot)."""
    return local_dir(model_spec(cfg))


def export_dir(cfg: DictConfig, out_dir: Path) -> Path:
    return Path(str(cfg.export.dir)) if cfg.export.get("dir") else Path(out_dir) / "checkpoint"


def export_target(cfg: DictConfig, out_dir: Path, *, overwrite_default_dir: bool = False):
    """(directory, ExportOptions) of this run's export. overwrite_default_dir: <run dir>/checkpoint belongs to
    this run, so a resumed run may replace it (an explicit export.dir still needs export.overwrite=true)."""
    opts = export_options(cfg)
    if overwrite_default_dir and not cfg.export.get("dir"):
        opts.overwrite = True
    return export_dir(cfg, out_dir), opts


def check_export_target(cfg: DictConfig, out_dir: Path, *, overwrite_default_dir: bool = False,
                        config_only: bool = False) -> None:
    """Everything about the export target that can be known before the long work (see export.py)."""
    from ..export import check_export_location

    target, opts = export_target(cfg, out_dir, overwrite_default_dir=overwrite_default_dir)
    check_export_location(source_dir(cfg), target, Path(out_dir), opts, rewrites_shards=not config_only)


def load_tokenized(cfg: DictConfig, tokenizer, config: dict, splits=("heldout",), only_labels=None):
    """{split: TokenBlocks}, each checked against the model's vocabulary and positions from config.json."""
    blocks: dict[str, TokenBlocks] = {}
    for split in splits:
        spec = data_spec(cfg, split, only_labels=only_labels if split == "train" else None)
        blocks[split] = load_blocks(spec, tokenizer, config.get("max_position_embeddings"))
        if config.get("vocab_size"):
            check_token_ids(blocks[split].input_ids, int(config["vocab_size"]), Path(tokenizer.name_or_path),
                            where=f"data.{split} ({spec.path})")
        log.info("data %s: %d blocks, %d tokens, labels %s", split, len(blocks[split]),
                 blocks[split].num_tokens(), blocks[split].label_names or "-")
    return blocks


def load_model_and_data(cfg: DictConfig, splits=("heldout",), only_labels=None, *, exports: str | None = None,
                        out_dir: Path | None = None):
    """Return (model, tokenizer, adapter, {split: TokenBlocks}), every cheap check first (module docstring).

    exports: None (no export), "tensors" (the surgery rewrites tensors) or "config" (config.json only):
    the export target is then checked before the model is loaded."""
    spec = model_spec(cfg)
    config = load_config_dict(spec)
    tokenizer = load_tokenizer(spec)
    blocks = load_tokenized(cfg, tokenizer, config, splits, only_labels)
    if exports:
        check_export_target(cfg, out_dir, config_only=exports == "config")
    apply_threads(cfg)
    model, tokenizer, adapter = load_model(spec, tokenizer)
    return model, tokenizer, adapter, blocks


def layer_short_names(layer_names: list[str]) -> list[str]:
    """'model.layers.3.mlp.gate' -> 'L3' for plot axes (files keep the full names)."""
    out = []
    for name in layer_names:
        parts = name.split(".")
        idx = next((p for p in parts if p.isdigit()), name)
        out.append(f"L{idx}")
    return out
