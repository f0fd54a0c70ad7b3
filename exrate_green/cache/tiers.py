"""The cache the rate book holds: disk, then Redis, searched top-down, written to all.

The in-memory front for hot tables is the rate book's; below it ``TieredCache`` searches
the disk tier (always on), then the Redis tier (when ``REDIS_URL`` is set). A table found
in a lower tier is copied into the tiers above it in the background (the lookup does not
wait for that write). ``flight`` is single-flight across processes (``flight.py``).

Time bounds, for callers adding up budgets: ``get`` takes at most the disk tier's
``wait_s`` plus the Redis tier's ``deadline_s``; ``put``/``put_many`` write the tiers
side by side, so at most the larger of the two; ``flight`` takes at most one Redis
``deadline_s`` on entry and one on exit.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import gevent
from gevent.pool import Group

from ..rates.table import RateTable
from .disk import TableCache
from .flight import Flights
from .redis import RedisTier

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger("exrate_green.cache")


class TieredCache:
    """``disk`` (a ``TableCache``) over ``redis`` (a ``RedisTier`` or None).

    Every entry is kept ``ttl_s + stale_s`` seconds after its table's ``fetched_at`` in
    every tier; ``get`` returns any kept table and the caller judges freshness.
    ``flight_ttl_s``: how long a Redis flight lock outlives a holder that died (seconds).
    ``hits`` and ``misses`` count ``get`` calls over all tiers; each tier keeps its own.
    """

    #: copies into upper tiers in progress at once; past it a copy is skipped (a saving)
    max_copies = 64

    def __init__(self, disk: TableCache, redis: RedisTier | None = None, *,
                 flight_ttl_s: float = 15.0):
        self.disk = disk
        self.redis = redis
        #: seconds a table is fresh, and kept beyond that (the disk tier's; Redis's agree)
        self.ttl_s = disk.ttl_s
        self.stale_s = disk.stale_s
        self.tiers = [disk] + ([redis] if redis is not None else [])
        self.flights = Flights(disk.directory, redis, ttl_s=flight_ttl_s)
        self.hits = 0
        self.misses = 0
        self._copies = Group()  # copies into upper tiers, nobody waits for them
        self._writers = Group()  # lower tiers' writes of a put, joined by the put

    # -- life cycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Open the disk tier (Redis connects on first use)."""
        self.disk.open()

    def close(self) -> None:
        """Finish (briefly) the copies in progress, then close every tier. Idempotent."""
        self._copies.join(timeout=1.0)
        for group in (self._copies, self._writers):
            group.kill(timeout=1.0)
        for tier in self.tiers:
            tier.close()

    # -- the rate book's interface -------------------------------------------------------

    def get(self, provider: str, day: datetime.date) -> RateTable | None:
        """Any kept table of ``provider`` for ``day``, searching disk then Redis; a Redis
        hit is copied to disk. None when no tier holds one (or every tier failed)."""
        for depth, tier in enumerate(self.tiers):
            table = tier.get(provider, day)
            if table is not None:
                self.hits += 1
                if depth:
                    self._copy_up(table, self.tiers[:depth])
                return table
        self.misses += 1
        return None

    def put(self, table: RateTable) -> bool:
        """Write ``table`` to every tier at once; True if at least one tier kept it."""
        return self.put_many([table]) == 1

    def put_many(self, tables: Iterable[RateTable]) -> int:
        """Write ``tables`` (e.g. a month of days) to every tier, each tier in one trip,
        the tiers side by side; returns how many tables the best tier kept."""
        tables = list(tables)
        if not tables:
            return 0
        writers = [self._writers.spawn(tier.put_many, tables) for tier in self.tiers[1:]]
        written = [self.tiers[0].put_many(tables)]
        gevent.joinall(writers)
        written += [w.value or 0 for w in writers]
        return max(written)

    def flight(self, provider: str, key: str) -> contextlib.AbstractContextManager[bool]:
        """Cross-process single-flight for one table (``key`` "2021-05-18") or one month
        ("2021-05"): yields True when this process should fetch, False when another
        process holds the flight (poll ``get`` until the table appears or the budget runs
        out). Never waits for the other process. See ``Flights.flight``."""
        return self.flights.flight(provider, key)

    # -- what the service and the CLI read ------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True while the disk tier works (Redis is optional and comes and goes)."""
        return self.disk.enabled

    @property
    def errors(self) -> int:
        """Failed lookups and writes over every tier (each also counted as a miss)."""
        return sum(tier.errors for tier in self.tiers)

    def tier_counts(self) -> dict:
        """``{tier name: (hits, misses)}`` of this process's lookups, disk first (a failed
        lookup is a miss; ``tier.errors`` counts failures)."""
        return {tier.name: (tier.hits, tier.misses) for tier in self.tiers}

    def entries(self) -> list:
        """Rows of every kept table in every tier (see each tier's ``entries``); may block,
        raises ``CacheError``: for the CLI and tests, not the service's path."""
        return [row for tier in self.tiers for row in tier.entries()]

    # -- below ---------------------------------------------------------------------------

    def _copy_up(self, table, tiers):
        if len(self._copies) >= self.max_copies:
            return
        for tier in tiers:
            self._copies.spawn(tier.put, table)


def open_cache(settings: Settings) -> TieredCache:
    """The tiered cache ``settings`` describe, disk opened: ``cache_dir`` kept for
    ``cache_ttl_s + stale_if_error_s``, and Redis when ``redis_url`` is set."""
    disk = TableCache(settings.cache_dir, settings.cache_ttl_s,
                      stale_s=settings.stale_if_error_s)
    redis = None
    if settings.redis_url:
        redis = RedisTier(settings.redis_url, settings.cache_ttl_s,
                          stale_s=settings.stale_if_error_s, verify=settings.redis_verify)
    cache = TieredCache(disk, redis, flight_ttl_s=settings.http_timeout_s + 15)
    cache.open()
    log.info("rate cache: disk at %s%s", disk.directory,
             f", Redis at {redis.where}" if redis is not None else " (no REDIS_URL: no Redis tier)")
    return cache
