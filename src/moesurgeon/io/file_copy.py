"""Putting source bytes into output files as cheaply as the filesystem allows, without sharing edits.

Three ways to reuse a file:
- reflink (FICLONE): a copy-on-write clone on btrfs, XFS (reflink=1), bcachefs,
  some NFS/SMB servers; no data is written until one of the copies changes, and
  then only the changed blocks. An independent file, safe to edit.
- hard link: no bytes at all, but the output file IS the source file (same
  inode). Anyone editing the output in place (open for writing, `sed -i` on a
  filesystem that does it in place, `safetensors` metadata editors, ...) edits
  the source too.
- copy: `os.copy_file_range` (kernel-side copy, no trip through user space),
  falling back to pread/pwrite where the kernel refuses (e.g. across filesystems).

`link_or_copy` policies (the `link=` option of the patch writer):
- "auto" (default): reflink where the filesystem can; else a hard link ONLY when
  the source file has no write permission bit at all (nobody can edit that shared
  inode in place without first chmod-ing it; root ignores permission bits, as
  always); else a real copy. The source's permissions are never changed.
- "hardlink": always a hard link (fails if impossible). Fast and free on any
  filesystem, but the output shares inodes with the source: an in-place edit of
  either changes both. Only for outputs that are never edited in place.
- "copy": reflink if possible, else a real copy; never shares an inode.

Sources may be symbolic links (a Hugging Face cache snapshot is made of links
into `../../blobs/`): they are resolved first, so the output is always a regular
file (or a hard link to the resolved blob), never a link that would dangle once
the output directory is moved.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import CheckpointError

LINK_MODES = ("auto", "hardlink", "copy")
_FICLONE = 0x40049409  # _IOW(0x94, 9, int), from linux/fs.h
_CHUNK = 64 << 20  # bytes per copy_file_range call (kernel-side: no buffer of ours)
_READ_CHUNK = 16 << 20  # bytes per pread/pwrite where the kernel cannot copy: the only buffer we hold
# errnos meaning "this filesystem (pair) cannot do it", as opposed to a real I/O error
_UNSUPPORTED = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS,
                errno.ENOTTY, errno.EPERM, errno.EBADF, errno.ETXTBSY}
_NO_HARDLINK = _UNSUPPORTED | {errno.EMLINK, errno.EACCES}  # "auto" then copies instead


def try_reflink(src_fd: int, dst_fd: int) -> bool:
    """Clone all of src into (empty) dst; False if the filesystem cannot."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return True
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int, *,
               writeback: bool = False) -> None:
    """Copy `count` bytes from src at src_off to dst at dst_off; `writeback`: start writing each copied
    chunk to disk at once (for a destination that will be fsync-ed, see start_writeback)."""
    use_kernel = hasattr(os, "copy_file_range")
    while count > 0:
        n = 0
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count, _CHUNK), src_off, dst_off)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                use_kernel = False
        if not use_kernel:
            buf = os.pread(src_fd, min(count, _READ_CHUNK), src_off)
            n = len(buf)
            if n:
                pwrite_all(dst_fd, buf, dst_off)
        if n == 0:
            raise CheckpointError(f"source file ended {count} bytes early while copying (was it truncated "
                                  "while we were reading it?)")
        if writeback:
            start_writeback(dst_fd, dst_off, n)
        src_off, dst_off, count = src_off + n, dst_off + n, count - n


