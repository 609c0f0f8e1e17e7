"""Minimal progress display: a per-batch bar on a terminal, one line per epoch always."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, enabled: bool = True, stream: TextIO | None = None, min_interval_s: float = 0.2
    ) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._t0 = time.monotonic()
        self._total = 0
        self._label = ""

    def start(self, label: str, total: int) -> None:
        self._label = label
        self._total = max(1, int(total))
        self._t0 = time.monotonic()
        self._last = 0.0

    def wants_update(self) -> bool:
        """True when a bar update is due (callers then pay for fetching the loss value)."""
        return self.tty and time.monotonic() - self._last >= self.min_interval_s

    def update(self, done: int, loss: float | None = None) -> None:
        if not self.tty:
            return
        self._last = time.monotonic()
        frac = min(1.0, done / self._total)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = done / max(1e-9, self._last - self._t0)
        extra = f" loss {loss:.4g}" if loss is not None else ""
        self.stream.write(f"\r{self._label} [{bar}] {done}/{self._total} {rate:.1f} it/s{extra}   ")
        self.stream.flush()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
