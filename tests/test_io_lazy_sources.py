"""Lazy byte-range patch values (io.SourceBytes): renames, row subsets, mixed with tensors, both modes,
a source changed under us, and the memory bound (no tensor the size of the source is ever allocated).
Lazily computed values (io.ComputedTensor): written, checked against their declaration, computed once per
write, verified by hash, and never all alive at once."""

from __future__ import annotations

import errno
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_io import all_tensors, make_checkpoint, tiny_moe_tensors
from safetensors.torch import save_file

from moesurgeon.io import CheckpointError, CheckpointReader, ComputedTensor, Patch, SourceBytes, rows_source
from moesurgeon.io import tensor_source
from moesurgeon.io import file_copy as file_copy_module
from moesurgeon.io import lazy_sources
from moesurgeon.io import write_patched_checkpoint

R0 = "model.layers.0.mlp.gate.weight"  # bf16 [4, 8]
EX = "model.layers.{}.mlp.experts.{}.down_proj.weight"  # bf16 [8, 6]
SOURCE = all_tensors(tiny_moe_tensors())


@pytest.fixture
def src(tmp_path):
    return make_checkpoint(tmp_path / "src")


def reread(path: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return {n: r.get(n) for n in r.tensor_names()}


@pytest.mark.parametrize("mode", ["reuse", "full"])
def test_rename_is_one_range_and_copies_the_bytes(src, tmp_path, mode):
    old, new = EX.format(1, 3), EX.format(1, 1)
    with CheckpointReader(src) as r:
        value = tensor_source(r, old)
        patch = Patch(drop={old, new}, add={new: value})
    assert isinstance(value, SourceBytes) and len(value.ranges) == 1 and value.nbytes == 8 * 6 * 2
    report = write_patched_checkpoint(src, tmp_path / "out", patch, mode=mode)
    got = reread(tmp_path / "out")
    assert torch.equal(got[new], SOURCE[old]) and old not in got
    assert set(got) == set(SOURCE) - {old}
    assert all(torch.equal(got[n], SOURCE[n]) for n in got if n != new)
    assert report.bytes_changed_tensors == value.nbytes


@pytest.mark.parametrize("rows, runs", [([0], 1), ([3], 1), ([1, 2], 1), ([0, 2, 3], 2), ([3, 0], 2),
                                        ([0, 1, 2, 3], 1)])
@pytest.mark.parametrize("mode", ["reuse", "full"])
def test_row_subset(src, tmp_path, rows, runs, mode):
    """First, last, middle, non-contiguous and reordered dim-0 rows: one range per run of consecutive rows."""
    name = EX.format(0, 2)  # [8, 6]: rows of 12 bytes
    picked = [r * 2 for r in rows]  # rows 0, 2, 4, 6 of 8
    with CheckpointReader(src) as r:
        value = rows_source(r, name, picked)
        router = rows_source(r, R0, rows)
    assert len(router.ranges) == runs and router.shape == (len(rows), 8)
    patch = Patch(drop={name, R0}, add={name: value, R0: router})
    write_patched_checkpoint(src, tmp_path / "out", patch, mode=mode)
    got = reread(tmp_path / "out")
    assert torch.equal(got[name], SOURCE[name][picked]) and torch.equal(got[R0], SOURCE[R0][rows])
    assert got[R0].dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["reuse", "full"])
def test_lazy_values_mixed_with_tensors(src, tmp_path, mode):
    """A lazy replace in a shard that is only patched (reuse: the clone-and-overwrite path), a lazy add,
    an in-memory replace and an in-memory add in one patch."""
    router = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with CheckpointReader(src) as r:
        patch = Patch(replace={EX.format(0, 0): tensor_source(r, EX.format(0, 3)), R0: router},
                      add={"extra.rows": rows_source(r, "lm_head.weight", [15, 0]), "extra.ones": torch.ones(3)})
    report = write_patched_checkpoint(src, tmp_path / "out", patch, mode=mode)
    if mode == "reuse":
        assert report.reuse_method["model-00001-of-00004.safetensors"] == "copy+patch"
    got = reread(tmp_path / "out")
    assert torch.equal(got[EX.format(0, 0)], SOURCE[EX.format(0, 3)]) and torch.equal(got[R0], router)
    assert torch.equal(got["extra.rows"], SOURCE["lm_head.weight"][[15, 0]]) and got["extra.rows"].dtype == torch.float32
    assert torch.equal(got["extra.ones"], torch.ones(3))
    assert all(torch.equal(got[n], SOURCE[n]) for n in SOURCE if n not in (EX.format(0, 0), R0))


