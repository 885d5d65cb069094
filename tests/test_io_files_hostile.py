"""Exports from real-world, hostile or failing file systems: hub snapshots, links, FIFOs, kills, full disks.

Every checkpoint here is built in tmp_path; "outside" files are our own files next to it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_io import make_checkpoint

from moesurgeon.io import CheckpointError, CheckpointReader, Patch, write_patched_checkpoint
from moesurgeon.io import output_checks
from moesurgeon.io import patch_writer as writer_module
from moesurgeon.io.atomic_dir import check_output_location, estimate_reuse_bytes, stale_temp_dirs
from moesurgeon.io.file_copy import link_or_copy
from moesurgeon.io.stale_temp import remove_stale_temp_dirs

R0 = "model.layers.0.mlp.gate.weight"
S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def symlinks_under(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_symlink()]


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def hub_snapshot(tmp_path: Path, checkpoint: Path) -> Path:
    """Turn a checkpoint into a huggingface_hub cache: blobs named by sha256, a snapshot of relative links."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("0123abcd" * 5)
    blobs.mkdir(parents=True)
    for f in sorted(checkpoint.rglob("*")):
        if f.is_file():
            blob = blobs / digest(f)
            if not blob.exists():
                shutil.copyfile(f, blob)
            link = snap / f.relative_to(checkpoint)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


@pytest.fixture
def src(tmp_path):
    return make_checkpoint(tmp_path / "src")


@pytest.fixture
def outside(tmp_path):
    """A private file that does not belong to any checkpoint (our stand-in for /etc/shadow)."""
    secret = tmp_path / "outside" / "shadow"
    secret.parent.mkdir()
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    return secret


# -- hub cache snapshots and the link policy ------------------------------------------------------------

@pytest.mark.parametrize("link", ["auto", "hardlink", "copy"])
def test_hub_snapshot_export_contains_no_symlinks(tmp_path, src, link):
    snap = hub_snapshot(tmp_path, src)
    out = tmp_path / "out"
    report = write_patched_checkpoint(snap, out, Patch(replace={R0: torch.zeros(4, 8, dtype=torch.bfloat16)}),
                                      link=link)
    assert symlinks_under(out) == []
    for shard in (S2, S3):  # reused: byte-identical to the blob, and a hard link only to the blob itself
        assert digest(out / shard) == digest(src / shard)
        same_inode = os.stat(out / shard).st_ino == os.stat(snap / shard).st_ino  # stat follows to the blob
        if link == "hardlink":
            assert report.reuse_method[shard] == "hardlink" and same_inode
        else:  # blobs are writable files: auto copies (or reflinks) them
            assert report.reuse_method[shard] in ("copy", "reflink") and not same_inode
    assert torch.equal(CheckpointReader(out).get(R0), torch.zeros(4, 8, dtype=torch.bfloat16))
    assert sorted(report.files_copied) == ["extra/notes.txt", "tokenizer.json"] and report.files_skipped == []
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_link_or_copy_resolves_a_symlinked_source(tmp_path):
    real = tmp_path / "blobs" / "data"
    real.parent.mkdir()
    real.write_bytes(b"shard bytes")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "shard").symlink_to("../blobs/data")
    (tmp_path / "dst").mkdir()
    for mode in ("hardlink", "copy", "auto"):
        dst = tmp_path / "dst" / mode
        link_or_copy(str(tmp_path / "snap" / "shard"), str(dst), link=mode, fsync=False)
        assert not dst.is_symlink() and dst.read_bytes() == b"shard bytes"
        assert (dst.stat().st_ino == real.stat().st_ino) == (mode == "hardlink")


def test_default_link_does_not_share_a_writable_source(tmp_path, src):
    out = tmp_path / "out"
    report = write_patched_checkpoint(src, out, Patch())
    for shard in (S1, S2, S3):
        assert report.reuse_method[shard] in ("copy", "reflink")
        assert os.stat(out / shard).st_ino != os.stat(src / shard).st_ino
    before = digest(src / S2)
    with open(out / S2, "r+b") as f:  # an in-place edit of the export ...
        f.write(b"\0" * 8)
    assert digest(src / S2) == before  # ... leaves the source alone