def _sync_file_range():
    """libc's sync_file_range (Linux; Python's os module does not expose it), or None where there is none."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        _SYNC_FILE_RANGE = False
        try:
            func = ctypes.CDLL(None, use_errno=True).sync_file_range
            func.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            _SYNC_FILE_RANGE = func
        except (AttributeError, OSError):
            pass
    return _SYNC_FILE_RANGE or None


_SYNC_FILE_RANGE = None
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the dirty pages in the range, do not wait


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing [offset, offset+count) of fd to disk now, without waiting.

    For a file that will be fsync-ed: the disk then writes while we copy the next tensors instead of
    all at the final fsync, which then finds most pages clean. Where the call is missing or refused it
    is skipped (the fsync still makes the file durable)."""
    func = _sync_file_range() if count > 0 else None
    if func is not None:
        func(fd, offset, count, _SYNC_FILE_RANGE_WRITE)  # an error only means no early start: ignored


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def open_regular(path: str, *, follow_symlinks: bool = True) -> int:
    """Open path read-only and return the fd, refusing anything that is not a regular file.

    O_NONBLOCK keeps a FIFO from blocking the open (it has no effect on regular
    files); checking the OPENED file closes the race of a file swapped between a
    stat and the open.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file (mode {stat.filemode(mode)}); "
                              "only regular files are read from a checkpoint")
    return fd


@contextmanager
def open_for_clone(src: str, dst: str, *, fsync: bool,
                   follow_symlinks: bool = True) -> Iterator[tuple[int, int, int]]:
    """Yield (src_fd, new dst_fd, source size); dst must not exist. fsync dst on success, close both."""
    src_fd = open_regular(src, follow_symlinks=follow_symlinks)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            yield src_fd, dst_fd, os.fstat(src_fd).st_size
            if fsync:
                os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def copy_file(src: str, dst: str, *, fsync: bool, follow_symlinks: bool = True) -> str:
    """Make dst an independent copy of src. Returns "reflink" or "copy"."""
    with open_for_clone(src, dst, fsync=fsync, follow_symlinks=follow_symlinks) as (src_fd, dst_fd, size):
        if try_reflink(src_fd, dst_fd):
            return "reflink"
        copy_range(src_fd, dst_fd, 0, 0, size, writeback=fsync)
        return "copy"


def has_no_write_bits(st: os.stat_result) -> bool:
    """True when no one (owner, group, other) may write the file without chmod-ing it first."""
    return st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) == 0


def resolve_source(src: str) -> str:
    """The real file behind src (symlinks resolved), so links and copies never point at a link."""
    try:
        return os.path.realpath(src, strict=True)
    except OSError as exc:
        raise CheckpointError(f"cannot reuse {src}: {exc.strerror} (a dangling link into a deleted cache "
                              "blob?); re-download the file") from None


def link_or_copy(src: str, dst: str, *, link: str, fsync: bool) -> str:
    """Reuse an unchanged file at dst. Returns "reflink", "hardlink" or "copy" (see the module docstring)."""
    if link not in LINK_MODES:
        raise CheckpointError(f"link={link!r}: expected 'auto', 'hardlink' or 'copy'")
    # Resolve first: on Linux os.link(symlink, dst) links the symlink itself, which then dangles
    # (relative target) in the output directory.
    real = resolve_source(src)
    if link == "hardlink":
        try:
            os.link(real, dst)
            return "hardlink"
        except OSError as exc:
            raise CheckpointError(
                f"cannot hard-link {real} -> {dst} ({exc.strerror}); output and source must be on the same "
                "filesystem and it must allow links: choose an out_dir there, or pass link='copy'") from None
    with open_for_clone(real, dst, fsync=fsync) as (src_fd, dst_fd, size):
        if try_reflink(src_fd, dst_fd):
            return "reflink"
        share = link == "auto" and has_no_write_bits(os.fstat(src_fd))
        if not share:
            copy_range(src_fd, dst_fd, 0, 0, size, writeback=fsync)
            return "copy"
    # read-only source on a filesystem without reflinks: sharing the inode costs nothing and nobody
    # can edit it in place by accident
    os.unlink(dst)
    try:
        os.link(real, dst)
        return "hardlink"
    except OSError as exc:
        if exc.errno not in _NO_HARDLINK:
            raise
    return copy_file(real, dst, fsync=fsync)


_FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)


def reflink_works(src: str, dst_dir: str | os.PathLike) -> bool:
    """Whether src can be reflinked into a new file in dst_dir: one cheap probe, no data written.

    Clones only the first block (FICLONERANGE) where the file has one, so probing a
    multi-GB shard costs no more than probing a small file; the probe file is removed.
    """
    try:
        src_fd = open_regular(src)
    except (OSError, CheckpointError):
        return False
    try:
        try:
            dst_fd, probe = tempfile.mkstemp(prefix=".moesurgeon-reflink-probe-", dir=dst_dir)
        except OSError:
            return False
        try:
            block = os.fstat(src_fd).st_blksize
            if os.fstat(src_fd).st_size >= block > 0:
                arg = struct.pack("qQQQ", src_fd, 0, block, 0)
                try:
                    fcntl.ioctl(dst_fd, _FICLONERANGE, arg)
                    return True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: block not the clone unit, try the whole file
                        return False
            return try_reflink(src_fd, dst_fd)
        except OSError:
            return False
        finally:
            os.close(dst_fd)
            os.unlink(probe)
    finally:
        os.close(src_fd)
