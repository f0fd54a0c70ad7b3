"""A cache row that is not a rate table: reported as bad, warned about at most once a minute.

Anyone who can write the store can put anything under our keys (docs/cache.md): such a
row is a miss for the service (and deleted), and ``cache list/show/stats`` show it as bad.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

log = logging.getLogger("exrate_green.cache")

#: at most one "bad row" warning per tier this often (s)
WARN_EVERY_S = 60.0


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row under our key ``key`` (``"ecb/2021-05-18"``) that is not a usable table."""

    tier: str
    key: str
    why: str

    @property
    def provider(self) -> str:
        return self.key.rpartition("/")[0] or "?"

    @property
    def day(self) -> str:
        return self.key.rpartition("/")[2][:10]


class BadRowLog:
    """Counts bad rows of one tier (``count``); one warning per ``every_s`` seconds."""

    def __init__(self, tier: str, every_s: float = WARN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tier = tier
        self.every_s = every_s
        self.clock = clock
        self.count = 0
        self._warned_at: float | None = None
        self._unwarned = 0

    def report(self, key: str, why: str) -> None:
        self.count += 1
        now = self.clock()
        if self._warned_at is not None and now - self._warned_at < self.every_s:
            self._unwarned += 1
            return
        more = f"; {self._unwarned} more since the last warning" if self._unwarned else ""
        log.warning("%s cache row %r is not a rate table (%s): treated as a miss and "
                    "deleted (%d bad row(s) so far%s)", self.tier, key[:80], why[:120],
                    self.count, more)
        self._warned_at, self._unwarned = now, 0
