"""The supervisor: one connection at a time, reconnects, shutdown, and the requests.

``Service`` lives as long as the process and owns what outlives a connection: the rate
book, the requests waiting for a rate table (``waiters.Waiters``, grouped by day), the
replies a dead connection could not deliver (kept for the next one, in time order), the
counters. ``session.Session`` lives as long as one connection and owns its greenlets.
"""

from __future__ import annotations

import bisect
import collections
import datetime
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import gevent
from gevent.event import Event
from gevent.pool import Group

from . import memory, protocol, serving
from .connection import Connection
from .errors import ConnectionClosed, RateError
from .session import Session
from .stall import Progress, start_stall_watchdog
from .waiters import Waiters

if TYPE_CHECKING:
    from .config import Settings
    from .rates.book import RateBook
    from .ws import Event as FrameEvent

log = logging.getLogger("exrate_green.service")
messages_log = logging.getLogger("exrate_green.messages")
_UTC = datetime.UTC
_MAX_SAMPLES = 20_000  # latency samples kept per summary interval (sorted in ~3 ms)
#: upper bounds (seconds) of the reply latency histogram's buckets; one more counts the rest
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                     5.0, 10.0)
#: distinct (day, currency) lookups waited for at once (each is one greenlet; those of
#: one day share one fetch in the rate book)
MAX_LOOKUPS_IN_FLIGHT = 256
#: seconds of the shutdown grace kept for the close frame and its answer (at most)
CLOSE_RESERVE_S = 1.0
#: the longest the close frame and its answer may take (within the grace)
CLOSE_WAIT_S = 1.0

__all__ = ["Service", "Stats", "backoff_delay_s", "percentile", "start_stall_watchdog"]


class _Uniform(Protocol):
    """A source of jitter: ``random.Random``, or the ``random`` module itself."""

    def uniform(self, a: float, b: float, /) -> float: ...


class Stats:
    """Counters since start (plain ints), and latency samples (seconds) since the last
    summary.

    A reply is counted once in ``replies`` when the kernel first takes it, then once in
    ``delivered`` when the peer's TCP acknowledges its bytes, or else (the connection
    died first) it is sent again on the next connection (``redelivered``, each time), or
    ``dropped`` (never written: no connection in time, shutdown), or ``possibly_lost``
    (written, never acknowledged, and not sent again: shutdown, or too old to resend).
    """

    def __init__(self) -> None:
        self.requests = self.replies = self.errors = self.skipped = 0
        self.delivered = self.redelivered = self.dropped = self.possibly_lost = 0
        self.connects = self.reconnects = 0
        self.connect_attempts = self.connect_failures = 0
        self.heartbeats_sent = self.heartbeats_received = 0
        #: error replies by ``ExrateError.kind``
        self.errors_by_kind: collections.Counter[str] = collections.Counter()
        # Since start, for the metrics' histogram: replies per LATENCY_BUCKETS_S bucket
        # (not cumulative: the scrape adds them up) and the sum of their latencies.
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        self.backpressure_waits = 0  # times the reader stopped for room
        self.latencies_s: list[float] = []
        self._recorded = 0  # replies recorded since the last summary

    def error(self, kind: str) -> None:
        """Count one error reply of ``kind`` (an ``ExrateError.kind``, e.g.
        ``"invalid_request"``)."""
        self.errors += 1
        self.errors_by_kind[kind] += 1

    def record(self, latency_s: float, count: int = 1) -> None:
        """Latency of ``count`` replies. Past ``_MAX_SAMPLES`` a sample replaces a random
        one (reservoir sampling), so the summary covers the whole interval at any rate and
        sorting it on the hub stays cheap."""
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += count
        self.latency_sum_s += latency_s * count
        samples = self.latencies_s
        self._recorded += count
        room = _MAX_SAMPLES - len(samples)
        if room > 0:
            samples.extend([latency_s] * min(count, room))
            return
        # Each reply would replace a random slot with probability _MAX_SAMPLES/seen
        # (Algorithm R): draw how many do, per batch rather than per reply (hot path).
        expected = count * _MAX_SAMPLES / self._recorded
        replaced = int(expected) + (random.random() < expected % 1)
        for _ in range(min(replaced, count)):
            samples[random.randrange(_MAX_SAMPLES)] = latency_s

    def take_latencies(self) -> list[float]:
        samples, self.latencies_s, self._recorded = self.latencies_s, [], 0
        return samples


