"""A cache row that is not a rate table: reported as bad, warned about at most once a minute.

Anyone who can write the store can put anything under our keys (docs/cache.md): such a
row is a miss for the service (and deleted), and ``cache list/show/stats`` show it as bad.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from ..ratelimit import RateLimitedLog

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
        self.count = 0
        self._log = RateLimitedLog(log, every_s, clock=clock)

    def report(self, key: str, why: str) -> None:
        self.count += 1
        self._log.warning("%s cache row %r is not a rate table (%s): treated as a miss and "
                          "deleted (%d bad row(s) so far)", self.tier, key[:80], why[:120],
                          self.count)
