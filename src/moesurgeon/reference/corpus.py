"""Offline, deterministic, four-domain corpus for the embedded reference MoE.

Domains (names are part of the public data format):

``code``
    Python source of the running interpreter's standard library (tests,
    ``idlelib``, ``tkinter``, ``site-packages``, encoding tables and the
    ``pydoc_data`` help dump are skipped). PSF-2.0.
``english``
    The Jargon File 4.4.7 (Debian package ``jargon-text``). Public domain.
``russian``
    Russian fortune cookies (Debian package ``fortunes-ru``). GPL-2.
``math``
    Arithmetic / structured maths text from :func:`generate_math_documents`
    (this project's own generator, seeded). Apache-2.0 like the project.

Debian packages are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into a cache directory: nothing is installed.

Every document is a chunk of a few hundred to ~2000 characters. The held-out
split is chosen per domain at the level of *source documents* (a whole stdlib
file for ``code``; a chunk of consecutive, globally de-duplicated entries for
``english`` and ``russian``; a whole generated sheet for ``math``), so no text
is shared between the splits.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from . import DOMAINS

#: Hard bounds on a chunk's length in characters.
MIN_CHARS = 200
MAX_CHARS = 2000


class CorpusError(RuntimeError):
    """Raised when a corpus source cannot be obtained or parsed."""


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    #: Where the text comes from, e.g. ``cpython-3.11.7/json/decoder.py`` or ``math-gen``.
    source: str
    #: SPDX-style licence identifier of the text.
    license: str
    #: Split unit: all documents with the same group land in the same split.
    group: str

    def to_json(self) -> dict[str, str]:
        return {"text": self.text, "domain": self.domain, "source": self.source, "license": self.license}


@dataclass(frozen=True)
class SourceInfo:
    domain: str
    name: str
    origin: str
    license: str
    license_note: str


@dataclass
class Corpus:
    train: list[Document]
    heldout: list[Document]
    sources: dict[str, SourceInfo]
    #: Characters of raw text read per domain before chunking/capping.
    raw_chars: dict[str, int] = field(default_factory=dict)

    def domain_docs(self, split: str, domain: str) -> list[Document]:
        docs = self.train if split == "train" else self.heldout
        return [d for d in docs if d.domain == domain]

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for dom in DOMAINS:
            tr = self.domain_docs("train", dom)
            ho = self.domain_docs("heldout", dom)
            out[dom] = {
                "raw_chars": self.raw_chars.get(dom, 0),
                "train_docs": len(tr),
                "train_chars": sum(len(d.text) for d in tr),
                "train_bytes": sum(len(d.text.encode()) for d in tr),
                "heldout_docs": len(ho),
                "heldout_chars": sum(len(d.text) for d in ho),
                "heldout_bytes": sum(len(d.text.encode()) for d in ho),
            }
        return out


# --------------------------------------------------------------------------- chunking


def _split_long(unit: str, max_chars: int) -> list[str]:
    """Split a unit longer than ``max_chars`` at line boundaries (chars as last resort)."""
    if len(unit) <= max_chars:
        return [unit]
    pieces: list[str] = []
    cur: list[str] = []
    cur_len = 0
    for line in unit.split("\n"):
        while len(line) > max_chars:  # pathological long line
            if cur:
                pieces.append("\n".join(cur))
                cur, cur_len = [], 0
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        add = len(line) + (1 if cur else 0)
        if cur and cur_len + add > max_chars:
            pieces.append("\n".join(cur))
            cur, cur_len = [], 0
            add = len(line)
        cur.append(line)
        cur_len += add
    if cur:
        pieces.append("\n".join(cur))
    return [p for p in pieces if p.strip()]


def pack_units(
    units: Iterable[str], sep: str = "\n\n", max_chars: int = MAX_CHARS, min_chars: int = MIN_CHARS
) -> list[str]:
    """Greedily pack consecutive text units into chunks of at most ``max_chars``.

    A short last chunk is merged into its predecessor when it fits; chunks that
    stay shorter than ``min_chars`` are dropped.
    """
    flat: list[str] = []
    for u in units:
        u = u.strip("\n")
        if u.strip():
            flat.extend(_split_long(u, max_chars))
    chunks: list[str] = []
    cur = ""
    for u in flat:
        if not cur:
            cur = u
        elif len(cur) + len(sep) + len(u) <= max_chars:
            cur = cur + sep + u
        else:
            chunks.append(cur)
            cur = u
    if cur:
        if chunks and len(cur) < min_chars and len(chunks[-1]) + len(sep) + len(cur) <= max_chars:
            chunks[-1] = chunks[-1] + sep + cur
        else:
            chunks.append(cur)
    return [c for c in chunks if len(c) >= min_chars]


# --------------------------------------------------------------------------- Debian packages


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


def deb_version(package: str, cache_dir: Path) -> str:
    p = Path(cache_dir).expanduser() / "debs" / package / "version"
    return p.read_text().strip() if p.exists() else package


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


# --------------------------------------------------------------------------- math


def _frac(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _factorize(n: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    d = 2
    while d * d <= n:
        e = 0
        while n % d == 0:
            n //= d
            e += 1
        if e:
            out.append((d, e))
        d += 1
    if n > 1:
        out.append((n, 1))
    return out


def _math_problem(rng: random.Random) -> str:  # noqa: C901 - a flat menu of generators
    kind = rng.randrange(12)
    if kind == 0:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op = rng.choice("+-*")
        res = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a} {op} {b} = {res}"
    if kind == 1:
        b, q = rng.randint(2, 40), rng.randint(2, 99)
        r = rng.randint(0, b - 1)
        a = b * q + r
        return f"{a} / {b} = {q} remainder {r}" if r else f"{a} / {b} = {q}"
    if kind == 2:
        a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(2, 12)
        return f"({a} + {b}) * {c} = {a + b} * {c} = {(a + b) * c}"
    if kind == 3:
        a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
        c = a * x + b
        bs = f"+ {b}" if b >= 0 else f"- {-b}"
        return f"Solve {a}x {bs} = {c}.\n{a}x = {c - b}\nx = {x}"
    if kind == 4:
        g = rng.randint(1, 30)
        a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
        a, b = max(a, b), min(a, b)
        lines = [f"gcd({a}, {b}):"]
        x, y = a, b
        while y:
            lines.append(f"{x} = {x // y} * {y} + {x % y}")
            x, y = y, x % y
        lines.append(f"gcd({a}, {b}) = {x}, lcm({a}, {b}) = {a * b // x}")
        return "\n".join(lines)
    if kind == 5:
        p = Fraction(rng.randint(1, 12), rng.randint(2, 12))
        q = Fraction(rng.randint(1, 12), rng.randint(2, 12))
        op = rng.choice("+-*")
        res = p + q if op == "+" else p - q if op == "-" else p * q
        return f"{_frac(p)} {op} {_frac(q)} = {_frac(res)}"
    if kind == 6:
        a, d, n = rng.randint(-20, 30), rng.randint(-9, 12), rng.randint(5, 8)
        seq = [a + i * d for i in range(n + 1)]
        return f"Arithmetic sequence: {', '.join(map(str, seq[:-1]))}, ... next term {seq[-1]} (difference {d})"
    if kind == 7:
        a, r, n = rng.randint(1, 9), rng.randint(2, 4), rng.randint(4, 7)
        seq = [a * r**i for i in range(n + 1)]
        return f"Geometric sequence: {', '.join(map(str, seq[:-1]))}, ... next term {seq[-1]} (ratio {r})"
    if kind == 8:
        n = rng.randint(12, 5000)
        fs = _factorize(n)
        if len(fs) == 1 and fs[0][1] == 1:
            return f"{n} is prime"
        return f"{n} = " + " * ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in fs)
    if kind == 9:
        b, e = rng.randint(2, 12), rng.randint(2, 6)
        m = rng.randint(3, 17)
        return f"{b}^{e} = {b**e}, {b}^{e} mod {m} = {b**e % m}"
    if kind == 10:
        start, n = rng.randint(1, 20), rng.randint(3, 5)
        rows = ["n | n^2 | n^3"] + [f"{k} | {k * k} | {k**3}" for k in range(start, start + n)]
        return "\n".join(rows)
    xs = [rng.randint(1, 99) for _ in range(rng.randint(3, 6))]
    s = sum(xs)
    mean = Fraction(s, len(xs))
    return f"sum({', '.join(map(str, xs))}) = {s}, mean = {_frac(mean)}, max = {max(xs)}, min = {min(xs)}"


def generate_math_documents(seed: int, n_docs: int, stream: str) -> list[Document]:
    """Generated maths "worksheets", each a few hundred to ~2000 characters.

    ``stream`` separates RNG streams (``"train"`` / ``"heldout"``) so the splits
    never share a worksheet.
    """
    rng = random.Random(f"moesurgeon-math-{seed}-{stream}")
    docs: list[Document] = []
    for i in range(n_docs):
        target = rng.randint(600, 1800)
        numbered = rng.random() < 0.5
        lines = [f"Worksheet {rng.randint(1, 999)}."]
        k = 1
        while sum(len(x) + 2 for x in lines) < target:
            prob = _math_problem(rng)
            lines.append(f"{k}. {prob}" if numbered else prob)
            k += 1
        text = "\n\n".join(lines)
        if len(text) > MAX_CHARS:
            text = _split_long(text, MAX_CHARS)[0]
        docs.append(Document(text, "math", f"math-gen/seed{seed}/{stream}#{i}", "Apache-2.0", f"math:{stream}:{i}"))
    return docs


# --------------------------------------------------------------------------- splitting / assembly


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def split_heldout(docs: Sequence[Document], target_bytes: int, seed: int) -> tuple[list[Document], list[Document]]:
    """Pick whole groups for the held-out split until ``target_bytes`` (UTF-8) is reached."""
    groups: dict[str, list[Document]] = {}
    for d in docs:
        groups.setdefault(d.group, []).append(d)
    names = sorted(groups)
    random.Random(f"moesurgeon-split-{seed}-{docs[0].domain if docs else ''}").shuffle(names)
    chosen: set[str] = set()
    total = 0
    limit = max(target_bytes // 4, 4 * MAX_CHARS)  # avoid one huge file dominating held-out
    for g in names:
        if total >= target_bytes:
            break
        size = sum(_nbytes(d.text) for d in groups[g])
        if size > limit or total + size > int(target_bytes * 1.1):
            continue
        chosen.add(g)
        total += size
    train = [d for d in docs if d.group not in chosen]
    heldout = [d for d in docs if d.group in chosen]
    return train, heldout


SOURCES: dict[str, SourceInfo] = {
    "code": SourceInfo(
        "code",
        "CPython standard library (Lib/*.py of the interpreter that builds the model)",
        "the local Python installation (sysconfig stdlib path); skipped: tests, idlelib, tkinter, "
        "site-packages, encodings, pydoc_data, lib2to3, ensurepip, turtledemo",
        "PSF-2.0",
        "Python Software Foundation License Version 2; copy in LICENSE.PSF-2.0.txt",
    ),
    "english": SourceInfo(
        "english",
        "The Jargon File 4.4.7 (Eric S. Raymond et al.)",
        "Debian package jargon-text (/usr/share/doc/jargon-text/jargon.txt.gz)",
        "LicenseRef-PublicDomain",
        "Public domain by its authors' declaration: \"in the public domain, to be freely used, shared, "
        "and modified\" (cite as \"Jargon File 4.4.7\").",
    ),
    "russian": SourceInfo(
        "russian",
        "fortune-mod-ru, Russian fortune cookies (Pavel Maryanov et al.)",
        "Debian package fortunes-ru (/usr/share/games/fortunes/ru/*)",
        "GPL-2.0-only",
        "GNU GPL version 2; copy in LICENSE.GPL-2.0.txt. Shipped Russian excerpts stay under GPL-2 "
        "and are marked per record (\"license\": \"GPL-2.0-only\").",
    ),
    "math": SourceInfo(
        "math",
        "Generated arithmetic and structured maths text (moesurgeon.reference.corpus.generate_math_documents)",
        "this project's own seeded generator",
        "Apache-2.0",
        "Generated by project code; same licence as the project.",
    ),
}


def build_corpus(
    cache_dir: Path,
    seed: int = 0,
    heldout_bytes: int = 80_000,
    max_chars_per_domain: int | None = None,
    math_train_docs: int = 2000,
) -> Corpus:
    """Assemble the four-domain corpus with a held-out split per domain.

    ``max_chars_per_domain`` caps each real-text domain (for smoke builds);
    ``heldout_bytes`` is the held-out target per domain (UTF-8 bytes of text).
    """
    cache_dir = Path(cache_dir).expanduser()
    jargon_root = fetch_deb("jargon-text", cache_dir)
    ru_root = fetch_deb("fortunes-ru", cache_dir)
    jargon_gz = jargon_root / "usr/share/doc/jargon-text/jargon.txt.gz"
    if not jargon_gz.exists():
        raise CorpusError(f"jargon-text package has no {jargon_gz}")
    with gzip.open(jargon_gz, "rt", encoding="utf-8") as fh:
        jargon = fh.read()

    cap = None if max_chars_per_domain is None else max_chars_per_domain + heldout_bytes
    per_domain: dict[str, list[Document]] = {}
    raw: dict[str, int] = {}
    per_domain["code"], raw["code"] = code_documents(max_chars=cap)
    per_domain["english"], raw["english"] = english_documents(jargon, max_chars=cap)
    per_domain["russian"], raw["russian"] = russian_documents(ru_root / "usr/share/games/fortunes/ru", max_chars=cap)

    train: list[Document] = []
    heldout: list[Document] = []
    for dom in ("code", "english", "russian"):
        tr, ho = split_heldout(per_domain[dom], heldout_bytes, seed)
        if not tr or not ho:
            raise CorpusError(f"domain {dom!r}: empty split (train {len(tr)}, heldout {len(ho)})")
        train += tr
        heldout += ho

    n_math = math_train_docs
    if max_chars_per_domain is not None:
        n_math = max(8, min(n_math, max_chars_per_domain // 1200))
    math_train = generate_math_documents(seed, n_math, "train")
    math_ho: list[Document] = []
    gen = generate_math_documents(seed, max(8, heldout_bytes // 600), "heldout")
    for d in gen:
        if sum(_nbytes(x.text) for x in math_ho) >= heldout_bytes:
            break
        math_ho.append(d)
    raw["math"] = sum(len(d.text) for d in math_train) + sum(len(d.text) for d in math_ho)
    train += math_train
    heldout += math_ho
    return Corpus(train=train, heldout=heldout, sources=dict(SOURCES), raw_chars=raw)


def shipped_train_subset(corpus: Corpus, bytes_per_domain: int, seed: int) -> list[Document]:
    """A deterministic ~``bytes_per_domain`` (UTF-8) sample of each domain's train split."""
    out: list[Document] = []
    for dom in DOMAINS:
        docs = corpus.domain_docs("train", dom)
        idx = list(range(len(docs)))
        random.Random(f"moesurgeon-ship-{seed}-{dom}").shuffle(idx)
        chosen: list[int] = []
        total = 0
        for i in idx:
            if total >= bytes_per_domain:
                break
            chosen.append(i)
            total += _nbytes(docs[i].text)
        out += [docs[i] for i in sorted(chosen)]
    return out


def write_jsonl(docs: Iterable[Document], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def licence_texts() -> dict[str, Path | None]:
    """Licence files to ship next to excerpts/weights (target name -> local source path)."""
    psf = stdlib_dir() / "LICENSE.txt"
    gpl = Path("/usr/share/common-licenses/GPL-2")
    return {
        "LICENSE.PSF-2.0.txt": psf if psf.exists() else None,
        "LICENSE.GPL-2.0.txt": gpl if gpl.exists() else None,
    }


def copy_licences(dest: Path) -> list[str]:
    copied = []
    for name, src in licence_texts().items():
        if src is not None:
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied
