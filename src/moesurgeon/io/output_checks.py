"""Where an export may go: checked before any long work, and explained when the disk says no.

`check_output_location` runs first and fails in milliseconds on what would
otherwise fail after minutes of copying: an existing out_dir, out_dir and source
nested in each other, an ancestor the user cannot write, too little free space.

`explain_write_error` turns the raw OSErrors of a write that failed anyway (disk
full, read-only filesystem, file-size limit, permissions, quota) into a
CheckpointError that names the path, says what the errno means and what to do.

Messages name options through `option_names`, so a caller with its own option
syntax (e.g. a Hydra layer: `export.overwrite=true`) gets messages in that syntax.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import CheckpointError
from .file_copy import LINK_MODES, has_no_write_bits, reflink_works

DEFAULT_OPTION_NAMES = {"overwrite": "overwrite=True", "out_dir": "out_dir",
                        "max_shard_size": "max_shard_size"}
WRAPPED_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


def _names(option_names: Mapping[str, str] | None) -> dict[str, str]:
    return {**DEFAULT_OPTION_NAMES, **(option_names or {})}


def check_not_nested(source_dir: Path, out_dir: Path, name: str = "out_dir") -> None:
    """Refuse out_dir inside (or equal to) source_dir, and source_dir inside out_dir.

    The first would copy the output into itself and modify the source dir; the
    second would delete the source when overwrite=True replaces out_dir.
    """
    src, out = Path(source_dir).resolve(), Path(out_dir).resolve()
    if out == src or src in out.parents:
        raise CheckpointError(f"{name} {out_dir} is inside the source checkpoint {source_dir}; the source is "
                              f"never modified: choose an {name} outside it (e.g. a sibling directory)")
    if out in src.parents:
        raise CheckpointError(f"the source checkpoint {source_dir} is inside {name} {out_dir}; replacing "
                              f"{name} would delete it: choose another {name}")


def nearest_existing(path: Path) -> Path:
    """path itself or its closest ancestor that exists (what mkdir -p would create under)."""
    path = Path(path).absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output_location(out_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                          overwrite: bool, needed_bytes: int | None = None,
                          option_names: Mapping[str, str] | None = None) -> None:
    """Raise CheckpointError now if writing out_dir is bound to fail later (see the module docstring)."""
    names = _names(option_names)
    out = Path(out_dir).absolute()
    if source_dir is not None:  # first: "already exists" would be true, but the wrong advice
        check_not_nested(Path(source_dir), out, names["out_dir"])
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"{names['out_dir']} {out} already exists; pass {names['overwrite']} to replace it, "
                              "or choose a new directory")
    base = nearest_existing(out.parent)
    if not base.is_dir():
        raise CheckpointError(f"cannot create {names['out_dir']} {out}: {base} is a file, not a directory; "
                              "choose another out_dir")
    if not os.access(base, os.W_OK | os.X_OK):
        if _read_only_fs(base):
            raise CheckpointError(f"cannot create {names['out_dir']} {out}: {base} is on a read-only filesystem; "
                                  "choose an out_dir on a writable filesystem")
        raise CheckpointError(f"cannot create {names['out_dir']} {out}: {base} is not writable by this user "
                              f"(uid {os.geteuid()}); choose an out_dir under a directory you can write, "
                              "or fix that directory's permissions")
    if needed_bytes:
        free = shutil.disk_usage(base).free
        if free < needed_bytes:
            also = " (the old out_dir is deleted only after the new one is complete)" if out.exists() else ""
            raise CheckpointError(
                f"{names['out_dir']} {out} needs up to {needed_bytes} bytes ({needed_bytes / 1e9:.2f} GB) but the "
                f"filesystem of {base} has only {free} bytes ({free / 1e9:.2f} GB) free{also}; free at least "
                f"{needed_bytes - free} bytes there, or choose an out_dir on another filesystem")


def estimate_reuse_bytes(shard_paths: Iterable[str | os.PathLike], out_dir_parent: str | os.PathLike,
                         link: str) -> int:
    """Worst-case bytes a reuse export writes to put these (unchanged) files under out_dir_parent.

    0 for files that will be hard-linked (link="hardlink", or "auto" with a source
    that has no write bits on the same filesystem); 0 for all when one reflink
    probe into out_dir_parent's filesystem succeeds; else their total size.
    """
    if link not in LINK_MODES:
        raise CheckpointError(f"link={link!r}: expected 'auto', 'hardlink' or 'copy'")
    if link == "hardlink":
        return 0
    base = nearest_existing(Path(out_dir_parent))
    out_dev = os.stat(base).st_dev
    to_copy: list[tuple[str, int]] = []
    for path in shard_paths:
        real = os.path.realpath(path)
        st = os.stat(real)
        if link == "auto" and has_no_write_bits(st) and st.st_dev == out_dev:
            continue
        to_copy.append((real, st.st_size))
    if not to_copy or reflink_works(to_copy[0][0], base):
        return 0
    return sum(size for _, size in to_copy)


def _errno_name(code: int | None) -> str:
    return errno.errorcode.get(code, str(code)) if code is not None else "?"


def explain_write_error(exc: OSError, out: Path, *, written: int = 0, needed_bytes: int | None = None,
                        option_names: Mapping[str, str] | None = None) -> CheckpointError | None:
    """A CheckpointError explaining exc (raised while writing out), or None for errnos we cannot explain."""
    if exc.errno not in WRAPPED_ERRNOS:
        return None
    names = _names(option_names)
    base = nearest_existing(out.parent)
    path = exc.filename or base
    at = f" at {exc.filename}" if exc.filename else ""
    head = (f"writing {names['out_dir']} {out} failed{at}: {exc.strerror or os.strerror(exc.errno)} "
            f"({_errno_name(exc.errno)}); nothing was published")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(base).free  # the partial output is already deleted: this is the real room
        need = (f"this export needs up to {needed_bytes} bytes, so free at least {max(needed_bytes - free, 1)} bytes"
                if needed_bytes else f"it had written {written} bytes when it failed, so free more than that")
        what = "Your disk quota there is used up" if exc.errno == errno.EDQUOT else "The filesystem is full"
        return CheckpointError(f"{head}. {what} ({free} bytes free on the filesystem of {base}); {need} "
                               "there, or choose an out_dir on another filesystem")
    if exc.errno == errno.EROFS:
        return CheckpointError(f"{head}. {base} is on a read-only filesystem; choose an out_dir on a writable "
                               "filesystem (or remount it read-write)")
    if exc.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            return CheckpointError(
                f"{head}. This process may not write files larger than {limit} bytes (RLIMIT_FSIZE); raise "
                "the limit before starting (`ulimit -f unlimited`, or above the largest shard), or lower "
                f"{names['max_shard_size']} (reused shards keep their source size)")
        return CheckpointError(f"{head}. The filesystem of {base} cannot hold a file this large (e.g. FAT32 "
                               f"stops at 4 GiB); choose an out_dir on another filesystem or lower "
                               f"{names['max_shard_size']}")
    return CheckpointError(f"{head}. The export needs write access to {base} and read access "
                           f"to the source files; fix the permissions of {path}, or choose another out_dir")
