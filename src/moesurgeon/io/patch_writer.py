"""Write a patched copy of a checkpoint without rewriting what did not change.

`write_patched_checkpoint(source_dir, out_dir, Patch(...))` produces a new
checkpoint directory; the source is only ever opened for reading.

Design: what happens to a shard, mode="reuse" (the default)
-----------------------------------------------------------
- untouched shard -> reflink, read-only hard link or copy (see `link` below).
- shard with REPLACED tensors only -> a copy of the shard in which just those
  tensors' bytes are overwritten. Replacements must keep dtype and shape, so
  the header and every offset stay identical. On a
  copy-on-write filesystem (btrfs, XFS reflink, bcachefs) the copy is a
  reflink and only the new tensor bytes are written; elsewhere (ext4, most
  network filesystems) the whole shard is copied (kernel-side copy_file_range).
- shard with DROPPED tensors -> rewritten without them (raw byte ranges copied
  from the source, replacements written inline, memory flat).
- ADDED tensors -> new shard(s) after the reused ones, split at max_shard_size.

Values (`replace` / `add`) are in-memory tensors, `SourceBytes` (lazy_sources.py):
byte ranges of a safetensors file, e.g. a renamed expert (one range) or the kept
rows of a router (one range per run of kept rows), or `ComputedTensor`s (a
declared dtype/shape and a function, e.g. a merged expert). SourceBytes are
copied kernel-side and compared chunk by chunk, never loaded: a prune holds one
chunk, not the model. Each carries its file's identity (size, mtime, inode) from
when its offsets were read; a file changed since, or while it is read, fails the
export. A ComputedTensor is computed when its tensor is written and dropped
right after (verification compares a hash of the written bytes, never
recomputes): a merge holds about one tensor.

Names: every output weight file is one HF series, `model-0000i-of-0000N.safetensors`
(N = kept source shards + new shards), in both modes and for a single-file source
too. Reused shards keep their place in the order and are linked / copied under
their series name; the index maps to those names. Earlier versions kept the
source names and put added tensors in `model-patch-*` shards beside them, so a
prune gave `model-00001-of-00002` next to `model-patch-00001-of-00001`: loaders
coped (they follow the index), people and tools that count shards by name did
not. A source already named as such a series keeps its names when N is unchanged.

Rejected alternative: keep every source shard as a hard link and put the
replacement in the patch shard, with the index pointing there. Output would
cost only the changed bytes on any filesystem, but the old value would stay
in the linked shard as a stale duplicate key. transformers 5 builds one dict
from ALL keys of all shards (later file wins, so correctness would hang on
file-name order), vLLM's safetensors iterator loads every key of every file
(order-dependent again), and llama.cpp's convert_hf_to_gguf.py reads every
tensor of every shard and fails on the duplicate. The key cannot be removed
from the header alone either: the safetensors reader rejects data sections with
unreferenced gaps. So every output file holds exactly the keys the index
points at, and the price is paid where the filesystem cannot share blocks:
bytes written = size of the shards holding replaced tensors. For router/top-k
patches of real MoE models the routers sit in every shard, so on ext4 this is
about one full copy, while on a reflink filesystem it is the router bytes
(see experiments/patch_io/README.md for measured figures).

mode="full" rewrites everything at max_shard_size, streaming raw byte ranges one
source file at a time; pickle sources are always written this way (nothing to reuse).

Reusing untouched shards (`link`, see file_copy.py): "auto" (default) reflinks
where the filesystem can (free, independent files); else hard-links a source
shard only when it has no write permission bits (nobody edits that shared inode
in place without chmod-ing it first); else copies. So by default editing the
export in place never changes the source. "hardlink" always shares inodes (free
on any filesystem, but an in-place edit of one changes both: only for outputs
that are replaced, never edited), "copy" never does. A symlinked source (a hub
cache snapshot) is resolved first: the export never contains symlinks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic_dir import atomic_output_dir, check_output_location
from .checkpoint_reader import SAFETENSORS_INDEX, CheckpointReader
from .errors import CheckpointError
from .file_copy import link_or_copy
from .lazy_sources import ComputedTensor, PatchValue, SourceBytes, tensor_source, value_nbytes, value_spec
from .output_verifier import Layout, verify_output
from .safetensors_format import element_bits, expected_nbytes
from .shard_layout import parse_size, shard_names, split_greedy, write_index
from .shard_writer import OutTensor, clone_with_overwrites, write_shard
from .sidecar_files import copy_sidecar_files, write_config


@dataclass
class Patch:
    """What to change. Names are the on-disk tensor names (as in the index's weight_map)."""

    # values: torch.Tensor, SourceBytes (byte ranges of a safetensors file, read only while writing) or
    # ComputedTensor (computed only while writing)
    replace: dict[str, PatchValue] = field(default_factory=dict)  # same dtype and shape as on disk
    add: dict[str, PatchValue] = field(default_factory=dict)  # new names, stored in their own dtype
    drop: set[str] = field(default_factory=set)  # must exist
    config_edits: dict[str, Any] = field(default_factory=dict)  # merged into config.json (nested dicts merge)
    metadata: dict[str, str] | None = None  # into the index metadata and the new shards' __metadata__


@dataclass
class WriteReport:
    out_dir: str
    mode: str
    bytes_written_tensors: int = 0  # shard bytes physically written by us (not hard-linked or reflinked)
    bytes_changed_tensors: int = 0  # bytes of replaced + added tensors
    bytes_written_other: int = 0  # index, config.json, copied sidecar files
    shards_reused: list[str] = field(default_factory=list)  # identical to a source shard
    shards_written: list[str] = field(default_factory=list)  # new content
    # per output shard: hardlink | reflink | copy | reflink+patch | copy+patch | trimmed | new
    reuse_method: dict[str, str] = field(default_factory=dict)
    files_copied: list[str] = field(default_factory=list)
    files_skipped: list[str] = field(default_factory=list)  # not copied: other weights, links leaving, FIFOs...
    skip_reasons: dict[str, str] = field(default_factory=dict)  # files_skipped entry -> why
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def write_amplification(self) -> float:
        """bytes_written_tensors / bytes_changed_tensors (inf when nothing changed but bytes were written)."""
        if self.bytes_changed_tensors == 0:
            return 0.0 if self.bytes_written_tensors == 0 else float("inf")
        return self.bytes_written_tensors / self.bytes_changed_tensors


def write_patched_checkpoint(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    patch: Patch,
    *,
    mode: str = "reuse",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    link: str = "auto",
    allow_pickle: bool = False,
    verify: bool = True,
    fsync: bool = True,
    include_subdir_weights: bool = False,
) -> WriteReport:
    """Write source_dir with `patch` applied to out_dir, atomically. See the module docstring.

    link: "auto" | "hardlink" | "copy", how untouched shards are reused (module docstring).
    include_subdir_weights: also copy weight files found in subdirectories (e.g. gpt-oss
    `original/*.safetensors`); by default they are skipped and listed in report.skip_reasons.
    """
    start = time.perf_counter()
    if mode not in ("reuse", "full"):
        raise CheckpointError(f"mode={mode!r}: expected 'reuse' or 'full'")
    if link not in ("auto", "hardlink", "copy"):
        raise CheckpointError(f"link={link!r}: expected 'auto', 'hardlink' or 'copy'")
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    check_output_location(out_dir, source_dir=source_dir, overwrite=overwrite)  # fail before any long work
    max_bytes = parse_size(max_shard_size)
    with CheckpointReader(source_dir, allow_pickle=allow_pickle) as reader:
        _check_patch(reader, patch)
        for value in [*patch.replace.values(), *patch.add.values()]:
            if isinstance(value, ComputedTensor):
                value.digest = None  # a hash left by an earlier write of this value must not verify this one
        report = WriteReport(out_dir=str(out_dir), mode=mode)
        if reader.format == "pickle" and mode == "reuse":
            report.mode = "full"
            report.notes.append("pickle source: nothing can be reused, all tensors written as safetensors")
        report.bytes_changed_tensors = sum(value_nbytes(t) for t in [*patch.replace.values(), *patch.add.values()])
        shard_meta = {"format": "pt", **(patch.metadata or {})}
        with atomic_output_dir(out_dir, overwrite=overwrite, fsync=fsync) as tmp:
            if report.mode == "reuse":
                groups = _groups(_added_items(patch), max_bytes)
                kept = _kept_shards(reader, patch, report)
                names = shard_names(len(kept) + len(groups))  # one series: reused shards first, then the new
                renamed = [f"{s} -> {n}" for s, n in zip(kept, names) if s != n]
                if renamed:
                    report.notes.append(f"reused shards named as one series of {len(names)}: {', '.join(renamed[:3])}"
                                        f"{' ...' if len(renamed) > 3 else ''}")
                layout, weight_map = _write_reuse(reader, patch, dict(zip(kept, names)), tmp, link, fsync, report)
                new_names = names[len(kept):]
            else:
                layout, weight_map = {}, {}
                groups = _groups(_full_items(reader, patch), max_bytes)
                new_names = shard_names(len(groups))
            _write_new_shards(groups, new_names, tmp, shard_meta, fsync, report, layout, weight_map)
            metadata = {**reader.index_metadata, **(patch.metadata or {})}
            _set_totals(metadata, layout, weight_map)
            report.bytes_written_other += write_index(tmp / SAFETENSORS_INDEX, weight_map, metadata)
            if write_config(source_dir, tmp, patch.config_edits):
                report.bytes_written_other += (tmp / "config.json").stat().st_size
            report.files_copied, report.skip_reasons = copy_sidecar_files(
                source_dir, tmp, reader.weight_files(), include_subdir_weights=include_subdir_weights)
            report.files_skipped = list(report.skip_reasons)
            report.bytes_written_other += sum((tmp / f).stat().st_size for f in report.files_copied)
            if verify:
                verify_output(tmp, layout, weight_map, {**patch.replace, **patch.add})
    report.elapsed_s = time.perf_counter() - start
    return report


def _check_patch(reader: CheckpointReader, patch: Patch) -> None:
    """Reject an inconsistent patch before anything is written."""
    for kind, tensors in (("replace", patch.replace), ("add", patch.add)):
        for name, t in tensors.items():
            if not isinstance(t, (torch.Tensor, SourceBytes, ComputedTensor)):
                raise CheckpointError(f"patch.{kind}[{name!r}] is a {type(t).__name__}, expected a torch.Tensor, "
                                      "an io.SourceBytes or an io.ComputedTensor")
    both = sorted(set(patch.replace) & set(patch.drop))
    if both:
        raise CheckpointError(f"tensor {both[0]!r} is both replaced and dropped; keep one of the two")
    for name in sorted(patch.drop):
        if name not in reader:
            raise CheckpointError(f"cannot drop {name!r}: the checkpoint has no such tensor "
                                  "(names must be the on-disk names of the index's weight_map)")
    for name, t in patch.replace.items():
        if name not in reader:
            raise CheckpointError(f"cannot replace {name!r}: the checkpoint has no such tensor; use patch.add "
                                  "for new tensors (names must be the on-disk names of the weight_map)")
        info, (got, shape) = reader.header(name), value_spec(t)
        if (got, shape) != (info.dtype, info.shape):
            raise CheckpointError(
                f"replacement for {name!r} is {got} {list(shape)} but the checkpoint stores {info.dtype} "
                f"{list(info.shape)}; cast/reshape it before patching (on-disk dtypes and shapes are kept; "
                "to change a shape, drop the tensor and add it)")
    for name, t in patch.add.items():
        if name in reader and name not in patch.drop:
            raise CheckpointError(f"cannot add {name!r}: the checkpoint already has it; use patch.replace")
        value_spec(t)  # raises for dtypes safetensors cannot store
    if not isinstance(patch.config_edits, dict):
        raise CheckpointError(f"patch.config_edits must be a dict, got {type(patch.config_edits).__name__}")
    if patch.metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in patch.metadata.items()):
        raise CheckpointError("patch.metadata must map str to str (safetensors __metadata__ holds strings only)")


