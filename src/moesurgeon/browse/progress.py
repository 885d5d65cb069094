"""A progress bar in bytes and bytes/s for reading shards (tqdm; silent when disabled or nothing to read)."""

from __future__ import annotations

from tqdm.auto import tqdm


class ByteProgress:
    def __init__(self, total: int, *, enabled: bool, desc: str):
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                         disable=not enabled or total == 0, mininterval=0.5, smoothing=0.1)

    def update(self, n: int) -> None:
        self._bar.update(n)

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
