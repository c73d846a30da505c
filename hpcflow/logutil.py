"""Logging helpers: a peer sending garbage must not be able to flood our logs."""

from __future__ import annotations

import logging
import time


class Throttled:
    """Log at most ``burst`` messages per ``period`` seconds for one kind of event,
    then one summary line with the number suppressed."""

    def __init__(self, log: logging.Logger, period: float = 60.0, burst: int = 10) -> None:
        self.log, self.period, self.burst = log, period, burst
        self.window_start = time.monotonic()
        self.count = 0
        self.suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.window_start > self.period:
            if self.suppressed:
                self.log.warning("(%d similar messages suppressed in the last %.0f s)",
                                 self.suppressed, now - self.window_start)
            self.window_start, self.count, self.suppressed = now, 0, 0
        self.count += 1
        if self.count <= self.burst:
            self.log.warning(msg, *args)
        else:
            self.suppressed += 1