def _kept_shards(reader: CheckpointReader, patch: Patch, report: WriteReport) -> list[str]:
    """Source shards that keep at least one indexed tensor, in order (the others are left out, with a note)."""
    kept = []
    for shard in reader.shards():
        if all(n in patch.drop for n in reader.names_in_shard(shard)):
            report.notes.append(f"{shard}: every tensor dropped, shard omitted")
        else:
            kept.append(shard)
    return kept


def _write_reuse(reader: CheckpointReader, patch: Patch, out_names: dict[str, str], tmp: Path, link: str,
                 fsync: bool, report: WriteReport) -> tuple[Layout, dict[str, str]]:
    """Reuse, patch or trim each kept source shard into tmp under its series name (`out_names`)."""
    layout: Layout = {}
    weight_map: dict[str, str] = {}
    for shard, out_shard in out_names.items():
        header = reader.shard_header(shard)
        # the checked real file, never the link (a hub snapshot link, or one swapped after the reader's check)
        src, dst = str(reader.shard_real_path(shard)), str(tmp / out_shard)
        indexed = reader.names_in_shard(shard)  # the keys the index points at in this shard, storage order
        # orphans (held here, mapped nowhere or elsewhere) never reach an export: loaders that read every key
        # of every file would see a tensor the index does not vouch for
        indexed_set = set(indexed)
        orphans = [n for n in header.entries if n not in indexed_set]
        replaced = [n for n in indexed if n in patch.replace]
        dropped = [n for n in indexed if n in patch.drop]
        kept = [n for n in indexed if n not in patch.drop]
        if orphans:
            report.notes.append(f"{shard}: {len(orphans)} tensors the index does not map to this shard "
                                f"(e.g. {orphans[0]!r}) left out; {out_shard} was rewritten without them")
        if not replaced and not dropped and not orphans:
            method = link_or_copy(src, dst, link=link, fsync=fsync)
            report.shards_reused.append(out_shard)
            if method == "copy":
                report.bytes_written_tensors += header.file_size
        else:
            report.shards_written.append(out_shard)
            if not dropped and not orphans:  # same dtype/shape: overwrite bytes in a copy, header unchanged
                overwrites = [(header.entries[n].begin, patch.replace[n]) for n in replaced]
                method, written = clone_with_overwrites(src, dst, overwrites, fsync=fsync)
            else:
                out = [OutTensor(n, *_planned(reader, patch, n), header.entries[n].nbytes,
                                 patch.replace[n] if n in patch.replace else tensor_source(reader, n))
                       for n in kept]
                method, written = "trimmed", write_shard(dst, out, header.metadata, fsync=fsync)
            report.bytes_written_tensors += written
        report.reuse_method[out_shard] = method
        # the plan comes from the source's indexed view and the patch, never from the header that
        # verification will read back: a stale or extra key in the written file then cannot match itself
        layout[out_shard] = {n: _planned(reader, patch, n) for n in kept}
        weight_map.update({n: out_shard for n in kept})
    return layout, weight_map


