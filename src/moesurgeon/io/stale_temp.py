"""Temporary output directories that know whether their owner is still alive.

`atomic_output_dir` writes into a hidden sibling `.{name}.tmp-XXXX` and, when
replacing an existing output, renames the old one to `.{name}.old-XXXX` before
deleting it. A process killed meanwhile (kill -9, OOM killer, a lost node)
leaves such a directory behind, possibly gigabytes of shard copies.

Ownership is an exclusive `flock` on the directory itself, held by the writing
process for as long as it uses the directory. The kernel drops the lock when the
process dies, however it dies, so "the lock can be taken" means "nobody is using
it": such siblings are removed by the next export to the same out_dir, and a
directory whose lock is held (an export running right now) is left alone.

Where a filesystem cannot lock directories (some NFS setups) nothing is ever
deemed stale: `stale_temp_dirs` finds nothing there and leftovers must be
deleted by hand. The lock lives on the inode, so it survives the final rename,
and a directory is never published with a lock FILE in it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("moesurgeon")

_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}


def lock_dir(path: Path) -> int | None:
    """Open path and take an exclusive non-blocking flock on it.

    Returns the fd (closing it releases the lock), or None when another process
    holds the lock or the directory is gone. Raises OSError when the filesystem
    cannot lock directories.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _BUSY:
            return None
        raise
    return fd


def _lock_or_skip(path: Path) -> int | None:
    """lock_dir, with "cannot lock here" (unknown owner, so treat as live) turned into None."""
    try:
        return lock_dir(path)
    except OSError as exc:
        log.debug("cannot flock %s (%s); it is never deemed stale", path, exc.strerror)
        return None


def still_at(fd: int, path: Path) -> bool:
    """Whether path still names the directory open as fd (not deleted or replaced by another process)."""
    try:
        st, here = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _candidates(out: Path) -> list[Path]:
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    try:
        names = sorted(os.listdir(out.parent))
    except OSError:
        return []
    return [out.parent / n for n in names
            if n.startswith(prefixes) and (out.parent / n).is_dir() and not (out.parent / n).is_symlink()]


def stale_temp_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Leftover `.NAME.tmp-*` / `.NAME.old-*` siblings of out_dir whose owning process is gone."""
    out = Path(out_dir).absolute()
    stale = []
    for path in _candidates(out):
        fd = _lock_or_skip(path)
        if fd is not None:
            os.close(fd)
            stale.append(path)
    return stale


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under path (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def remove_stale_temp_dirs(out_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """Delete the stale siblings of out_dir (see `stale_temp_dirs`); returns [(path, bytes freed)].

    Each is deleted while holding its lock, so two exports cleaning at once do not
    trip over each other, and a live export's directory is never touched.
    """
    out = Path(out_dir).absolute()
    removed = []
    for path in _candidates(out):
        fd = _lock_or_skip(path)
        if fd is None:
            if path.exists():
                log.info("leaving %s alone: a running export holds its lock (or this filesystem cannot "
                         "lock directories)", path)
            continue
        try:
            size = tree_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        if path.exists():
            log.warning("could not fully remove the stale temporary directory %s; delete it by hand", path)
            continue
        log.warning("removed %s (%d bytes), left behind by an export of %s that did not finish",
                    path, size, out)
        removed.append((path, size))
    return removed
