"""Readers for the three real-text domains of the reference corpus: ``code``, ``english``, ``russian``.

``code``
    Python source of the running interpreter's standard library (tests,
    ``idlelib``, ``tkinter``, ``site-packages``, encoding tables and the
    ``pydoc_data`` help dump are skipped). PSF-2.0.
``english``
    The Jargon File 4.4.7 (Debian package ``jargon-text``). Public domain.
``russian``
    Russian fortune cookies (Debian package ``fortunes-ru``). GPL-2.

Each reader returns ``(documents, raw characters read)``; its documents' ``group`` is the unit the
held-out split picks whole (a stdlib file; a chunk of consecutive, globally de-duplicated entries).
"""

from __future__ import annotations

import re
import sys
import sysconfig
import textwrap
from pathlib import Path

from .chunking import pack_units
from .documents import CorpusError, Document

# --------------------------------------------------------------------------- code

_CODE_SKIP_DIRS = {
    "test", "tests", "idle_test", "idlelib", "tkinter", "site-packages", "dist-packages",
    "__pycache__", "ensurepip", "encodings", "pydoc_data", "lib2to3", "turtledemo",
}
_CODE_SKIP_PREFIXES = ("config-",)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_tag() -> str:
    v = sys.version_info
    return f"cpython-{v.major}.{v.minor}.{v.micro}"


def _code_units(src: str) -> list[str]:
    """Split a module at blank lines followed by a top-level statement."""
    lines = [ln.rstrip() for ln in src.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    units: list[list[str]] = [[]]
    for i, ln in enumerate(lines):
        if ln and not ln[0].isspace() and i > 0 and not lines[i - 1] and units[-1]:
            units.append([])
        units[-1].append(ln)
    return ["\n".join(u).strip("\n") for u in units if any(x.strip() for x in u)]


def code_documents(root: Path | None = None, max_chars: int | None = None) -> tuple[list[Document], int]:
    root = Path(root) if root is not None else stdlib_dir()
    tag = python_tag()
    files = sorted(
        p for p in root.rglob("*.py")
        if not (set(p.relative_to(root).parts[:-1]) & _CODE_SKIP_DIRS)
        and not p.relative_to(root).parts[0].startswith(_CODE_SKIP_PREFIXES)
        and not p.name.startswith("test_")
    )
    if not files:
        raise CorpusError(f"no Python files found under {root}")
    docs: list[Document] = []
    raw = 0
    for p in files:
        try:
            src = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        raw += len(src)
        rel = p.relative_to(root).as_posix()
        for i, chunk in enumerate(pack_units(_code_units(src), sep="\n\n")):
            docs.append(Document(chunk, "code", f"{tag}/Lib/{rel}#{i}", "PSF-2.0", f"code:{rel}"))
        if max_chars is not None and raw >= max_chars:
            break
    return docs, raw


# --------------------------------------------------------------------------- english

_ENTRY_RE = re.compile(r"^:[^:\n]+:")


def english_documents(jargon_txt: str, max_chars: int | None = None) -> tuple[list[Document], int]:
    """Chunk the Jargon File: prose chapters, lexicon entries and appendices."""
    text = jargon_txt.replace("\r\n", "\n")
    # Skip the front table of contents: start at the second "Welcome" heading.
    starts = [m.start() for m in re.finditer(r"^ *Welcome to the Jargon File *$", text, flags=re.M)]
    if len(starts) < 2:
        raise CorpusError("unexpected Jargon File layout (welcome heading not found twice)")
    text = text[starts[1]:]
    raw = len(text)
    paras = [textwrap.dedent(p).strip() for p in re.split(r"\n[ \t]*\n", text)]
    paras = [p for p in paras if p]

    # Drop tables of contents: runs of >= 3 consecutive one-line short paragraphs.
    def is_short(p: str) -> bool:
        return "\n" not in p and len(p) < 60 and not _ENTRY_RE.match(p)

    keep = [True] * len(paras)
    i = 0
    while i < len(paras):
        if is_short(paras[i]):
            j = i
            while j < len(paras) and is_short(paras[j]):
                j += 1
            if j - i >= 3:
                for k in range(i, j):
                    keep[k] = False
            i = j
        else:
            i += 1
    paras = [p for p, k in zip(paras, keep) if k]

    # Group paragraphs into entries (a lexicon entry starts with ":term:").
    entries: list[str] = []
    cur: list[str] = []
    for p in paras:
        if _ENTRY_RE.match(p) and cur:
            entries.append("\n\n".join(cur))
            cur = []
        cur.append(p)
    if cur:
        entries.append("\n\n".join(cur))

    docs: list[Document] = []
    total = 0
    for i, chunk in enumerate(pack_units(entries, sep="\n\n")):
        docs.append(Document(chunk, "english", f"jargon-file-4.4.7#{i}", "LicenseRef-PublicDomain", f"english:{i}"))
        total += len(chunk)
        if max_chars is not None and total >= max_chars:
            break
    return docs, raw


# --------------------------------------------------------------------------- russian


def _norm_key(s: str) -> str:
    return re.sub(r"\W+", " ", s.lower()).strip()


def russian_documents(fortune_dir: Path, max_chars: int | None = None) -> tuple[list[Document], int]:
    """Russian fortunes: de-duplicated globally, consecutive fortunes packed into chunks."""
    fortune_dir = Path(fortune_dir)
    files = sorted(
        p for p in fortune_dir.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    )
    if not files:
        raise CorpusError(f"no fortune files under {fortune_dir}")
    seen: set[str] = set()
    docs: list[Document] = []
    raw = 0
    total = 0
    for p in files:
        text = p.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        raw += len(text)
        fortunes: list[str] = []
        for f in re.split(r"^%\s*$", text, flags=re.M):
            f = "\n".join(ln.rstrip().replace("\t", "    ") for ln in f.strip("\n").split("\n")).strip("\n")
            if not f.strip() or "\ufffd" in f or not re.search("[а-яА-ЯёЁ]", f):
                continue
            key = _norm_key(f)
            if key in seen:
                continue
            seen.add(key)
            fortunes.append(f)
        for i, chunk in enumerate(pack_units(fortunes, sep="\n\n")):
            docs.append(
                Document(chunk, "russian", f"fortunes-ru/{p.name}#{i}", "GPL-2.0-only", f"russian:{p.name}:{i}")
            )
            total += len(chunk)
        if max_chars is not None and total >= max_chars:
            break
    return docs, raw