def _planned(reader: CheckpointReader, patch: Patch, name: str) -> tuple[str, tuple[int, ...]]:
    """(dtype, shape) a kept tensor must have in the output: the patch value's, else the source index's."""
    if name in patch.replace:
        return value_spec(patch.replace[name])
    info = reader.header(name)
    return info.dtype, info.shape


def _added_items(patch: Patch) -> list[OutTensor]:
    return [OutTensor(n, *value_spec(t), value_nbytes(t), t) for n, t in patch.add.items()]


def _full_items(reader: CheckpointReader, patch: Patch) -> list[OutTensor]:
    """Every kept tensor in source storage order, then the added ones. Sources are byte ranges, not loads
    (a pickle source's are its mmap-backed tensors)."""
    items = []
    for name in reader.tensor_names():
        if name in patch.drop:
            continue
        info = reader.header(name)
        source = patch.replace[name] if name in patch.replace else tensor_source(reader, name)
        items.append(OutTensor(name, info.dtype, info.shape, info.nbytes, source))
    return items + _added_items(patch)


def _groups(items: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    return split_greedy(items, [t.nbytes for t in items], max_bytes)


def _write_new_shards(groups: list[list[OutTensor]], names: list[str], tmp: Path, metadata: dict[str, str],
                      fsync: bool, report: WriteReport, layout: Layout, weight_map: dict[str, str]) -> None:
    for file, group in zip(names, groups, strict=True):
        report.bytes_written_tensors += write_shard(str(tmp / file), group, metadata, fsync=fsync)
        report.shards_written.append(file)
        report.reuse_method[file] = "new"
        layout[file] = {t.name: (t.dtype, t.shape) for t in group}
        weight_map.update({t.name: file for t in group})


def _set_totals(metadata: dict, layout: Layout, weight_map: dict[str, str]) -> None:
    total_bytes = total_params = 0
    for name, shard in weight_map.items():
        dtype, shape = layout[shard][name]
        total_bytes += expected_nbytes(dtype, shape) or 0
        numel = 1
        for d in shape:
            numel *= d
        total_params += numel if element_bits(dtype) else 0
    metadata["total_size"] = total_bytes
    if "total_parameters" in metadata:
        metadata["total_parameters"] = total_params
