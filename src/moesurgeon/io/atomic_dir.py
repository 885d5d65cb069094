"""Create an output directory all at once, or not at all.

Everything is written into a hidden temporary sibling of the target
(`.{name}.tmp-XXXX`, same parent, hence same filesystem, so the final
`rename` is atomic and hard links to a source on that filesystem work). Only
when the body finished without error is it renamed into place; on any
exception it is deleted. A crashed process (kill -9, power loss) can leave a
`.{name}.tmp-*` directory behind, but never a partial `out_dir`; the writing
process holds a lock on it (see `stale_temp`), so the next export to the same
out_dir knows the owner is gone, removes it and logs the bytes freed.

With overwrite=True an existing target is renamed aside first, the new
directory renamed in, then the old one deleted: readers see either the whole
old or the whole new directory.

OSErrors that have a clear cause and fix (disk full, quota, read-only
filesystem, file-size limit, permissions) come out as CheckpointError with that
explanation (`output_checks.explain_write_error`); others propagate unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError
from .output_checks import check_not_nested, check_output_location, estimate_reuse_bytes, explain_write_error
from .stale_temp import lock_dir, remove_stale_temp_dirs, stale_temp_dirs, still_at, tree_bytes

# the output-location API lives here for callers, whichever module implements it
__all__ = ["atomic_output_dir", "check_not_nested", "check_output_location", "estimate_reuse_bytes", "fsync_dir",
           "remove_stale_temp_dirs", "stale_temp_dirs"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool, fsync: bool = True,
                      needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes out_dir when the with-block succeeds.

    needed_bytes (optional) only improves the message when the disk fills up.
    """
    out = Path(out_dir).absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"out_dir {out} already exists; pass overwrite=True to replace it, "
                              "or choose a new directory")
    tmp: Path | None = None
    lock_fd: int | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out)
        tmp, lock_fd = _make_locked_tmp(out)
        yield tmp
        if fsync:
            fsync_dir(tmp)
        _move_into_place(tmp, out, overwrite)
        if fsync:
            fsync_dir(out.parent)
    except BaseException as exc:
        written = 0
        if tmp is not None:
            written = tree_bytes(tmp) if isinstance(exc, OSError) else 0
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op once tmp was renamed into place
        if isinstance(exc, OSError):
            wrapped = explain_write_error(exc, out, written=written, needed_bytes=needed_bytes)
            if wrapped is not None:
                raise wrapped from exc
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _make_locked_tmp(out: Path) -> tuple[Path, int | None]:
    """mkdtemp a sibling of out and lock it; (path, lock fd or None where the filesystem cannot lock)."""
    umask = os.umask(0)
    os.umask(umask)
    for _ in range(5):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            fd = lock_dir(tmp)
        except OSError:
            fd = None  # cannot lock here: unowned leftovers are then never removed automatically
        else:
            if fd is None or not still_at(fd, tmp):
                # another export's cleanup took the new directory for a stale one in the instant
                # between mkdtemp and our lock: take a fresh name
                if fd is not None:
                    os.close(fd)
                continue
        # mkdtemp makes a private 0700 dir; the output must be readable like any directory the user creates
        os.chmod(tmp, 0o777 & ~umask)
        return tmp, fd
    raise CheckpointError(f"could not create a temporary directory beside {out}: it kept disappearing "
                          "(is something else deleting hidden directories there?)")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)  # fails (ENOTEMPTY/EEXIST) rather than clobber a dir someone created meanwhile
        return
    if not overwrite:
        raise CheckpointError(f"out_dir {out} appeared while we were writing; not replacing it")
    # Lock the old output BEFORE renaming it aside: the lock follows the inode, so another export's
    # cleanup never deletes `.old-*` while we may still need to put it back.
    old_fd = None
    if out.is_dir() and not out.is_symlink():
        try:
            old_fd = lock_dir(out)
            if old_fd is None:
                raise CheckpointError(f"another export is replacing out_dir {out} right now; not replacing "
                                      "it as well: retry when that one has finished")
        except OSError:
            old_fd = None  # filesystem cannot lock directories
    try:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)  # only reserved a unique name
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # put the previous output back
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    finally:
        if old_fd is not None:
            os.close(old_fd)
