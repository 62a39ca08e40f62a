"""A progress bar on stderr for long population audits: done / total, rate, ETA.

A run over 100,000 patients takes minutes; an operator at a terminal wants to know it is moving and when it will
end. Redirected to a file or a CI log, the same bar would be thousands of carriage-return fragments, so it draws
only when stderr is a terminal (or when told to) and at most a few times a second. No dependency: a dozen lines do.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_MIN_INTERVAL = 0.2  # seconds between redraws
_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """``update(n)`` as work completes, ``close()`` at the end. Draws when ``enabled`` and the stream is a
    terminal (or ``force``); ``clock`` is injectable for tests."""

    def __init__(self, total: int, *, enabled: bool = True, unit: str = "items", stream: TextIO | None = None,
                 force: bool = False, clock: Callable[[], float] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled and (force or (isatty is not None and isatty())))
        self.total = max(0, int(total))
        self.unit = unit
        self.done = 0
        self._clock = clock or time.monotonic
        self._started = self._clock()
        self._drawn = float("-inf")
        self._closed = False

    def line(self) -> str:
        """The bar's current text (no carriage return)."""
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = self.done / elapsed
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(fraction * _WIDTH)
        bar = "#" * filled + "-" * (_WIDTH - filled)
        eta = _duration((self.total - self.done) / rate) if rate > 0 and self.total > self.done else "--:--"
        if self.done >= self.total:
            eta = _duration(elapsed)
        return (f"[{bar}] {self.done}/{self.total} {self.unit} {fraction * 100:5.1f}% "
                f"{rate:,.1f} {self.unit}/s ETA {eta}")

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled or self._closed:
            return
        now = self._clock()
        if now - self._drawn >= _MIN_INTERVAL or self.done >= self.total:
            self._drawn = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
