"""Fetching the Debian packages two corpus domains come from, without installing anything.

``apt-get download`` puts the ``.deb`` into a cache directory and ``dpkg-deb -x`` unpacks it there;
a package unpacked once is never fetched again, so a populated cache makes the build offline.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .documents import CorpusError


def fetch_deb(package: str, cache_dir: Path) -> Path:
    """Download ``package`` with ``apt-get download`` and unpack it (no install).

    Returns the directory the package was extracted into. Cached: a second call
    does not touch the network.
    """
    cache_dir = Path(cache_dir).expanduser()
    root = cache_dir / "debs" / package
    done = root / ".extracted"
    if done.exists():
        return root / "root"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusError(
            f"cannot fetch Debian package {package!r}: apt-get/dpkg-deb not found. The reference corpus "
            "needs a Debian-based system (or a populated cache_dir from a machine that has one)."
        )
    dl = root / "download"
    if dl.exists():
        shutil.rmtree(dl)
    dl.mkdir(parents=True)
    proc = subprocess.run(
        ["apt-get", "download", package], cwd=dl, capture_output=True, text=True, check=False
    )
    debs = sorted(dl.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise CorpusError(
            f"`apt-get download {package}` failed (exit {proc.returncode}). The reference corpus needs "
            f"the Debian package {package!r}: run `apt-get update` (as root) so the package index is "
            "available, and make sure a Debian mirror is reachable. apt-get said:\n"
            + (proc.stderr or proc.stdout).strip()[-2000:]
        )
    extract = root / "root"
    if extract.exists():
        shutil.rmtree(extract)
    proc = subprocess.run(
        ["dpkg-deb", "-x", str(debs[-1]), str(extract)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise CorpusError(f"`dpkg-deb -x {debs[-1].name}` failed: {proc.stderr.strip()}")
    (root / "version").write_text(debs[-1].name + "\n")
    done.write_text("ok\n")
    return extract
