"""One provider's fetch path: a queue of jobs, a bounded set of fetcher greenlets, a breaker.

A job is one call's worth of tables: a day, or (Frankfurter, past days) a calendar month.
Concurrent misses whose days fall in one job share it; ``concurrency`` fetcher greenlets
take jobs in arrival order, so the provider never sees more concurrent calls than that,
however many days are missing, and a fetch's budget (``HttpClient``'s
``http_timeout_s``) starts when its call starts, not while it queues.

A finished job releases its waiters first (``on_tables`` puts the tables in the book's
memory, then the job's result is set) and only then writes the tables down (``cache``),
still inside the cross-process flight, so that another process polling the cache for the
same tables finds them when the flight ends. No fetched table is thrown away: a job whose
waiters gave up still fills memory and the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import gevent
import gevent.queue
from gevent.event import AsyncResult, Event
from gevent.pool import Group

from ..errors import DateOutOfRange, RateError, RateUnavailable
from .breaker import CircuitBreaker, ProviderDown
from .table import RateTable

if TYPE_CHECKING:
    from .providers import Provider


class RateCache(Protocol):
    """What the rate book and its lanes ask of the cache (``cache.TieredCache`` is one);
    ``hits`` and ``misses`` count its lookups (for the summary)."""

    hits: int
    misses: int

    def get(self, provider: str, day: datetime.date) -> RateTable | None: ...

    def put_many(self, tables: Iterable[RateTable]) -> int: ...

    def flight(self, provider: str, key: str) -> contextlib.AbstractContextManager[bool]: ...

log = logging.getLogger("exrate_green.rates")

#: while another process holds the flight for a job, the cache is polled this often (s)
POLL_INTERVAL_S = 0.05
#: longest wait for the cache to take a job's tables (s); the waiters are long released
WRITE_BUDGET_S = 10.0
#: longest wait for one cache read while polling for another process's tables (s)
READ_BUDGET_S = 1.0


class Job:
    """The tables of ``key`` (a day ``"2021-05-18"`` or a month ``"2021-05"``) from one
    provider. ``done`` gets ``{day: RateTable}`` or a ``RateError``; ``seq`` is its place in
    the queue; ``started_at`` (monotonic s) is set, and ``started`` fires, when a fetcher
    takes it: a waiter's fetch budget counts from then, not from when it queued."""

    def __init__(self, key: str, seq: int):
        self.key = key
        self.seq = seq
        self.days: set = set()
        self.started_at: float | None = None
        self.started = Event()
        self.done = AsyncResult()