def test_lazy_replace_must_match_the_stored_dtype_and_shape(src, tmp_path):
    with CheckpointReader(src) as r:
        rows = rows_source(r, R0, [0, 1])
    with pytest.raises(CheckpointError, match=r"replacement for 'model\.layers\.0\.mlp\.gate\.weight' is BF16 \[2, 8\]"):
        write_patched_checkpoint(src, tmp_path / "out", Patch(replace={R0: rows}))
    assert not (tmp_path / "out").exists()


def test_bad_source_values(src):
    shard = str(src / "model-00001-of-00003.safetensors")
    with pytest.raises(CheckpointError, match=r"BF16 \[4, 8\] needs 64 bytes but the ranges cover 60"):
        SourceBytes(shard, "BF16", (4, 8), ((100, 160),))
    with pytest.raises(CheckpointError, match="dtype 'X16' is not a safetensors dtype"):
        SourceBytes(shard, "X16", (4,), ((0, 8),))
    with pytest.raises(CheckpointError, match="ranges end at byte"):
        SourceBytes(shard, "U8", (8,), ((10**9, 10**9 + 8),))
    with CheckpointReader(src) as r, pytest.raises(CheckpointError, match=r"rows \[4\] .* out of range: dim 0 has 4"):
        rows_source(r, R0, [0, 4])


def test_source_changed_after_planning_is_an_error(src, tmp_path):
    old = EX.format(1, 3)
    with CheckpointReader(src) as r:
        patch = Patch(drop={old}, add={EX.format(1, 9): tensor_source(r, old)})
    shard = src / "model-00002-of-00003.safetensors"
    st = shard.stat()
    with open(shard, "r+b") as f:  # same size, one byte flipped: only the mtime tells
        f.seek(st.st_size - 1)
        byte = f.read(1)
        f.seek(st.st_size - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors changed since the export was planned"):
        write_patched_checkpoint(src, tmp_path / "out", patch)
    assert not (tmp_path / "out").exists()


def test_source_written_while_being_read_is_an_error(src, tmp_path, monkeypatch):
    old = EX.format(1, 3)
    shard = src / "model-00002-of-00003.safetensors"
    with CheckpointReader(src) as r:
        patch = Patch(drop={old}, add={EX.format(1, 9): tensor_source(r, old)})
    real = lazy_sources.copy_range

    def copy_then_touch(*args):
        real(*args)
        os.utime(shard, ns=(0, 12345))  # someone writes the source mid-copy

    monkeypatch.setattr(lazy_sources, "copy_range", copy_then_touch)
    with pytest.raises(CheckpointError, match="changed since the export was planned"):
        write_patched_checkpoint(src, tmp_path / "out", patch)
    assert not (tmp_path / "out").exists()


def test_verification_rereads_lazy_values(src, tmp_path, monkeypatch):
    """A lazily written tensor whose output bytes differ from its source ranges is caught, nothing published."""
    real = lazy_sources.copy_source

    def corrupting(source, fd, offset):
        n = real(source, fd, offset)
        os.pwrite(fd, b"\x7f", offset + n - 1)
        return n

    monkeypatch.setattr("moesurgeon.io.shard_writer.copy_source", corrupting)
    with CheckpointReader(src) as r:
        patch = Patch(drop={R0}, add={R0: rows_source(r, R0, [0, 2])})
    with pytest.raises(CheckpointError, match=r"verification.*bytes of tensor 'model\.layers\.0\.mlp\.gate\.weight'"):
        write_patched_checkpoint(src, tmp_path / "out", patch)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_memory_stays_at_a_chunk(tmp_path, monkeypatch, kernel_copy):
    """A 16 MiB tensor renamed and row-sliced: the writer (copy + verification) never holds more than a few
    1 MiB chunks. The control at the end shows tracemalloc does see a whole-tensor read."""
    big = torch.arange(2048 * 2048, dtype=torch.float32).reshape(2048, 2048)  # 16 MiB
    src = tmp_path / "big"
    src.mkdir()
    save_file({"big": big, "small": torch.ones(4)}, str(src / "model.safetensors"))
    del big
    monkeypatch.setattr(lazy_sources, "CHUNK", 1 << 20)
    monkeypatch.setattr(file_copy_module, "_READ_CHUNK", 1 << 20)
    if not kernel_copy:  # the pread/pwrite fallback (e.g. across filesystems on old kernels)
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: pytest.fail(f"{name} was loaded"))
    rows = [r for r in range(2048) if r % 3]  # non-contiguous: many ranges
    with CheckpointReader(src) as r:
        patch = Patch(drop={"big"}, add={"renamed": tensor_source(r, "big"), "rows": rows_source(r, "big", rows)})
    tracemalloc.start()
    try:
        write_patched_checkpoint(src, tmp_path / "out", patch, mode="full")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with open(src / "model.safetensors", "rb") as f:  # control: a whole read is seen
            whole = f.read()
        _, control = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert control >= len(whole) >= 16 << 20
    assert peak < 4 << 20, f"writer peaked at {peak / 2**20:.1f} MiB of Python memory"
    monkeypatch.undo()
    with CheckpointReader(tmp_path / "out") as r:
        expected = torch.arange(2048 * 2048, dtype=torch.float32).reshape(2048, 2048)
        assert torch.equal(r.get("renamed"), expected) and torch.equal(r.get("rows"), expected[rows])


