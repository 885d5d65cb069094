"""Putting source bytes into output files as cheaply as the filesystem allows.

Three ways, cheapest first:
- hard link: no bytes at all, but the output file IS the source file (same
  inode). Anyone editing the output file in place edits the source; tools must
  replace such files (write a new file, rename over), never open them for writing.
  We only ever hard-link files we never open for writing.
- reflink (FICLONE): a copy-on-write clone on btrfs, XFS (reflink=1), bcachefs,
  some NFS/SMB servers; no data is written until one of the copies changes, and
  then only the changed blocks. An independent file, safe to edit.
- copy: `os.copy_file_range` (kernel-side copy, no trip through user space),
  falling back to pread/pwrite where the kernel refuses (e.g. across filesystems).

All functions work on raw file descriptors so the caller controls offsets.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import CheckpointError

_FICLONE = 0x40049409  # _IOW(0x94, 9, int), from linux/fs.h
_CHUNK = 64 << 20  # bytes per copy_file_range / pread call
# errnos meaning "this filesystem (pair) cannot do it", as opposed to a real I/O error
_UNSUPPORTED = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS,
                errno.ENOTTY, errno.EPERM, errno.EBADF, errno.ETXTBSY}


def try_reflink(src_fd: int, dst_fd: int) -> bool:
    """Clone all of src into (empty) dst; False if the filesystem cannot."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return True
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int) -> None:
    """Copy `count` bytes from src at src_off to dst at dst_off."""
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
            buf = os.pread(src_fd, min(count, _CHUNK), src_off)
            n = len(buf)
            if n:
                pwrite_all(dst_fd, buf, dst_off)
        if n == 0:
            raise CheckpointError(f"source file ended {count} bytes early while copying (was it truncated "
                                  "while we were reading it?)")
        src_off, dst_off, count = src_off + n, dst_off + n, count - n


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


@contextmanager
def open_for_clone(src: str, dst: str, *, fsync: bool) -> Iterator[tuple[int, int, int]]:
    """Yield (src_fd, new dst_fd, source size); dst must not exist. fsync dst on success, close both."""
    src_fd = os.open(src, os.O_RDONLY)
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


def copy_file(src: str, dst: str, *, fsync: bool) -> str:
    """Make dst an independent copy of src. Returns "reflink" or "copy"."""
    with open_for_clone(src, dst, fsync=fsync) as (src_fd, dst_fd, size):
        if try_reflink(src_fd, dst_fd):
            return "reflink"
        copy_range(src_fd, dst_fd, 0, 0, size)
        return "copy"


def link_or_copy(src: str, dst: str, *, link: str, fsync: bool) -> str:
    """Reuse an unchanged file. link: "auto" (hard link, else copy), "hardlink" (or fail), "copy"."""
    if link in ("auto", "hardlink"):
        try:
            os.link(src, dst)  # follows a symlinked src (HF cache snapshots) to the real file
            return "hardlink"
        except OSError as exc:
            if link == "hardlink":
                raise CheckpointError(
                    f"cannot hard-link {src} -> {dst} ({exc.strerror}); output and source must be on the same "
                    "filesystem and it must allow links: choose an out_dir there, or pass link='copy'") from None
    elif link != "copy":
        raise CheckpointError(f"link={link!r}: expected 'auto', 'hardlink' or 'copy'")
    return copy_file(src, dst, fsync=fsync)
