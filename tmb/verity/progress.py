"""A dependency-free progress bar on stderr, shown only on a terminal and only for long operations."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - unreachable


class Progress:
    """``label [#####-----]  50%  1.0 GiB / 2.0 GiB  900.0 MiB/s``, redrawn in place with ``\\r``.

    Nothing is drawn unless the stream is a terminal (or ``enabled=True``) and the operation has run for
    ``delay`` seconds, so quick runs and redirected output stay clean. Thread-safe.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        delay: float = 2.0,
        width: int = 30,
    ) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.delay = delay
        self.width = width
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.drawn = False
        self.done = 0
        self._lock = threading.Lock()

    def update(self, done: int, total: int | None = None) -> None:
        """Set the absolute amount done (bytes)."""
        with self._lock:
            self.done = done
            if total is not None:
                self.total = max(total, 1)
            self._maybe_draw()

    def advance(self, amount: int) -> None:
        with self._lock:
            self.done += amount
            self._maybe_draw()

    def _maybe_draw(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        elapsed = now - self.start
        if elapsed < self.delay or (now - self.last_draw < 0.1 and self.done < self.total):
            return
        self.last_draw = now
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * self.width)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        line = (
            f"\r{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {frac * 100:3.0f}%  "
            f"{human_bytes(self.done)} / {human_bytes(self.total)}  {human_bytes(rate)}/s "
        )
        self.stream.write(line)
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """Finish the line (only if something was drawn)."""
        with self._lock:
            if self.drawn:
                self.stream.write("\n")
                self.stream.flush()
                self.drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
