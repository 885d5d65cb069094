"""Export an in-memory surgery as a standard checkpoint: only what changed is written.

The model's current router tensors are compared with the source checkpoint's; those that differ
(after casting to the on-disk dtype) plus any config.json edits go through the io patch writer,
which reuses every unchanged shard. The result is verified before it appears at `out_dir`:
headers are re-read by the writer, and — for models small enough (`verify_reload`) — the output
is reloaded with `AutoModelForCausalLM` and its logits compared with the in-memory model.

Router tensors are rounded to the checkpoint's dtype in memory as well, so the in-memory model is
exactly what was written and the comparison is tight.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import ArchAdapter
from .io import CheckpointError, CheckpointReader, Patch, parse_size, write_patched_checkpoint
from .io.atomic_dir import atomic_output_dir, check_not_nested
from .models import input_device

log = logging.getLogger("moesurgeon")


class ExportVerificationError(RuntimeError):
    """The written checkpoint does not reproduce the in-memory model."""


@dataclass
class ExportOptions:
    mode: str = "reuse"  # reuse | full
    max_shard_size: str = "5GB"
    link: str = "auto"  # auto | hardlink | copy
    overwrite: bool = False
    verify_reload: str | bool = "auto"  # auto | true | false
    verify_max_bytes: str = "2GB"
    allow_pickle: bool = False


def _module_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner), leaf)


def router_replacements(model, adapter: ArchAdapter, reader: CheckpointReader,
                        skip: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """{on-disk name: tensor in the on-disk dtype} for every router tensor that differs from the source.

    skip: on-disk names another patch decides (neither compared nor rounded in memory)."""
    out = {}
    for layer in adapter.moe_layers(model):
        for mem_name, disk_name in adapter.router_tensor_names(layer).items():
            if disk_name not in reader and mem_name in reader:
                disk_name = mem_name  # a fused transformers-5 save keeps in-memory names (mixtral `mlp`)
            if disk_name in skip:
                continue
            if disk_name not in reader:
                raise CheckpointError(
                    f"router tensor {mem_name} should be stored as {disk_name!r}, which the source checkpoint "
                    "lacks; the checkpoint's key format is not the one the adapter knows"
                )
            current = _module_tensor(model, mem_name)
            source = reader.get(disk_name)
            stored = current.detach().to("cpu", source.dtype).reshape(source.shape).contiguous()
            if not torch.equal(stored, source):
                out[disk_name] = stored
                with torch.no_grad():  # keep memory == disk (see module docstring)
                    current.copy_(stored.reshape(current.shape).to(current.dtype))
    return out


# the io layer's generic option names, as the command line spells them
_OPTION_NAMES = {"overwrite": "export.overwrite=true", "out_dir": "export.dir", "link": "export.link"}


def check_export_location(source_dir: Path, out_dir: Path, run_dir: Path | None, opts: ExportOptions, *,
                          rewrites_shards: bool = True) -> None:
    """Refuse, before any evaluation or training, an export that would fail or destroy something at the end:
    an existing target without export.overwrite=true, a target inside the source (or around it), the run
    directory itself (or a directory holding it), an unwritable location, too little free disk.

    `rewrites_shards`: the surgery changes tensors (routers sit in nearly every shard of a real model, so
    the bound is every shard, unless the filesystem can reflink); False for config-only edits (top-k).
    """
    from .io.output_checks import check_output_location, estimate_reuse_bytes

    out = out_dir.absolute()
    if run_dir is not None:
        run = run_dir.absolute()
        if out == run or out in run.parents:
            raise CheckpointError(f"export.dir={str(out_dir)!r} is (or contains) the run directory {run}, whose "
                                  "metrics and logs the export would replace: leave export.dir=null "
                                  "(<run dir>/checkpoint) or choose a directory outside the run directory")
    with CheckpointReader(source_dir, allow_pickle=opts.allow_pickle) as reader:
        if opts.mode == "full" or reader.format == "pickle":
            needed = _checkpoint_bytes(reader)
        else:
            shards = [reader.shard_real_path(s) for s in reader.shards()]
            needed = estimate_reuse_bytes(shards, out.parent, "copy" if rewrites_shards else opts.link)
    check_output_location(out, source_dir=source_dir, overwrite=opts.overwrite, needed_bytes=needed,
                          option_names=_OPTION_NAMES)


def _checkpoint_bytes(reader: CheckpointReader) -> int:
    return sum(reader.shard_path(s).stat().st_size for s in reader.shards())


@torch.no_grad()
def verify_reload(ckpt_dir: Path, model, probe_input_ids: torch.Tensor) -> float:
    """Reload `ckpt_dir` with transformers and return the max |logit difference| vs `model`."""
    from transformers import AutoModelForCausalLM

    device = input_device(model)
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=model.dtype).to(device).eval()
    ids = probe_input_ids.to(device)
    expected = model(input_ids=ids).logits.float()
    got = reloaded(input_ids=ids).logits.float()
    del reloaded
    return float((expected - got).abs().max())


def export_patched_model(
    model,
    adapter: ArchAdapter,
    source_dir: Path,
    out_dir: Path,
    opts: ExportOptions,
    *,
    config_edits: dict | None = None,
    probe_input_ids: torch.Tensor | None = None,
    extra: Patch | None = None,
) -> dict:
    """Write model's changed router tensors (+ config edits, + `extra`) as a checkpoint at out_dir.

    `extra` is authoritative for every tensor it names: a router tensor it drops, adds or replaces (a prune's
    sliced router rows, a merge's new rows) gets no replacement from the in-memory model, whose routers are
    then in the source numbering and need not match what `extra` writes."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    check_not_nested(source_dir, out_dir)
    decided = set(extra.drop) | set(extra.add) | set(extra.replace) if extra is not None else set()
    with CheckpointReader(source_dir, allow_pickle=opts.allow_pickle) as reader:
        replace = router_replacements(model, adapter, reader, skip=decided)
        size = _checkpoint_bytes(reader) if reader.format != "pickle" else 0
    patch = Patch(replace=replace, config_edits=dict(config_edits or {}))
    if extra is not None:
        patch.replace.update(extra.replace)
        patch.add.update(extra.add)
        patch.drop |= set(extra.drop)
        patch.config_edits.update(extra.config_edits)
    verify = opts.verify_reload
    if verify == "auto":
        verify = size <= parse_size(opts.verify_max_bytes)
    verify = bool(verify) and probe_input_ids is not None

    metrics: dict = {}
    with atomic_output_dir(out_dir, overwrite=opts.overwrite) as staging:
        inner = staging / "checkpoint"
        report = write_patched_checkpoint(
            source_dir, inner, patch, mode=opts.mode, max_shard_size=opts.max_shard_size,
            link=opts.link, allow_pickle=opts.allow_pickle,
        )
        if verify:
            diff = verify_reload(inner, model, probe_input_ids)
            tol = 1e-4 if model.dtype == torch.float32 else 2e-2
            metrics["export/max_abs_logit_diff"] = diff
            if not diff <= tol:
                raise ExportVerificationError(
                    f"the exported checkpoint's logits differ from the in-memory model by {diff:.3g} "
                    f"(tolerance {tol}); nothing was written to {out_dir}"
                )
        for entry in inner.iterdir():  # lift the verified files into the directory that becomes out_dir
            os.rename(entry, staging / entry.name)
        inner.rmdir()
    log.info("exported %s (%d tensors replaced, %d shards reused, %.2f MB written) in %.2fs",
             out_dir, len(patch.replace), len(report.shards_reused), report.bytes_written_tensors / 1e6, report.elapsed_s)
    metrics.update({
        "export/dir": str(out_dir),
        "export/tensors_replaced": len(patch.replace),
        "export/bytes_changed_tensors": report.bytes_changed_tensors,
        "export/bytes_written_tensors": report.bytes_written_tensors,
        "export/shards_reused": len(report.shards_reused),
        "export/shards_written": len(report.shards_written),
        "export/seconds": report.elapsed_s,
        "export/verified_reload": bool(verify),
    })
    return metrics