class ProviderLane:
    """The fetch path of ``provider``; counters are plain attributes (for metrics):

    ``attempts`` HTTP requests sent (retries included), ``fetches`` calls made (one per
    job, its retries included), ``failures`` fetches that failed, ``stale_served``
    requests answered with a stale table of this provider, ``fallbacks`` requests this
    provider answered because the ones before it in the chain could not, ``tables``
    tables fetched, ``shared`` jobs another process fetched for us. ``breaker`` is its
    ``CircuitBreaker`` (``state``, ``retry_in_s()``, ``opened``).
    """

    def __init__(self, provider: Provider, cache: RateCache, *, concurrency: int,
                 budget_s: float, clock: Callable[[], float], on_tables: Callable[[list], None],
                 fresh: Callable[[RateTable], bool],
                 breaker: CircuitBreaker | None = None) -> None:
        self.provider = provider
        self.name = provider.name
        self.cache = cache
        self.concurrency = concurrency
        self.budget_s = budget_s  # one fetch's budget, s: how long to wait for another process
        self.clock = clock
        self.on_tables = on_tables
        self.fresh = fresh  # whether a table is fresh (the book's TTL and clock)
        self.breaker = breaker or CircuitBreaker(provider.name)
        self.attempts = 0
        self.fetches = 0
        self.failures = 0
        self.stale_served = 0
        self.fallbacks = 0
        self.tables = 0
        self.shared = 0
        self.jobs: dict[str, Job] = {}  # key -> the job queued or running for it
        self._queue: gevent.queue.Queue = gevent.queue.Queue()
        self._fetchers = Group()
        self._writers = Group()  # one per fetched job until its tables are written
        self._queued = 0  # seq of the last job queued
        self._taken = 0  # seq of the last job a fetcher took
        self._retrying: Job | None = None  # the one job allowed to retry now

    # -- the book's side ----------------------------------------------------------------

    def submit(self, day: datetime.date) -> Job:
        """The job that will fetch ``day``'s table, queued if none is; ``ProviderDown``
        at once (no call, no queue) while the breaker is open."""
        self.breaker.check()
        key = self.provider.fetch_key(day)
        job = self.jobs.get(key)
        if job is None:
            self._queued += 1
            job = self.jobs[key] = Job(key, self._queued)
            self._start_fetchers()
            self._queue.put(job)
        job.days.add(day)
        return job

    def pending(self, day: datetime.date) -> Job | None:
        """The job queued or running that will bring ``day``'s table, if there is one."""
        return self.jobs.get(self.provider.fetch_key(day))

    def late(self, job: Job, waited_s: float) -> RateUnavailable:
        """The error for a waiter whose ``job`` did not finish within ``waited_s``."""
        if job.started_at is None:
            ahead = max(job.seq - self._taken - 1, 0)
            return RateUnavailable(
                f"{self.name} could not get to the rates of {job.key} in time: still queued "
                f"after {waited_s:.1f} s ({self.concurrency} fetch(es) under way, {ahead} "
                f"more ahead of it)")
        return RateUnavailable(f"{self.name} did not answer for {job.key} within "
                               f"{waited_s:.1f} s (the fetch goes on and fills the cache)")

    def close(self, timeout: float = 1.0) -> None:
        """Stop fetching; writes in progress get ``timeout`` seconds to land."""
        self._fetchers.kill(timeout=timeout)
        for job in list(self.jobs.values()):  # queued, never to start: nobody waits for ever
            if not job.done.ready():
                self._settle(job, exception=RateUnavailable(
                    f"{self.name}: the fetch was stopped (shutting down)"))
        self._writers.join(timeout=timeout)
        self._writers.kill(timeout=timeout)

    # -- the fetchers -------------------------------------------------------------------

    def _start_fetchers(self) -> None:
        while len(self._fetchers) < self.concurrency:
            self._fetchers.spawn(self._fetch_loop)

    def _fetch_loop(self) -> None:
        """A fetcher: take the next job, run it, forever (killed by ``close``)."""
        while True:
            job = self._queue.get()
            self._taken = max(self._taken, job.seq)
            try:
                self._run(job)
            finally:
                if self._retrying is job:
                    self._retrying = None
                if not job.done.ready():  # killed mid-job: nobody may wait for ever
                    self._settle(job, exception=RateUnavailable(
                        f"{self.name}: the fetch was stopped (shutting down)"))

    def _run(self, job: Job) -> None:
        job.started_at = time.monotonic()
        job.started.set()
        try:
            self.breaker.acquire()
        except ProviderDown as e:
            self._settle(job, exception=e)  # queued before it opened: no call
            return
        try:
            self._fetch_shared(job)
        except DateOutOfRange as e:
            self.breaker.no_verdict()  # refused before any call: says nothing of the API
            self._settle(job, exception=e)
        except RateUnavailable as e:
            self._failed(job, e)
        except Exception:  # a provider bug must not leave waiters hanging
            log.exception("%s: fetching %s failed", self.name, job.key)
            self._failed(job, RateUnavailable(
                f"internal error while fetching from {self.name} (logged)"))

    def _failed(self, job: Job, error: RateUnavailable) -> None:
        self.failures += 1
        self.breaker.failed(error)
        log.warning("%s: fetching %s failed: %s", self.name, job.key, error.why)
        self._settle(job, exception=error)

    def _fetch_shared(self, job: Job) -> None:
        """Fetch ``job`` once for every process sharing the cache: the one holding the
        flight calls, the others poll the cache for what it wrote. The flight is held
        until the tables are written, by a writer greenlet, so the fetcher moves on to the
        next job at once (a slow disk slows no fetch)."""
        with contextlib.ExitStack() as flight:
            ours = flight.enter_context(self._flight(job.key))
            if not ours:
                tables = self._tables_from_another_process(job)
                if tables is not None:
                    self.shared += 1
                    self._release(job, tables)
                    return
            self.fetches += 1
            tables = self.provider.fetch_tables(job.key, on_attempt=self._count_attempt,
                                                may_retry=lambda: self._may_retry(job))
            now = self.clock()
            tables = [dataclasses.replace(t, fetched_at=now) for t in tables]
            self.tables += len(tables)
            self.breaker.succeeded()
            self._release(job, tables)
            self._writers.spawn(self._write, tables, flight.pop_all())

    def _release(self, job: Job, tables: list) -> None:
        """Tables known: into the book's memory, then every waiter released."""
        self.on_tables(tables)
        self._settle(job, value={table.day: table for table in tables})

    def _settle(self, job: Job, value=None, exception: RateError | None = None) -> None:
        if self.jobs.get(job.key) is job:
            del self.jobs[job.key]  # a request from now on starts a new job
        job.started.set()  # no longer queued, whatever happened: nobody waits for a turn
        if exception is not None:
            job.done.set_exception(exception)
        else:
            job.done.set(value)

    def _count_attempt(self) -> None:
        self.attempts += 1

    def _may_retry(self, job: Job) -> bool:
        """Retries while the provider looks healthy, and by one fetch at a time: when
        several fetches fail together, one retrying is enough to tell a blip from an
        outage, and a dead API does not see every retry of every fetch."""
        if not self.breaker.may_retry() or self._retrying not in (None, job):
            return False
        self._retrying = job
        return True

    # -- the cache: cross-process flight, polling, writing --------------------------------

    def _flight(self, key: str):
        return self.cache.flight(self.name, key)

    def _tables_from_another_process(self, job: Job) -> list | None:
        """The job's tables once another process wrote them, or None if they did not
        appear within the fetch budget (then we fetch ourselves)."""
        deadline = time.monotonic() + self.budget_s
        while time.monotonic() < deadline:
            tables = [self._fresh_cached(day) for day in sorted(job.days)]
            if all(tables):
                return tables
            gevent.sleep(POLL_INTERVAL_S)
        return None

    def _fresh_cached(self, day) -> RateTable | None:
        try:
            with gevent.Timeout(READ_BUDGET_S):
                table = self.cache.get(self.name, day)
        except gevent.Timeout:
            return None
        return table if table is not None and self.fresh(table) else None

    def _write(self, tables: list, flight: contextlib.ExitStack) -> None:
        """A writer: the tables into the cache, then the flight released."""
        with flight:
            if not tables:
                return
            try:
                with gevent.Timeout(WRITE_BUDGET_S):
                    self.cache.put_many(tables)
            except gevent.Timeout:
                log.warning("%s: the cache did not take %d table(s) within %.0f s; they stay "
                            "in memory", self.name, len(tables), WRITE_BUDGET_S)