# ------------------------------------------------------------------------------------------- computed values
class Counted:
    """A compute function that counts its calls."""

    def __init__(self, make):
        self.make, self.calls = make, 0

    def __call__(self):
        self.calls += 1
        return self.make()


@pytest.mark.parametrize("mode", ["reuse", "full"])
def test_computed_values_written_once_per_write(src, tmp_path, mode):
    """A computed replace in a shard that is only patched (reuse: clone-and-overwrite), one in a shard that is
    trimmed, a computed add and computed dim-0 rows: right bytes, each compute called once per write (never by
    verification), again once on a second write of the same patch."""
    g = torch.Generator().manual_seed(7)
    new_ex, new_router = torch.randn(8, 6, generator=g).to(torch.bfloat16), torch.randn(4, 8, generator=g)
    full = torch.randn(5, 3, generator=g).to(torch.float16)
    funcs = {k: Counted(lambda t=t: t.clone()) for k, t in [("ex", new_ex), ("router", new_router.to(torch.bfloat16)),
                                                             ("add", torch.arange(6.0)), ("rows", full)]}
    patch = Patch(replace={EX.format(0, 0): ComputedTensor("BF16", (8, 6), funcs["ex"], "ex"),
                           R0: ComputedTensor(torch.bfloat16, (4, 8), funcs["router"])},
                  add={"extra.add": ComputedTensor("F32", (6,), funcs["add"]),
                       "extra.rows": ComputedTensor(torch.float16, (5, 3), funcs["rows"]).rows([4, 0, 1])},
                  drop={EX.format(1, 3)})  # shard 2 loses a tensor: rewritten ("trimmed"), not patched
    patch.replace[EX.format(1, 0)] = ComputedTensor("BF16", (8, 6), Counted(lambda: SOURCE[EX.format(1, 2)]))
    funcs["trimmed"] = patch.replace[EX.format(1, 0)].compute
    report = write_patched_checkpoint(src, tmp_path / "out", patch, mode=mode)
    assert all(f.calls == 1 for f in funcs.values()), {k: f.calls for k, f in funcs.items()}
    if mode == "reuse":
        assert report.reuse_method["model-00001-of-00004.safetensors"] == "copy+patch"
        assert report.reuse_method["model-00002-of-00004.safetensors"] == "trimmed"
    got = reread(tmp_path / "out")
    assert torch.equal(got[EX.format(0, 0)], new_ex) and torch.equal(got[R0], new_router.to(torch.bfloat16))
    assert torch.equal(got["extra.add"], torch.arange(6.0)) and torch.equal(got[EX.format(1, 0)],
                                                                            SOURCE[EX.format(1, 2)])
    assert torch.equal(got["extra.rows"], full[[4, 0, 1]]) and got["extra.rows"].dtype == torch.float16
    assert report.bytes_changed_tensors == 2 * 96 + 64 + 24 + 18
    write_patched_checkpoint(src, tmp_path / "again", patch, mode=mode)
    assert all(f.calls == 2 for f in funcs.values())


