"""Throttled progress lines for long work, readable in a terminal and in a log file.

    with Progress("train", total=200, unit="steps") as bar:
        for step in range(200):
            loss = train_step(...)
            bar.update(loss=loss)

writes at most one line every ``every`` seconds to stderr, e.g.
``train 40/200 steps, loss 0.1234 (12.3 s, about 49 s left)``. Work that ends within
``every`` seconds writes nothing; work that wrote a line writes a last one when it ends.

Plain lines, not a redrawn bar: a bar that rewrites itself with carriage returns is one
unreadable line in a log, and ``tqdm(disable=None)`` writes nothing at all when stderr is
not a terminal, which is where long runs (CI, ``nohup``, a job scheduler) are watched.
The values given to ``update`` are formatted only when a line is written, so passing a
jax array costs no device sync on the other steps.

``LORA_JAX_PROGRESS`` sets the default interval in seconds (10 when unset); ``off`` or
``0`` silences every progress line of the library and the examples.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress", "default_every"]

DEFAULT_EVERY_S = 10.0
_OFF = ("off", "0", "false", "no", "none")


def default_every() -> float | None:
    """Seconds between lines from ``LORA_JAX_PROGRESS`` (None: silenced)."""
    raw = os.environ.get("LORA_JAX_PROGRESS", "").strip().lower()
    if not raw:
        return DEFAULT_EVERY_S
    if raw in _OFF:
        return None
    try:
        every = float(raw)
    except ValueError:
        every = math.nan
    if not every > 0:
        raise ValueError(
            f"LORA_JAX_PROGRESS={raw!r}: give the seconds between progress lines (e.g. 10) or 'off' to silence them"
        )
    return every


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        number = float(value)  # a Python or numpy number, or a jax scalar (synced only here)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Progress:
    """Counts work done and writes a line about it at most every ``every`` seconds.

    ``total`` (None when unknown) and ``unit`` go into the count (``40/200 steps``).
    ``every=None`` takes the interval from ``LORA_JAX_PROGRESS``; ``enabled=False`` (or
    ``LORA_JAX_PROGRESS=off``) writes nothing.
    ``clock`` and ``stream`` are for tests; the stream defaults to ``sys.stderr``, looked
    up at each write so redirection and capture work.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        unit: str = "",
        every: float | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ):
        self.desc, self.total, self.unit = desc, total, unit
        if every is not None and not every > 0:
            raise ValueError(f"Progress(every={every!r}): give a positive number of seconds (None: the default)")
        self.every = default_every() if every is None else every
        self.enabled = enabled and self.every is not None
        self.clock, self.stream = clock, stream
        self.n = 0
        self.lines = 0  # lines written so far
        self.start = clock()
        self._last = self.start
        self._first: tuple[int, float] | None = None  # (count, time) at the first update: rates skip the warm-up
        self._info: dict[str, Any] = {}
        self._closed = False

    def due(self) -> bool:
        """Whether the next ``update`` writes a line (to sync work first, e.g. ``jax.block_until_ready``)."""
        return self.enabled and self.clock() - self._last >= self.every

    def update(self, n: int = 1, **info: Any) -> None:
        """Count ``n`` more units done; ``info`` (e.g. ``loss=...``) is shown on the next line."""
        self.n += n
        self._info = info or self._info
        now = self.clock()
        if self._first is None:
            self._first = (self.n, now)
        if self.enabled and now - self._last >= self.every:
            self._write(self._line(now))
            self._last = now

    def close(self, note: str | None = None) -> None:
        """End the work: if a line was written, write a last one with the total time."""
        if self._closed:
            return
        self._closed = True
        if self.lines:
            self._write(self._line(self.clock(), final=note or "done"))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(note="stopped by an error" if exc[0] is not None else None)

    def _line(self, now: float, final: str | None = None) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        head = f"{self.desc} {count}{' ' + self.unit if self.unit else ''}"
        info = ", ".join(f"{k} {_fmt(v)}" for k, v in self._info.items())
        timing = _duration(now - self.start)
        if final is not None:
            timing += f", {final}"
        elif self.total is not None and self._first is not None and self._first[0] < self.n < self.total:
            rate = (self.n - self._first[0]) / max(now - self._first[1], 1e-9)
            timing += f", about {_duration(max(self.total - self.n, 0) / rate)} left"
        return f"{head}{', ' + info if info else ''} ({timing})"

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()
        self.lines += 1
