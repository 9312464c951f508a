"""Seconds spent per phase of a calibration run, per thread kind, for the benchmark's table.

Phases overlap when the next layer is read on the background thread, so their sum is more
than the wall time; `idle` is the main thread waiting for that read (time not hidden)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import Iterator

PHASES = ("read", "dequantise", "convert", "host-to-device", "forward/observe", "state save", "idle")


class Timings:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.bytes_read = 0
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            self.bytes_read = 0


TIMINGS = Timings()  # one calibration per process; the benchmark reads and resets it
