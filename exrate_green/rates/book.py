"""The rate book: one table per day, from memory, then disk, then the provider, once.

``peek(day)`` never waits and never does I/O: the reader answers every request whose
table is hot without leaving its loop. ``get(day)`` may wait; concurrent callers for the
same missing day share one load (single-flight), and a failed load is not remembered, so
the next request tries again.
"""

import collections
import logging
import time

import gevent
from gevent.event import AsyncResult
from gevent.pool import Group

from ..errors import RateError, RateUnavailable

log = logging.getLogger("exrate_green.rates")


class RateBook:
    """Tables by day for one provider, with a bounded in-memory front over ``cache``.

    ``ttl_s`` (seconds) bounds the age of every table served, in memory as on disk.
    ``wait_s`` (seconds) bounds how long ``get`` waits for a load in progress.
    """

    def __init__(self, provider, cache, *, ttl_s, wait_s, max_hot=4096, clock=time.time):
        self.provider = provider
        self.cache = cache
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.max_hot = max_hot
        self.clock = clock
        self.hot = collections.OrderedDict()  # day -> RateTable, oldest first
        self.loading = {}  # day -> AsyncResult of the one load in progress
        self.loaders = Group()
        self.memory_hits = 0
        self.api_calls = 0

    def peek(self, day):
        """The table for ``day`` if it is in memory and fresh, else ``None``. Never yields."""
        table = self.hot.get(day)
        if table is not None and self.clock() < table.fetched_at + self.ttl_s:
            self.memory_hits += 1
            return table
        return None

    def get(self, day):
        """The table for ``day``, loading it if needed; ``RateError`` if it cannot be had."""
        table = self.peek(day)
        if table is not None:
            return table
        pending = self.loading.get(day)
        if pending is None:
            pending = self.loading[day] = AsyncResult()
            self.loaders.spawn(self._load, day, pending)
        try:
            return pending.get(timeout=self.wait_s)
        except gevent.Timeout:
            raise RateUnavailable(f"no rate table after {self.wait_s:g} s") from None

    def close(self, timeout=1.0):
        self.loaders.kill(timeout=timeout)

    def _load(self, day, pending):
        try:
            pending.set(self._fetch(day))
        except RateError as e:
            pending.set_exception(e)
        except Exception as e:  # a provider bug must not leave waiters hanging
            log.exception("loading rates for %s failed", day)
            pending.set_exception(RateUnavailable(type(e).__name__))
        finally:
            del self.loading[day]

    def _fetch(self, day):
        cached = self.provider.needs_cache(day)
        table = self.cache.get(self.provider.name, day) if cached else None
        if table is None or self.clock() >= table.fetched_at + self.ttl_s:
            if cached:
                self.api_calls += 1
            table = self.provider.fetch(day)
            if cached:
                self.cache.put(table)
        self._remember(day, table)
        return table

    def _remember(self, day, table):
        self.hot[day] = table
        self.hot.move_to_end(day)
        while len(self.hot) > self.max_hot:
            self.hot.popitem(last=False)
