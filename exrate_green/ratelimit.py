"""One rate-limited logger for every warning that can repeat: at most one line per
interval, each saying how many were held back since the last one.

During an outage the same warning would otherwise come once per request or per fetch;
a drain (and a human) needs one line a minute with a count, not thousands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Logs through ``logger`` at most once per ``every_s`` seconds (per instance).

    ``warning(msg, *args)`` returns True when the line was written; a suppressed line is
    counted, and the next written one ends with ``(N more since the last line)``.
    """

    def __init__(self, logger: logging.Logger, every_s: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self.suppressed = 0  # held back since the last written line
        self._last_at: float | None = None

    def due(self) -> bool:
        """True if a line written now would not be suppressed."""
        return self._last_at is None or self.clock() - self._last_at >= self.every_s

    def log(self, level: int, msg: str, *args: object) -> bool:
        if not self.due():
            self.suppressed += 1
            return False
        if self.suppressed:
            msg = f"{msg} ({self.suppressed} more since the last line)"
        self._last_at, self.suppressed = self.clock(), 0
        self.logger.log(level, msg, *args)
        return True

    def warning(self, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, msg, *args)

    def info(self, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, msg, *args)
