"""The rate book: tables by (provider, day), from memory, then the cache, then the providers.

``peek(day)`` never waits and never does I/O: the reader answers every request whose table
is hot without leaving its loop. ``get(day)`` waits at most ``wait_s`` (the fetch budget
``EXRATE_HTTP_TIMEOUT`` plus ``WAIT_MARGIN_S``) for its table, counted from when the fetch
that brings it starts: queueing behind other cold fetches is back-pressure, not failure
(the service bounds how many requests wait, and the breaker ends a queue facing a dead
API). A caller that holds a stale table does not queue: past ``wait_s`` from its call it
gets the stale table.

For each provider of the chain, in order: a fresh table in memory answers; else the first
caller for that (provider, day) looks in the cache (bounded by ``CACHE_READ_BUDGET_S``)
while later callers wait for it; a fresh cached table answers, else the provider's lane
fetches it (one job per day or month, shared by every caller). If the fetch fails, or the
breaker is open, or the wait runs out, a stale table still held (fetched less than
``ttl_s + stale_s`` ago) answers: ECB and apilayer never revise a past day, so it is the
right answer, not a guess. Only then does the next provider of the chain get its turn, and
only when no provider can answer does the caller get the first provider's error.

A currency missing from a provider's table is looked up in the next provider's table for
the same day (``currency=`` on ``peek``/``get``).
"""

from __future__ import annotations

import collections
import datetime
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult

from ..errors import DateOutOfRange, RateError, RateUnavailable
from .breaker import CircuitBreaker
from .lane import ProviderLane, RateCache
from .table import RateTable, check_not_before_first_day

if TYPE_CHECKING:
    from .providers import Provider

log = logging.getLogger("exrate_green.rates")

#: a request waits at most the fetch budget plus this (s): the cache read before the
#: fetch and the scheduling around it. Documented in docs/rates.md.
WAIT_MARGIN_S = 1.0
#: longest wait for one cache read before a fetch (s); a slower cache is a miss
CACHE_READ_BUDGET_S = 0.5
#: tables kept in memory (days x providers); a month fetch adds a whole month
MAX_HOT = 16_384
#: at most one "serving stale rates" log line per provider this often (s)
STALE_LOG_INTERVAL_S = 60.0


class _Lookup:
    """The one cache lookup in progress for a (provider, day): ``done`` gets a table (found
    fresh) or the ``Job`` fetching it; ``held`` is a stale table to fall back on;
    ``unread`` is True when the cache was not read (the day joined a job already under way,
    e.g. its month's) and must be read for a stale table if that job fails."""

    def __init__(self, held: RateTable | None):
        self.held = held
        self.unread = False
        self.done = AsyncResult()