def percentile(samples: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` quantile of ``samples`` (nearest rank), or None when empty."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def backoff_delay_s(failures: int, cap_s: float, rng: _Uniform = random) -> float:
    """Seconds to wait before the next attempt after ``failures`` consecutive failures.

    The first retry is immediate; then 0.25 s doubling up to ``cap_s``, each with jitter
    (50-100 % of the step) so a fleet of clients does not reconnect in lockstep.
    """
    if failures <= 1:
        return 0.0
    step = min(cap_s, 0.25 * 2 ** (failures - 2))
    return step * rng.uniform(0.5, 1.0)


class Service:
    """Keeps one connection to the upstream and answers its requests until ``stop()``."""

    def __init__(self, settings: Settings, book: RateBook, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.book = book
        self.clock = clock
        self.stats = Stats()
        self.progress = Progress(clock)
        self.session: Session | None = None
        self.stopping = False
        self.stop_deadline: float | None = None  # clock() by which a shutdown must be done
        self.stopped = Event()
        self._wake = Event()  # cuts a backoff sleep short on stop()
        self._between_sessions = Event()
        self._between_sessions.set()
        #: the greenlet opening a connection, killed by stop()
        self._connecting: gevent.Greenlet | None = None
        self.waiting = Waiters(book, self._answer_waiting, max_requests=settings.max_in_flight,
                               max_lookups=MAX_LOOKUPS_IN_FLIGHT)
        #: (kept at, reply, written before) of replies no connection delivered, oldest first
        self.undelivered: collections.deque[tuple[float, bytes, bool]] = collections.deque()
        self.jobs = Group()  # service-lifetime background jobs
        self.show_messages = settings.show_messages
        #: why the last connection (or connect) ended, for /healthz
        self.last_disconnect: str | None = None
        self._last_summary_at = clock()

    # -- the supervisor ------------------------------------------------------------------

    def run(self) -> int:
        """Connect, serve, reconnect until ``stop()``; returns the process exit code."""
        self.jobs.spawn(self.summary)
        start_stall_watchdog(self, self.settings.stall_exit_s)
        failures, ended = 0, None
        try:
            while not self.stopping:
                delay_s = backoff_delay_s(failures, self.settings.reconnect_max_delay_s)
                if delay_s:
                    log.info("reconnecting in %.2f s (attempt %d)", delay_s, failures + 1)
                    self._wake.wait(delay_s)
                    if self.stopping:
                        break
                self.stats.connect_attempts += 1
                try:
                    conn = self._connect(ended)
                except ConnectionClosed as e:
                    failures += 1
                    self.stats.connect_failures += 1
                    self.last_disconnect = f"connect failed: {e.cause}"
                    log.warning("connect failed (%d in a row): %s", failures, e.cause)
                    continue
                finally:
                    ended = None
                if conn is None:  # stop() came while connecting
                    break
                failures, ended = self._serve(conn, failures)
            self._collect(ended)
            self.stopped.wait(self.settings.shutdown_grace_s + 1)
            return 0
        finally:
            self.jobs.kill(timeout=1)

    def _connect(self, ended):
        """A new connection; meanwhile the last one (``ended``, a greenlet settling its
        socket) hands over the replies it could not deliver, to be sent first."""
        settings = self.settings

        def open_or_fail():
            try:
                return Connection.open(
                    settings.url, timeout_s=settings.http_connect_timeout_s + 3,
                    ca_file=settings.ca_file, max_frame_bytes=settings.max_frame_bytes)
            except ConnectionClosed as e:
                return e

        self._connecting = gevent.spawn(open_or_fail)
        try:
            self._collect(ended)
            conn = self._connecting.get()
            if isinstance(conn, ConnectionClosed):
                raise conn
            return None if isinstance(conn, gevent.GreenletExit) else conn
        finally:
            self._connecting = None

    def _serve(self, conn, failures):
        """Serve ``conn`` until it ends; returns (failures so far, the greenlet settling
        its socket, whose value is the replies to send again)."""
        if self.stopping:  # stop() came while we were connecting
            conn.abort()
            return failures, None
        self.stats.connects += 1
        log.info("connected to %s (connection %d)", self.settings.url, self.stats.connects)
        carried = self._carried()
        if carried:
            log.info("sending %d reply(ies) kept from earlier connections first", len(carried))
        session = self.session = Session(self, conn, carried)
        self._between_sessions.clear()
        try:
            cause = session.run()
        finally:
            self.session = None
            ended = gevent.spawn(session.settle)
        self.last_disconnect = cause
        if self.stopping:
            log.info("disconnected: %s", cause)
            return failures, ended
        self.stats.reconnects += 1
        log.warning("disconnected: %s; reconnecting", cause)
        if conn.violation is not None:  # the upstream broke RFC 6455: retry at once, no growth
            return (0 if session.heartbeats_received else min(failures, 1)), ended
        return (0 if session.heartbeats_received else failures + 1), ended

    def _collect(self, ended):
        """Keep the replies an ended connection could not deliver (see ``_connect``)."""
        if ended is not None:
            ended_at, leftovers = ended.get()
            unacked = sum(1 for _, written in leftovers if written)
            if unacked:
                log.warning("%d written reply(ies) not acknowledged by the peer: kept for "
                            "the next connection", unacked)
            # Older than anything kept since the connection ended: they go first, so the
            # queue stays in time order (and expiry takes the oldest from the front).
            self.undelivered.extendleft(
                (ended_at, reply, written) for reply, written in reversed(leftovers))
        self._between_sessions.set()

    def _carried(self):
        """Replies kept for this connection, oldest first; those too old are dropped."""
        self._expire()
        carried = [(reply, written) for _, reply, written in self.undelivered]
        self.undelivered.clear()
        return carried

    def stop(self) -> None:
        """Graceful stop within ``shutdown_grace_s``, whatever the peer does: no more
        reading; waiting conversions finish and their replies are written (every write
        with a deadline inside the grace); then one close frame and its answer, within
        the last ``CLOSE_RESERVE_S`` of the grace. What could not be written is counted
        (``dropped``), what was written and never acknowledged too (``possibly_lost``).
        Idempotent."""
        if self.stopping:
            return
        self.stopping = True
        self._wake.set()
        grace_s = self.settings.shutdown_grace_s
        self.stop_deadline = deadline = self.clock() + grace_s
        close_at = deadline - min(CLOSE_RESERVE_S, grace_s / 4)
        log.info("stopping: %d conversion(s) in flight, grace %.1f s", len(self.waiting), grace_s)
        try:
            if self._connecting is not None:
                self._connecting.kill(block=False)
            session = self.session
            if session is not None:
                session.stop_reading(deadline)
            self._finish_conversions(close_at)
            session = self.session
            if session is not None:
                if not session.drain(max(close_at - self.clock(), 0)):
                    log.warning("grace period over with %d reply(ies) not written",
                                len(session.outbox))
                session.close(min(max(deadline - self.clock(), 0.01), CLOSE_WAIT_S))
            self._between_sessions.wait(max(deadline - self.clock(), 0) + 0.5)
            self._account_undelivered()
        finally:
            self.stopped.set()

    def _finish_conversions(self, until):
        if not self.waiting.join(timeout=max(until - self.clock(), 0)):
            lost = self.waiting.kill(timeout=0.2)
            self.stats.dropped += lost
            log.warning("grace period over: %d conversion(s) abandoned", lost)

    def _account_undelivered(self):
        entries = list(self.undelivered)
        self.undelivered.clear()
        if self.session is not None:  # still serving past the grace (should not happen)
            entries += [(0, reply, written) for reply, written in self.session.outbox]
        written = sum(1 for _, _, was_written in entries if was_written)
        if len(entries) - written:
            self.stats.dropped += len(entries) - written
            log.warning("%d reply(ies) dropped: not written by the end of the grace period",
                        len(entries) - written)
        if written:
            self.stats.possibly_lost += written
            log.warning("%d reply(ies) possibly lost: written, never acknowledged by the peer",
                        written)

    # -- serving requests (the hot path runs inside the receive loop) --------------------

    def handle(self, events: list[FrameEvent], session: Session) -> None:
        """Answer a batch of incoming frames (``serving.step`` says how): heartbeats are
        registered and the replies made now are posted first; then the requests whose
        table is not in memory are held (``self.waiting``) until it comes, the reader
        stopping for room when none is left (back-pressure)."""
        now = datetime.datetime.now(_UTC)
        started = self.clock()
        if self.show_messages:
            self._show_received(events)
        result = serving.step(events, today=now.date(), stamp=protocol.timestamp(now),
                              peek=self.book.peek)
        for _ in range(result.heartbeats):
            session.on_heartbeat()
        self.stats.requests += result.requests
        if result.errors or result.skipped or result.failures:
            self._count_problems(result)
        if result.replies:
            self.deliver(result.replies)
            self.stats.record(self.clock() - started, len(result.replies))
        for request in result.waiting:
            try:
                self._hold(request, started)
            except Exception:  # a bug must cost one message, never the connection
                self.stats.skipped += 1
                log.exception("could not hold request %r for its rate table", request.id)

    def _count_problems(self, result):
        """Count the error replies and skipped messages of a step, and log the skipped."""
        stats = self.stats
        for kind in result.errors:
            stats.error(kind)
        for what in result.skipped:
            self._skip(what)
        for data, error in result.failures:
            stats.skipped += 1
            log.error("could not serve a message: %s", protocol.excerpt(data), exc_info=error)

    def _hold(self, request, received_at):
        """Hold ``request`` until its day's table comes; first, while there is no room,
        the reader waits (back-pressure). The reader is busy, not free: this time is never
        upstream silence, and never a stall (each fetch waited on has its own deadline)."""
        if not self.waiting.has_room(request):
            self.stats.backpressure_waits += 1
            self.progress.reader_parked()
            self.waiting.wait_for_room(request)
            self.progress.reader_turned()
        if not self.waiting.add(request, received_at):  # the grace is over
            self.stats.dropped += 1

    def _answer_waiting(self, held, outcome):
        """The replies to requests that waited for a day's table (``outcome``: the table
        or the ``RateError``); never yields."""
        stamp = protocol.timestamp(datetime.datetime.now(_UTC))
        replies, errors = [], []
        for request, _ in held:
            try:
                if isinstance(outcome, RateError):
                    errors.append(outcome.kind)
                    replies.append(protocol.error_reply(request.id, outcome.reason))
                else:
                    replies.append(serving.answer(request, outcome, stamp, errors))
            except Exception:  # a bug must still leave the request answered
                log.exception("converting request %r failed", request.id)
                errors.append("internal")
                replies.append(protocol.error_reply(request.id, "internal error"))
        for kind in errors:
            self.stats.error(kind)
        self.deliver(replies)
        now = self.clock()
        for _, received_at in held:
            self.stats.record(now - received_at)

    def deliver(self, replies: list[bytes]) -> None:
        """Queue replies on the current connection, or keep them for the next one."""
        session = self.session
        if session is not None:
            session.post(replies)
        else:
            now = self.clock()
            self.undelivered.extend((now, reply, False) for reply in replies)

    def show_sent(self, replies: Iterable[bytes]) -> None:
        for reply in replies:
            messages_log.info("send %s", reply.decode())

    def _show_received(self, events):
        for kind, data in events:
            if kind == "text":
                messages_log.info("recv %s", protocol.shown(data))

    def _expire(self):
        """Drop kept replies older than the redelivery window (oldest are first)."""
        oldest_allowed = self.clock() - self.settings.redelivery_window_s
        kept, dropped, lost = self.undelivered, 0, 0
        while kept and kept[0][0] < oldest_allowed:
            _, _, written = kept.popleft()
            if written:
                lost += 1
            else:
                dropped += 1
        if dropped or lost:
            self.stats.dropped += dropped
            self.stats.possibly_lost += lost
            log.warning("%d reply(ies) dropped and %d written but unacknowledged given up: "
                        "no connection within %.0f s",
                        dropped, lost, self.settings.redelivery_window_s)

    def _skip(self, what):
        self.stats.skipped += 1
        log.warning("skipped a message without an id: %s", what)

    # -- background jobs -----------------------------------------------------------------

    def summary(self) -> None:
        """Every ``summary_interval_s``: one line of counters and latency percentiles; kept
        replies past the redelivery window are dropped on the way."""
        trimmed_at = -1
        while True:
            gevent.sleep(min(self.settings.summary_interval_s, 1.0))
            if self.session is None:
                self._expire()
            if self.stats.requests != trimmed_at:  # traffic flowed: give freed memory back
                trimmed_at = self.stats.requests
                memory.trim()
            if self.clock() - self._last_summary_at >= self.settings.summary_interval_s:
                log.info("summary: %s", self.summary_line())

    def summary_line(self) -> str:
        self._last_summary_at = self.clock()
        s, samples = self.stats, self.stats.take_latencies()
        cache = getattr(self.book.cache, "hits", 0), getattr(self.book.cache, "misses", 0)
        session = self.session
        return (f"requests={s.requests} replies={s.replies} delivered={s.delivered} "
                f"errors={s.errors} skipped={s.skipped} "
                f"p50_ms={_ms(percentile(samples, 0.5))} p99_ms={_ms(percentile(samples, 0.99))} "
                f"connect_attempts={s.connect_attempts} connect_failures={s.connect_failures} "
                f"connects={s.connects} reconnects={s.reconnects} "
                f"redelivered={s.redelivered} dropped={s.dropped} "
                f"possibly_lost={s.possibly_lost} in_flight={len(self.waiting)} "
                f"outbox={len(session.outbox) if session else 0} kept={len(self.undelivered)} "
                f"memory_hits={self.book.memory_hits} cache_hits={cache[0]} "
                f"cache_misses={cache[1]} rate_api_calls={self.book.api_calls} "
                f"rate_api_fetches={getattr(self.book, 'fetches', 0)} "
                f"failed_lookups={self.waiting.failed_lookups}")


def _ms(seconds):
    """Seconds as milliseconds for the summary; ``-`` when there is no figure."""
    return "-" if seconds is None else f"{seconds * 1000:.2f}"
