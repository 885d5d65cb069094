"""Cutting source text into corpus documents of MIN_CHARS..MAX_CHARS characters at natural boundaries.

Every domain reader first splits its text into units (top-level statements, lexicon entries,
fortunes, worksheets) and then packs consecutive units with :func:`pack_units`, so a document never
starts or ends in the middle of a unit unless that unit alone is longer than MAX_CHARS.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Hard bounds on a chunk's length in characters.
MIN_CHARS = 200
MAX_CHARS = 2000


def split_long(unit: str, max_chars: int) -> list[str]:
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
            flat.extend(split_long(u, max_chars))
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
