"""Which files belong to a checkpoint: the one rule for names and symbolic links.

A checkpoint is a directory, and nothing outside it may be read or copied on its behalf: a
downloaded checkpoint is untrusted input, and a `README.md -> /etc/shadow` link or an index that
names `../../secret.safetensors` must not carry files from elsewhere into an export that the user
then uploads.

One layout is legitimately made of links that leave the directory: a `huggingface_hub` cache
snapshot (`models--org--name/snapshots/<rev>/`), where every file is a relative symlink into
`models--org--name/blobs/`, and `--local-dir` downloads that link into such a cache. So a link may
resolve

- inside the checkpoint directory itself, or
- to a file in a hub cache blob store (`.../models--*/blobs/<hash>`), the directory the hub client
  writes and nothing else does.

Anything else is outside the checkpoint. Directory links are never followed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# file names the hub client gives blobs: a git sha1 or a sha256 of the content
_BLOB_NAME = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")


def is_plain_name(name: str) -> bool:
    """A file name that stays inside the directory it is joined to: no separator, no '..', not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name) and not re.match(r"^[A-Za-z]:", name))


def is_hub_blob(path: Path) -> bool:
    """True for a resolved path of the form .../models--ORG--NAME/blobs/<hash> (also datasets--, spaces--)."""
    parent = path.parent
    return (parent.name == "blobs" and re.match(r"^(models|datasets|spaces)--", parent.parent.name) is not None
            and _BLOB_NAME.match(path.name) is not None)


def resolve_member(root: Path, path: Path) -> Path | None:
    """The real file `path` (inside checkpoint `root`) stands for, or None when it leaves the checkpoint.

    Returns the resolved path of a regular file that lies inside `root` or is a hub cache blob; None
    for links pointing elsewhere, dangling links and anything that is not a regular file.
    """
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling link, link loop
        return None
    if not real.is_file():
        return None
    # checked for plain files too: a symlinked directory on the way makes a plain-looking path leave root
    real_root = root.resolve()
    if real == real_root or real_root in real.parents or is_hub_blob(real):
        return real
    return None