@pytest.mark.parametrize("wrong, message", [
    (lambda: torch.zeros(4, 8), r"computed value 'router' is torch.float32 \[4, 8\] but was declared BF16 \[4, 8\]"),
    (lambda: torch.zeros(8, 4, dtype=torch.bfloat16), r"is torch.bfloat16 \[8, 4\] but was declared BF16 \[4, 8\]"),
    (lambda: np.zeros((4, 8)), r"computed value 'router' returned a ndarray, expected a torch.Tensor"),
])
def test_computed_value_must_match_its_declaration(src, tmp_path, wrong, message):
    with pytest.raises(CheckpointError, match=message):
        write_patched_checkpoint(src, tmp_path / "out", Patch(replace={R0: ComputedTensor("BF16", (4, 8), wrong,
                                                                                         "router")}))
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=r"replacement for 'model\.layers\.0\.mlp\.gate\.weight' is F32 \[4, 8\]"):
        write_patched_checkpoint(src, tmp_path / "out", Patch(replace={R0: ComputedTensor("F32", (4, 8), wrong)}))
    with pytest.raises(CheckpointError, match=r"expected a safetensors dtype torch can hold"):
        ComputedTensor("X16", (4,), wrong)
    with pytest.raises(CheckpointError, match=r"function of no arguments"):
        ComputedTensor("F32", (4,), torch.zeros(4))
    with pytest.raises(CheckpointError, match=r"rows \[4\] of computed value 'router' \[4, 8\] are out of range"):
        ComputedTensor("BF16", (4, 8), wrong, "router").rows([0, 4])


def test_verification_hashes_computed_values(src, tmp_path, monkeypatch):
    """A computed tensor whose written bytes differ from what was computed is caught without recomputing."""
    from moesurgeon.io import shard_writer

    real = lazy_sources.write_computed

    def corrupting(value, fd, offset):
        n = real(value, fd, offset)
        os.pwrite(fd, b"\x7f", offset + n - 1)
        return n

    monkeypatch.setattr(shard_writer, "write_computed", corrupting)
    compute = Counted(lambda: torch.ones(4, 8, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"verification.*bytes of tensor 'model\.layers\.0\.mlp\.gate\.weight'"):
        write_patched_checkpoint(src, tmp_path / "out", Patch(drop={R0}, add={R0: ComputedTensor("BF16", (4, 8),
                                                                                                  compute)}))
    assert compute.calls == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["reuse", "full"])
def test_computed_values_are_not_all_alive_at_once(src, tmp_path, monkeypatch, mode):
    """Six 8 MiB computed tensors (numpy-backed, so tracemalloc sees them) written and verified: the writer peaks
    below two of them. The control, computes that keep their results (as an eager `values` dict would), peaks
    at all six: the measurement sees what it must."""
    monkeypatch.setattr(lazy_sources, "CHUNK", 1 << 20)
    size = 2 << 20  # float32 elements: 8 MiB

    def make(i, keep=None):
        def compute():
            t = torch.from_numpy(np.full(size, float(i), dtype=np.float32))
            if keep is not None:
                keep.append(t)
            return t
        return compute

    def peak_of(values, out):
        tracemalloc.start()
        try:
            write_patched_checkpoint(src, out, Patch(add=values), mode=mode, max_shard_size="20MB")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    lazy = {f"computed.{i}": ComputedTensor("F32", (size,), make(i)) for i in range(6)}
    peak = peak_of(lazy, tmp_path / "lazy")
    kept: list[torch.Tensor] = []
    control = peak_of({f"computed.{i}": ComputedTensor("F32", (size,), make(i, kept)) for i in range(6)},
                      tmp_path / "control")
    assert control >= 6 * (8 << 20)
    assert peak < 2 * (8 << 20), f"writer peaked at {peak / 2**20:.1f} MiB of Python memory"
    got = reread(tmp_path / "lazy")
    assert all(torch.equal(got[f"computed.{i}"], torch.full((size,), float(i))) for i in range(6))
    shutil.rmtree(tmp_path / "control")
