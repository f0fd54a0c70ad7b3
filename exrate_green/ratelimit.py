"""One rate-limited logger for every warning that can repeat: at most one line per
interval, each saying how many were held back since the last one.

During an outage the same warning would otherwise come once per request or per fetch;
a drain (and a human) needs one line a minute with a count, not thousands. Never a
traceback: the line says what happened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Logs through ``logger`` at most once per ``every_s`` seconds (per instance).

    Two ways to use it:

    * ``warning(msg, *args)`` (or ``log(level, ...)``): a free-form line; a suppressed one
      is counted, and the next written one ends with ``(N more since the last line)``.
    * ``hit(detail)``: one occurrence of the event ``what``; written as
      ``"<what> (<n> since the last report, <m> in all): <detail>"`` at ``level``.

    Each returns True when a line was written. ``clock``: monotonic seconds.
    """

    def __init__(self, logger: logging.Logger, every_s: float = 60.0, *, what: str = "",
                 level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every_s = every_s
        self.what = what
        self.level = level
        self.clock = clock
        self.total = 0  # occurrences since start
        self.reports = 0  # lines written
        self.suppressed = 0  # held back since the last written line
        self._last_at: float | None = None

    def due(self) -> bool:
        """True if a line written now would not be suppressed."""
        return self._last_at is None or self.clock() - self._last_at >= self.every_s

    def log(self, level: int, msg: str, *args: object) -> bool:
        self.total += 1
        if not self.due():
            self.suppressed += 1
            return False
        if self.suppressed:
            msg = f"{msg} ({self.suppressed} more since the last line)"
        self._written()
        self.logger.log(level, msg, *args)
        return True

    def warning(self, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def hit(self, detail: str = "") -> bool:
        """Count one occurrence of ``what``; log it if the interval allows."""
        self.total += 1
        self.suppressed += 1
        if not self.due():
            return False
        since = self.suppressed
        self._written()
        self.logger.log(self.level, "%s (%d since the last report, %d in all)%s", self.what,
                        since, self.total, f": {detail}" if detail else "")
        return True

    def _written(self) -> None:
        self._last_at, self.suppressed = self.clock(), 0
        self.reports += 1
