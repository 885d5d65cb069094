"""The generated ``math`` domain of the reference corpus: seeded arithmetic and structured maths worksheets.

Arithmetic, equations with their steps, gcd/lcm by Euclid, fractions, sequences, factorisations,
powers and remainders, small tables. Written by this project (Apache-2.0 like the rest of it), so it
is the one domain whose size is a parameter rather than a property of a downloaded source.
"""

from __future__ import annotations

import random
from fractions import Fraction

from .chunking import MAX_CHARS, split_long
from .documents import Document

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
            text = split_long(text, MAX_CHARS)[0]
        docs.append(Document(text, "math", f"math-gen/seed{seed}/{stream}#{i}", "Apache-2.0", f"math:{stream}:{i}"))
    return docs