def test_default_link_hard_links_a_read_only_source(tmp_path, src):
    for shard in (S1, S2, S3):
        os.chmod(src / shard, 0o444)
    report = write_patched_checkpoint(src, tmp_path / "out", Patch(replace={R0: torch.ones(4, 8).bfloat16()}))
    assert report.reuse_method == {S1: "copy+patch", S2: "hardlink", S3: "hardlink"}
    assert os.stat(tmp_path / "out" / S2).st_ino == os.stat(src / S2).st_ino
    assert report.bytes_written_tensors == (src / S1).stat().st_size
    assert all(stat.S_IMODE(os.stat(src / s).st_mode) == 0o444 for s in (S1, S2, S3))  # never chmod-ed


def test_read_only_source_on_another_filesystem_is_copied(tmp_path, src):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem at /dev/shm")
    os.chmod(src / S3, 0o444)
    out = Path(shm / f"moesurgeon-test-{os.getpid()}")
    try:
        report = write_patched_checkpoint(src, out, Patch(), fsync=False)
        assert report.reuse_method[S3] == "copy" and digest(out / S3) == digest(src / S3)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# -- sidecars: links, special files, stray weights ------------------------------------------------------

def test_readme_linking_outside_is_not_exported(tmp_path, src, outside, caplog):
    (src / "README.md").symlink_to(outside)
    (src / "LICENSE").symlink_to(os.path.relpath(outside, src))
    with caplog.at_level(logging.WARNING, logger="moesurgeon"):
        report = write_patched_checkpoint(src, tmp_path / "out", Patch())
    assert not (tmp_path / "out" / "README.md").exists() and not (tmp_path / "out" / "LICENSE").exists()
    assert report.files_skipped == ["LICENSE", "README.md"]
    reason = report.skip_reasons["README.md"]
    assert str(outside) in reason and "outside the checkpoint" in reason
    assert sum("README.md" in r.getMessage() for r in caplog.records) == 1  # logged once
    exported = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not any(b"secret-hash" in p.read_bytes() for p in exported)


def test_symlinked_directory_is_not_followed(tmp_path, src):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (src / "assets").symlink_to(home, target_is_directory=True)
    report = write_patched_checkpoint(src, tmp_path / "out", Patch())
    assert not (tmp_path / "out" / "assets").exists()
    assert "assets" in report.files_skipped and "directory links are never followed" in report.skip_reasons["assets"]
    assert str(home) in report.skip_reasons["assets"]


def test_link_to_a_file_inside_the_checkpoint_is_exported_as_a_regular_file(tmp_path, src):
    (src / "templates").mkdir()
    (src / "templates" / "chat.jinja").write_text("{{ messages }}")
    (src / "chat_template.jinja").symlink_to("templates/chat.jinja")
    report = write_patched_checkpoint(src, tmp_path / "out", Patch())
    exported = tmp_path / "out" / "chat_template.jinja"
    assert not exported.is_symlink() and exported.read_text() == "{{ messages }}"
    assert "chat_template.jinja" in report.files_copied and report.files_skipped == []


def test_subdirectory_weights_skipped_unless_asked_for(tmp_path, src):
    (src / "original").mkdir()
    (src / "original" / "consolidated.safetensors").write_bytes(b"unpatched weights")
    (src / "original" / "params.json").write_text("{}")
    report = write_patched_checkpoint(src, tmp_path / "out", Patch())
    assert not (tmp_path / "out" / "original" / "consolidated.safetensors").exists()
    assert report.files_skipped == ["original/consolidated.safetensors"]
    assert "include_subdir_weights=True" in report.skip_reasons["original/consolidated.safetensors"]
    assert "original/params.json" in report.files_copied
    report = write_patched_checkpoint(src, tmp_path / "out2", Patch(), include_subdir_weights=True)
    assert (tmp_path / "out2" / "original" / "consolidated.safetensors").read_bytes() == b"unpatched weights"
    assert report.files_skipped == []


def test_fifo_sidecar_is_skipped_without_hanging(tmp_path, src):
    os.mkfifo(src / "events.pipe")
    report = write_patched_checkpoint(src, tmp_path / "out", Patch())
    assert not os.path.lexists(tmp_path / "out" / "events.pipe")
    assert report.skip_reasons == {"events.pipe": "a FIFO"}


