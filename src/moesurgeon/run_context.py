"""One run's context: built once by the runner, handed to every recipe together with its own settings.

    ctx = open_context("topk_override", out_dir, seed=0, progress=True, threads="auto", data=..., export=...,
                       model=ModelSpec(path=...))
    model, tokenizer, blocks = ctx.load(splits=("heldout",))

The context holds what every experiment shares, typed and resolved once: the run directory, the
seed (applied when the context opens), progress bars, whether this process is the main one (the
only one that writes under torchrun), the `threads` setting, the model spec with its checked
checkpoint directory, its config.json (read once) and the family adapter, the data settings and
batch size, and the export target (export.dir, else <run dir>/checkpoint, which the run owns).
Experiments that load no model (usage_diff, build_reference) get a context without a model.

Loading runs the cheapest checks first: config.json and the file listing (when the context opens,
seconds) -> the tokenizer -> the data files, tokenized and checked against the vocabulary and
positions (seconds) -> the export target (exists, nested, writable, free disk) -> threads -> only
then the weights (minutes for a large model). A typo in any setting costs seconds, never a model
load or a training run.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from .arch import ArchAdapter, get_adapter
from .data import DataSpec, TokenBlocks, load_blocks
from .errors import ConfigError
from .export import ExportOptions, check_export_location
from .models import ModelSpec, check_source, check_token_ids, load_model, load_tokenizer, resolve_device

log = logging.getLogger("moesurgeon")


@dataclass(frozen=True)
class SplitSettings:
    path: str | None = None         # file or dataset directory
    split: str | None = None        # for datasets saved with save_to_disk that hold several splits
    max_examples: int | None = None  # this split's cap; null: data.max_examples


@dataclass(frozen=True)
class DataSettings:
    """The `data` config group (conf/data/*.yaml)."""

    format: str = "auto"
    text_field: str = "text"
    label_field: str | None = None
    block_size: int = 256
    batch_size: int = 8
    max_examples: int | None = None
    heldout: SplitSettings = field(default_factory=SplitSettings)
    train: SplitSettings = field(default_factory=SplitSettings)

    def spec(self, split: str, seed: int) -> DataSpec:
        part: SplitSettings = getattr(self, split)
        if part.path is None:
            raise ConfigError(f"data.{split}.path is not set: pass data.{split}.path=<file or dataset dir>")
        return DataSpec(
            path=part.path, format=self.format, text_field=self.text_field, label_field=self.label_field,
            split=part.split, block_size=self.block_size,
            max_examples=part.max_examples if part.max_examples is not None else self.max_examples,
            seed=seed,
        )


@dataclass(frozen=True)
class ExportSettings:
    """The `export` config group (conf/export/default.yaml): the one switch and how to write."""

    enabled: bool = False
    dir: str | None = None
    mode: str = "reuse"
    max_shard_size: str = "5GB"
    link: str = "auto"
    overwrite: bool = False
    verify_reload: str | bool = "auto"
    verify_max_bytes: str = "2GB"


@dataclass(frozen=True)
class ExportTarget:
    enabled: bool
    dir: Path
    owned: bool               # <run dir>/checkpoint: this run's own, so a rerun (a resumed run) may replace it
    options: ExportOptions    # options.overwrite is true for an owned directory

    @classmethod
    def resolve(cls, settings: ExportSettings, out_dir: Path, allow_pickle: bool = False) -> "ExportTarget":
        owned = not settings.dir
        options = ExportOptions(
            mode=settings.mode, max_shard_size=settings.max_shard_size, link=settings.link,
            overwrite=settings.overwrite or owned, verify_reload=settings.verify_reload,
            verify_max_bytes=settings.verify_max_bytes, allow_pickle=allow_pickle)
        return cls(settings.enabled, Path(out_dir) / "checkpoint" if owned else Path(str(settings.dir)), owned,
                   options)


class Loaded(NamedTuple):
    model: torch.nn.Module
    tokenizer: object
    blocks: dict[str, TokenBlocks]


@dataclass(frozen=True)
class RunContext:
    experiment: str
    out_dir: Path
    seed: int
    progress: bool
    main_process: bool            # the process that writes (rank 0 under torchrun / accelerate)
    threads: int | str | None     # the `threads` setting: auto or N, applied right before the weights load
    data: DataSettings
    export: ExportTarget
    model: ModelSpec | None = None
    model_config: dict | None = None  # config.json of the source checkpoint, read once
    source_dir: Path | None = None    # the local checkpoint directory of model.path (a hub id: its cache snapshot)
    adapter: ArchAdapter | None = None

    @property
    def batch_size(self) -> int:
        return self.data.batch_size

    def data_spec(self, split: str) -> DataSpec:
        return self.data.spec(split, self.seed)

    def moved_to(self, out_dir: Path) -> "RunContext":
        """The same run in another directory (every process of a multi-process run uses rank 0's)."""
        export = replace(self.export, dir=Path(out_dir) / "checkpoint") if self.export.owned else self.export
        return replace(self, out_dir=Path(out_dir), export=export)

    # ---- loading, cheapest check first (module docstring)
    def load(self, splits=("heldout",), *, export_rewrites_shards: bool = True) -> Loaded:
        """Tokenizer -> data (checked) -> export target -> threads -> model.
        `export_rewrites_shards`: False when the export edits config.json only (top-k)."""
        tokenizer = self.load_tokenizer()
        blocks = self.load_blocks(tokenizer, splits)
        self.check_export(rewrites_shards=export_rewrites_shards)
        return Loaded(self.load_model(tokenizer), tokenizer, blocks)

    def load_tokenizer(self):
        return load_tokenizer(self._model_spec(), self.source_dir)

    def load_blocks(self, tokenizer, splits=("heldout",)) -> dict[str, TokenBlocks]:
        """{split: TokenBlocks}, each checked against the model's vocabulary and positions (config.json)."""
        config = self.model_config or {}
        blocks = {}
        for split in splits:
            spec = self.data_spec(split)
            blocks[split] = load_blocks(spec, tokenizer, config.get("max_position_embeddings"))
            self.check_token_ids(blocks[split], tokenizer, where=f"data.{split} ({spec.path})")
            log.info("data %s: %d blocks, %d tokens, labels %s", split, len(blocks[split]),
                     blocks[split].num_tokens(), blocks[split].label_names or "-")
        return blocks

    def check_token_ids(self, blocks: TokenBlocks, tokenizer, where: str) -> None:
        vocab = (self.model_config or {}).get("vocab_size")
        if vocab:
            check_token_ids(blocks.input_ids, int(vocab), Path(tokenizer.name_or_path), where=where)

    def check_export(self, rewrites_shards: bool = True) -> None:
        """Everything about the export target that can be known before the long work (export.py)."""
        if self.export.enabled and self.main_process:
            check_export_location(self.source_dir, self.export.dir, self.out_dir, self.export.options,
                                  rewrites_shards=rewrites_shards)

    def load_model(self, tokenizer=None) -> torch.nn.Module:
        spec = self._model_spec()
        device = "cuda" if spec.device_map else resolve_device(spec.device)
        n = resolve_threads(self.threads, device)
        if n is not None:
            torch.set_num_threads(n)
            log.info("torch threads: %d (threads=%s, device %s)", n, self.threads, device)
        model, _, _ = load_model(spec, tokenizer, source_dir=self.source_dir)
        return model

    def _model_spec(self) -> ModelSpec:
        if self.model is None:
            raise RuntimeError(f"experiment {self.experiment} loads no model: its run context has no model spec")
        return self.model


def open_context(experiment: str, out_dir: Path, *, seed: int, progress: bool, threads: int | str | None,
                 data: DataSettings, export: ExportSettings, model: ModelSpec | None = None,
                 main_process: bool = True, needs_tokenizer: bool = True) -> RunContext:
    """Seed, check the model's files and read its config.json once, resolve the export target.
    `needs_tokenizer=False`: a checkpoint without tokenizer files is accepted (`ctx.load` still needs one)."""
    random.seed(seed)
    torch.manual_seed(seed)
    source_dir = config = adapter = None
    if model is not None:
        source_dir, config = check_source(model, tokenizer=needs_tokenizer)  # a wrong path or family stops here, before any data is read
        adapter = get_adapter(config)
    target = ExportTarget.resolve(export, out_dir, model.allow_pickle if model else False)
    return RunContext(experiment, Path(out_dir), seed, progress, main_process, threads, data, target, model, config,
                      source_dir, adapter)


# threads=auto: torch's default (one thread per core) is right on an idle machine (the embedded model runs
# 1.66x faster with 2 threads than 1 on 2 idle cores) and disastrous on a shared one (0.2x with 2 threads
# when other jobs keep the cores busy: OpenMP threads spin waiting for a core). So auto counts the cores
# that are free when the run starts. Figures: experiments/router_usage/README.md, "Threads".
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


def _cpu_times() -> tuple[int, int]:
    fields_ = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields_), fields_[3] + fields_[4]  # total, idle + iowait
