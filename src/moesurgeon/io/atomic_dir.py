"""Create an output directory all at once, or not at all.

Everything is written into a hidden temporary sibling of the target
(`.{name}.tmp-XXXX`, same parent, hence same filesystem, so the final
`rename` is atomic and hard links to a source on that filesystem work). Only
when the body finished without error is it renamed into place; on any
exception it is deleted. A crashed process (kill -9, power loss) can leave a
`.{name}.tmp-*` directory behind, but never a partial `out_dir`.

With overwrite=True an existing target is renamed aside first, the new
directory renamed in, then the old one deleted: readers see either the whole
old or the whole new directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError


def check_not_nested(source_dir: Path, out_dir: Path) -> None:
    """Refuse out_dir inside (or equal to) source_dir, and source_dir inside out_dir.

    The first would copy the output into itself and modify the source dir; the
    second would delete the source when overwrite=True replaces out_dir.
    """
    src, out = source_dir.resolve(), out_dir.resolve()
    if out == src or src in out.parents:
        raise CheckpointError(f"out_dir {out_dir} is inside the source checkpoint {source_dir}; the source is "
                              "never modified: choose an out_dir outside it (e.g. a sibling directory)")
    if out in src.parents:
        raise CheckpointError(f"the source checkpoint {source_dir} is inside out_dir {out_dir}; replacing "
                              "out_dir would delete it: choose another out_dir")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes out_dir when the with-block succeeds."""
    out = Path(out_dir).absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"out_dir {out} already exists; pass overwrite=True to replace it, "
                              "or choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes a private 0700 dir; the output must be readable like any directory the user creates
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if fsync:
            fsync_dir(tmp)
        _move_into_place(tmp, out, overwrite)
        if fsync:
            fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)  # fails (ENOTEMPTY/EEXIST) rather than clobber a dir someone created meanwhile
        return
    if not overwrite:
        raise CheckpointError(f"out_dir {out} appeared while we were writing; not replacing it")
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