def test_config_json_linking_outside_is_refused(tmp_path, src, outside):
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match=rf"config\.json is a symbolic link to {outside}.*outside"):
        write_patched_checkpoint(src, tmp_path / "out", Patch())
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# -- killed exports and their temporary directories ----------------------------------------------------

KILLED_EXPORT = r"""
import os, signal, sys
from moesurgeon.io import Patch, atomic_dir, patch_writer, write_patched_checkpoint

point, src, out = sys.argv[1:4]

def die():
    print("killing myself at", point, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

real_link, real_move = patch_writer.link_or_copy, atomic_dir._move_into_place

def link_then_maybe_die(*args, **kwargs):
    if point == "before_write":
        die()
    method = real_link(*args, **kwargs)
    if point == "after_shard":
        die()
    return method

def move_or_die(*args):
    if point == "before_rename":
        die()
    return real_move(*args)

patch_writer.link_or_copy, atomic_dir._move_into_place = link_then_maybe_die, move_or_die
write_patched_checkpoint(src, out, Patch(), link="copy")
print("finished without being killed", flush=True)
"""


@pytest.mark.parametrize("point", ["before_write", "after_shard", "before_rename"])
def test_killed_export_leftover_is_removed_by_the_next_export(tmp_path, src, point, caplog):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, point, str(src), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert f"killing myself at {point}" in proc.stdout
    stale = sorted(tmp_path.glob(".out.tmp-*"))
    assert len(stale) == 1 and not out.exists()
    assert (stale[0] / S1).exists() == (point != "before_write")
    assert stale_temp_dirs(out) == stale
    with caplog.at_level(logging.WARNING, logger="moesurgeon"):
        write_patched_checkpoint(src, out, Patch())
    assert not leftovers(tmp_path) and CheckpointReader(out).shards() == [S1, S2, S3]
    removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(removed) == 1 and str(stale[0]) in removed[0] and "bytes" in removed[0]


LIVE_EXPORT = r"""
import sys
from moesurgeon.io.atomic_dir import atomic_output_dir

with atomic_output_dir(sys.argv[1], overwrite=False, fsync=False) as tmp:
    (tmp / "partial.safetensors").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    sys.stdin.readline()  # hold the directory until the test lets go (or kills us)
"""


def test_temp_dir_of_a_live_export_is_left_alone(tmp_path, src):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", LIVE_EXPORT, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        live = Path(proc.stdout.readline().strip())
        assert live.name.startswith(".out.tmp-") and live.is_dir()
        assert stale_temp_dirs(out) == []
        write_patched_checkpoint(src, out, Patch())  # another export of the same out_dir, meanwhile
        assert (live / "partial.safetensors").exists(), "a running export's directory was deleted"
    finally:
        proc.kill()
        proc.wait()
    assert stale_temp_dirs(out) == [live]  # the owner is dead now: its lock is gone
    assert remove_stale_temp_dirs(out) == [(live, 1000)] and not live.exists()


# -- write errors become explained CheckpointErrors ---------------------------------------------------

def _fail_new_shard(code, text):
    def failing(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(code, text)
    return failing


def _fail_link(code, text):
    def failing(src, dst, **kwargs):
        raise OSError(code, text, dst)
    return failing


@pytest.mark.parametrize("target, failure, match", [
    ("write_shard", _fail_new_shard(errno.ENOSPC, "No space left on device"),
     r"No space left on device \(ENOSPC\).*nothing was published.*bytes free.*free more than that"),
    ("link_or_copy", _fail_link(errno.EROFS, "Read-only file system"),
     r"failed at .*\.safetensors: Read-only file system \(EROFS\).*read-only filesystem; choose an out_dir"),
    ("link_or_copy", _fail_link(errno.EDQUOT, "Disk quota exceeded"),
     r"\(EDQUOT\).*quota"),
], ids=["ENOSPC", "EROFS", "EDQUOT"])
def test_write_errors_are_explained_and_nothing_is_published(tmp_path, src, monkeypatch, target, failure, match):
    monkeypatch.setattr(writer_module, target, failure)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match) as info:
        write_patched_checkpoint(src, out, Patch(add={"extra": torch.ones(4)}))
    assert str(out) in str(info.value)
    assert not out.exists() and not leftovers(tmp_path)