class RateBook:
    """Tables by day from a chain of providers, with a bounded in-memory front over ``cache``.

    ``providers``: the chain, in order of preference (one provider is a chain of one).
    ``cache``: ``get(provider, day)`` (any kept table, fresh or stale),
    ``put_many(tables)`` and ``flight(provider, key)`` (cross-process single-flight).
    ``ttl_s``: seconds a table is fresh after its ``fetched_at``. ``stale_s``: seconds
    beyond that it may still answer while its provider fails (0: never).
    ``http_timeout_s``: one fetch's budget; ``wait_s`` (default ``http_timeout_s +
    WAIT_MARGIN_S``) bounds every ``get``. ``concurrency``: fetcher greenlets per provider.
    ``clock``: epoch seconds (freshness, breakers).

    ``lanes`` maps provider name to its ``ProviderLane`` (counters and breaker, for metrics).
    """

    def __init__(self, providers: Provider | Sequence[Provider], cache: RateCache, *,
                 ttl_s: float, stale_s: float = 0.0,
                 http_timeout_s: float = 5.0, wait_s: float | None = None,
                 concurrency: int = 8, max_hot: int = MAX_HOT,
                 clock: Callable[[], float] = time.time) -> None:
        providers = providers if isinstance(providers, Sequence) else [providers]
        self.cache = cache
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self.wait_s = http_timeout_s + WAIT_MARGIN_S if wait_s is None else wait_s
        self.max_hot = max_hot
        self.clock = clock
        self.hot: collections.OrderedDict = collections.OrderedDict()  # (provider, day) -> table
        self.lookups: dict = {}  # (provider, day) -> _Lookup in progress
        self.lanes = {p.name: ProviderLane(
            p, cache, concurrency=concurrency, budget_s=http_timeout_s, clock=clock,
            on_tables=self._remember_all, fresh=self._fresh,
            breaker=CircuitBreaker(p.name, clock=clock))
            for p in providers}
        self.memory_hits = 0
        self.slow_cache_reads = 0  # cache reads that ran out of CACHE_READ_BUDGET_S
        self._stale_logged_at: dict = {}
        self._fallback_logged_at: dict = {}
        self._slow_logged_at = float("-inf")

    @property
    def provider(self) -> Provider:
        """The first provider of the chain."""
        return next(iter(self.lanes.values())).provider

    @property
    def api_calls(self) -> int:
        """HTTP requests sent to every provider (retries included)."""
        return sum(lane.attempts for lane in self.lanes.values())

    @property
    def fetches(self) -> int:
        """Fetches made (one per day or month fetched, however many attempts it took)."""
        return sum(lane.fetches for lane in self.lanes.values())

    @property
    def stale_served(self) -> int:
        return sum(lane.stale_served for lane in self.lanes.values())

    # -- the reader's side: never yields --------------------------------------------------

    def peek(self, day: datetime.date, currency: str | None = None) -> RateTable | None:
        """A table for ``day`` in memory that needs no lookup, else ``None``. Never yields,
        no I/O.

        Providers are taken in chain order: a fresh table answers (with ``currency``: if it
        quotes it, else the next provider is asked); a provider whose breaker is open
        answers with a stale table it holds (stale-if-error), or is skipped when it holds
        none. A provider with nothing fresh and a closed breaker needs a lookup: ``None``.
        If no provider quotes ``currency``, the first table (its ``rate`` says so), unless
        a provider was skipped (``get`` may find its table in the cache).
        """
        first, skipped = None, False
        now = self.clock()
        for name, lane in self.lanes.items():
            table = self.hot.get((name, day))
            fresh = table is not None and now < table.fetched_at + self.ttl_s
            if not fresh:
                if lane.breaker.is_closed or lane.breaker.retry_in_s() <= 0:
                    return None
                if not self._usable(table):
                    skipped = True
                    continue
            assert table is not None  # fresh, or stale and usable
            if currency is None or currency in table.rates:
                self.memory_hits += 1
                if not fresh:
                    self._served_stale(lane, table, "its breaker is open")
                return table
            first = first or table
        if skipped and currency is not None:
            return None
        if first is not None:
            self.memory_hits += 1
        return first

    # -- the waiting side -----------------------------------------------------------------

    def get(self, day: datetime.date, currency: str | None = None) -> RateTable:
        """The table for ``day`` (one that quotes ``currency`` if a provider has one),
        waiting at most ``wait_s``; a ``RateError`` with ``.reason`` if none can be had."""
        table = self.peek(day, currency)
        if table is not None:
            return table
        check_not_before_first_day(day)
        deadline = time.monotonic() + self.wait_s
        found, failure = None, None
        for lane in self.lanes.values():
            try:
                table = self._from_lane(lane, day, deadline)
            except DateOutOfRange:
                raise
            except RateError as e:
                failure = failure or e
                continue
            if currency is None or currency in table.rates:
                if failure is not None:
                    self._log_fallback(lane, day, failure)
                return table
            found = found or table
        if found is not None and failure is None:
            return found  # no provider quotes the currency: rate() says so
        raise failure or RateUnavailable("no rate provider configured")

    def close(self, timeout: float = 1.0) -> None:
        for lane in self.lanes.values():
            lane.close(timeout)

    # -- one provider ---------------------------------------------------------------------

    def _from_lane(self, lane: ProviderLane, day, deadline: float) -> RateTable:
        key = (lane.name, day)
        table = self.hot.get(key)
        if table is not None and self._fresh(table):
            return table
        started = time.monotonic()
        lookup = self.lookups.get(key)
        if lookup is None:
            lookup = self._look_up(lane, day, table if self._usable(table) else None)
        try:
            found = lookup.done.get(timeout=max(deadline - time.monotonic(), 0))
        except gevent.Timeout:
            return self._stale_or_raise(lane, lookup, day, deadline, RateUnavailable(
                f"the cache did not answer for {day} within {time.monotonic() - started:.1f} s"))
        except DateOutOfRange:
            raise
        except RateError as e:
            return self._stale_or_raise(lane, lookup, day, deadline, e)
        if isinstance(found, RateTable):
            return found
        try:
            tables = found.done.get(timeout=self._job_wait_s(found, lookup, deadline))
        except gevent.Timeout:
            return self._stale_or_raise(lane, lookup, day, deadline,
                                        lane.late(found, time.monotonic() - started))
        except DateOutOfRange:
            raise
        except RateError as e:
            return self._stale_or_raise(lane, lookup, day, deadline, e)
        table = tables.get(day)
        if table is None:
            return self._stale_or_raise(lane, lookup, day, deadline, RateUnavailable(
                f"{lane.name} answered without the rates of {day}"))
        return table

    def _job_wait_s(self, job, lookup: _Lookup, deadline: float) -> float:
        """How long (s) to wait for ``job``'s tables: until ``wait_s`` after the job's
        fetch started, however long it queued; a caller with a stale table to fall back
        on keeps its own ``deadline`` instead (it has an answer, the queue can wait)."""
        if lookup.held is None:
            job.started.wait()  # our turn (or the job's end): back-pressure, not failure
        if lookup.held is None and job.started_at is not None:
            deadline = max(deadline, job.started_at + self.wait_s)
        return max(deadline - time.monotonic(), 0)

    def _look_up(self, lane: ProviderLane, day, held: RateTable | None) -> _Lookup:
        """Start the one lookup of ``day`` at ``lane``: read the cache in this greenlet
        (bounded), then hand the day to the lane. Returns the lookup, resolved."""
        key = (lane.name, day)
        lookup = self.lookups[key] = _Lookup(held)
        try:
            if not lane.provider.needs_cache(day):
                self._resolve(key, lookup, self._local(lane, day))
                return lookup
            if held is not None:
                lane.breaker.check()  # down, and a table in memory: no need for the disk
            job = lane.pending(day)
            if job is not None:  # its month is being fetched: the cache can wait
                lookup.unread = True
                self._join(key, lookup, lane.submit(day))
                return lookup
            cached = self._cache_read(lane, day)
            if cached is not None and (held is None or cached.fetched_at > held.fetched_at):
                if self._fresh(cached):
                    self._remember(cached)
                    self._resolve(key, lookup, cached)
                    return lookup
                if self._usable(cached):
                    lookup.held = cached
                    self._remember(cached)  # memory keeps stale tables too
            landed = self.hot.get(key)  # a month fetch may have brought it while we read
            if landed is not None and self._fresh(landed):
                self._resolve(key, lookup, landed)
                return lookup
            self._join(key, lookup, lane.submit(day))
        except RateError as e:
            self._forget(key, lookup)
            lookup.done.set_exception(e)
        except BaseException:
            self._forget(key, lookup)
            lookup.done.set_exception(RateUnavailable(f"the lookup of {day} was interrupted"))
            raise
        return lookup

    def _join(self, key, lookup: _Lookup, job) -> None:
        lookup.done.set(job)
        job.done.rawlink(lambda _: self._forget(key, lookup))

    def _local(self, lane: ProviderLane, day) -> RateTable:
        """A table the provider has without a call (the bundled ECB history)."""
        table = lane.provider.fetch(day)
        table = RateTable(table.provider, table.day, table.published, table.rates, self.clock())
        self._remember(table)
        return table

    def _cache_read(self, lane: ProviderLane, day,
                    budget_s: float = CACHE_READ_BUDGET_S) -> RateTable | None:
        try:
            with gevent.Timeout(budget_s):
                return self.cache.get(lane.name, day)
        except gevent.Timeout:
            self.slow_cache_reads += 1
            now = time.monotonic()
            if now - self._slow_logged_at >= STALE_LOG_INTERVAL_S:
                self._slow_logged_at = now
                log.warning("the cache did not answer within %.1f s (%s %s): treated as a "
                            "miss (%d slow read(s) so far)", budget_s, lane.name, day,
                            self.slow_cache_reads)
            return None

    def _resolve(self, key, lookup: _Lookup, table: RateTable) -> None:
        self._forget(key, lookup)
        lookup.done.set(table)

    def _forget(self, key, lookup: _Lookup) -> None:
        if self.lookups.get(key) is lookup:
            del self.lookups[key]

    # -- stale if error ---------------------------------------------------------------------

    def _stale_or_raise(self, lane: ProviderLane, lookup: _Lookup, day, deadline: float,
                        error: RateError) -> RateTable:
        held = lookup.held
        if held is None and lookup.unread:  # joined a job without reading: read it now
            left = deadline - time.monotonic()
            held = self._cache_read(lane, day, min(left, CACHE_READ_BUDGET_S)) \
                if left > 0 else None
            lookup.held, lookup.unread = held, False
        if held is None or not self._usable(held):
            raise error
        self._served_stale(lane, held, error)
        return held

    def _served_stale(self, lane: ProviderLane, table: RateTable, why) -> None:
        """Count a stale answer; log one line a minute per provider."""
        lane.stale_served += 1
        now = self.clock()
        if now - self._stale_logged_at.get(lane.name, float("-inf")) >= STALE_LOG_INTERVAL_S:
            self._stale_logged_at[lane.name] = now
            log.warning("serving stale rates of %s (%s, fetched %.0f s ago; %d stale "
                        "answer(s) so far): %s", lane.name, table.day,
                        now - table.fetched_at, lane.stale_served, why)

    def _log_fallback(self, lane: ProviderLane, day, failure: RateError) -> None:
        lane.fallbacks += 1
        now = self.clock()
        if now - self._fallback_logged_at.get(lane.name, float("-inf")) >= STALE_LOG_INTERVAL_S:
            self._fallback_logged_at[lane.name] = now
            log.warning("%s answered for %s in place of the providers before it in the chain "
                        "(%d time(s) so far): %s", lane.name, day, lane.fallbacks, failure)

    def _fresh(self, table: RateTable) -> bool:
        return self.clock() < table.fetched_at + self.ttl_s

    def _usable(self, table: RateTable | None) -> bool:
        return table is not None and self.clock() < table.fetched_at + self.ttl_s + self.stale_s

    # -- memory -----------------------------------------------------------------------------

    def _remember_all(self, tables) -> None:
        for table in tables:
            self._remember(table)

    def _remember(self, table: RateTable) -> None:
        key = (table.provider, table.day)
        self.hot[key] = table
        self.hot.move_to_end(key)
        while len(self.hot) > self.max_hot:
            self.hot.popitem(last=False)