def test_disk_full_message_says_how_much_to_free(tmp_path, monkeypatch):
    from moesurgeon.io.atomic_dir import atomic_output_dir

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(output_checks.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"\(ENOSPC\).*1000 bytes free.*needs up to 5000 bytes, so free at "
                                              r"least 4000 bytes"):
        with atomic_output_dir(out, overwrite=False, fsync=False, needed_bytes=5000) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "half.safetensors"))
    assert not out.exists() and not leftovers(tmp_path)


FSIZE_LIMITED_EXPORT = r"""
import resource, signal, sys
import torch
from moesurgeon.io import CheckpointError, Patch, write_patched_checkpoint

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    write_patched_checkpoint(sys.argv[1], sys.argv[2], Patch(add={"big": torch.zeros(50000)}), fsync=False)
except CheckpointError as exc:
    print(exc)
    sys.exit(3)
"""


def test_file_size_limit_gives_the_ulimit_message(tmp_path, src):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", FSIZE_LIMITED_EXPORT, str(src), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "(EFBIG)" in proc.stdout and "larger than 20000 bytes (RLIMIT_FSIZE)" in proc.stdout
    assert "ulimit -f" in proc.stdout and str(out) in proc.stdout
    assert not out.exists() and not leftovers(tmp_path)


# -- preflight ------------------------------------------------------------------------------------------

def test_preflight_refuses_before_any_work(tmp_path, src, monkeypatch):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(CheckpointError, match=rf"{out} already exists; pass export\.overwrite=true"):
        check_output_location(out, overwrite=False, option_names={"overwrite": "export.overwrite=true"})
    check_output_location(out, overwrite=True)  # fine with overwrite
    with pytest.raises(CheckpointError, match=r"inside the source checkpoint"):
        check_output_location(src / "patched", source_dir=src, overwrite=False)
    with pytest.raises(CheckpointError, match=r"is inside out_dir .*would delete it"):
        check_output_location(tmp_path, source_dir=src, overwrite=True)

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(output_checks.os, "access",
                        lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    with pytest.raises(CheckpointError, match=rf"{locked} is not writable by this user"):
        check_output_location(locked / "a" / "b", overwrite=False)
    with pytest.raises(CheckpointError, match=rf"{locked} is not writable"):  # the writer calls it first
        write_patched_checkpoint(src, locked / "out", Patch())
    assert list(locked.iterdir()) == []

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(output_checks.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"needs up to 5000 bytes .* has only 1000 bytes .* free at least "
                                              r"4000 bytes"):
        check_output_location(tmp_path / "new", overwrite=False, needed_bytes=5000)
    check_output_location(tmp_path / "new", overwrite=False, needed_bytes=1000)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_preflight_unwritable_parent_by_permission_bits(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    with pytest.raises(CheckpointError, match=rf"{parent} is not writable by this user"):
        check_output_location(parent / "out", overwrite=False)


def test_estimate_reuse_bytes_follows_the_link_policy(tmp_path, src, monkeypatch):
    shards = [src / s for s in (S1, S2, S3)]
    total = sum(p.stat().st_size for p in shards)
    monkeypatch.setattr(output_checks, "reflink_works", lambda *a: False)  # ext4-like
    assert estimate_reuse_bytes(shards, tmp_path / "out", "copy") == total
    assert estimate_reuse_bytes(shards, tmp_path / "out", "hardlink") == 0
    os.chmod(shards[0], 0o444)  # auto hard-links read-only files on the same filesystem
    assert estimate_reuse_bytes(shards, tmp_path / "a" / "b", "auto") == total - shards[0].stat().st_size
    monkeypatch.setattr(output_checks, "reflink_works", lambda *a: True)  # btrfs/XFS-like
    assert estimate_reuse_bytes(shards, tmp_path / "out", "copy") == 0
    with pytest.raises(CheckpointError, match="link='symlink'"):
        estimate_reuse_bytes(shards, tmp_path, "symlink")
