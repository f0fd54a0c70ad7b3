"""The supervisor: one connection at a time, reconnects, shutdown, and the summary.

``Service`` lives as long as the process and owns what outlives a connection: the
requests (``dispatch.Dispatch``), every reply's life (``delivery.Delivery``), the counters
(``stats.Stats``) and the stall watchdog's ``Progress``. It connects (with the one
``Backoff`` policy between failures), hands each connection to a ``session.Session``
together with those collaborators, and when the session ends releases its socket while
the next connection opens. It knows nothing of frames, replies or rates itself.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event
from gevent.pool import Group

from . import memory
from .backoff import Backoff
from .connection import handshake
from .delivery import Delivery
from .dispatch import Dispatch
from .errors import ERROR_REASONS, ConnectionClosed
from .logs import Summary
from .session import Ended, Session
from .stall import Progress, StallWatchdog
from .stats import Stats

if TYPE_CHECKING:
    from .config import Settings
    from .rates.book import RateBook

log = logging.getLogger("exrate_green.service")

#: seconds of the shutdown grace kept for the close frame and its answer (at most)
CLOSE_RESERVE_S = 1.0
#: the longest the close frame and its answer may take (within the grace)
CLOSE_WAIT_S = 1.0
#: reconnects: the first retry at once, then 0.25 s doubling to the cap, 50-100 % jitter
RECONNECT_FIRST_S = 0.25

__all__ = ["Service"]


class Service:
    """Keeps one connection to the upstream and answers its requests until ``stop()``."""

    def __init__(self, settings: Settings, book: RateBook, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.book = book
        self.clock = clock
        self.stats = Stats()
        self.progress = Progress(clock)
        self.delivery = Delivery(self.stats, redelivery_window_s=settings.redelivery_window_s,
                                 clock=clock, show_messages=settings.show_messages)
        self.dispatch = Dispatch(book, self.delivery, self.stats, self.progress,
                                 max_in_flight=settings.max_in_flight, clock=clock,
                                 show_messages=settings.show_messages)
        self.backoff = Backoff(RECONNECT_FIRST_S, settings.reconnect_max_delay_s, free=1)
        self.session: Session | None = None
        self.stopping = False
        self.stop_deadline: float | None = None  # clock() by which a shutdown must be done
        self.stopped = Event()
        self._wake = Event()  # cuts a backoff sleep short on stop()
        self._between_sessions = Event()
        self._between_sessions.set()
        #: the greenlet opening a connection, killed by stop()
        self._connecting: gevent.Greenlet | None = None
        self.jobs = Group()  # service-lifetime background jobs
        #: why the last connection (or connect) ended, for /healthz
        self.last_disconnect: str | None = None
        self._last_summary_at = clock()
        self._summary = Summary()

    # -- the supervisor ------------------------------------------------------------------

    def run(self) -> int:
        """Connect, serve, reconnect until ``stop()``; returns the process exit code."""
        watchdog = StallWatchdog(self.progress, self.settings.stall_exit_s,
                                 stop_deadline=lambda: self.stop_deadline,
                                 stopped=self.stopped.is_set)
        self.jobs.spawn(watchdog.tick)
        self.jobs.spawn(self.summary)
        watchdog.start()
        failures = 0
        ending: gevent.Greenlet | None = None
        try:
            while not self.stopping:
                delay_s = self.backoff.delay_s(failures)
                if delay_s:
                    log.info("reconnecting in %.2f s (attempt %d)", delay_s, failures + 1)
                    self._wake.wait(delay_s)
                    if self.stopping:
                        break
                self.stats.connect_attempts += 1
                try:
                    sock = self._connect(ending)
                except ConnectionClosed as e:
                    failures += 1
                    self.stats.connect_failures += 1
                    self.last_disconnect = f"connect failed: {e.cause}"
                    log.warning("connect failed (%d in a row): %s", failures, e.cause)
                    continue
                finally:
                    ending = None
                if sock is None:  # stop() came while connecting
                    break
                failures, ending = self._serve(sock, failures)
            self._released(ending)
            self.stopped.wait(self.settings.shutdown_grace_s + 1)
            return 0
        finally:
            self.jobs.kill(timeout=1)

    def _connect(self, ending: gevent.Greenlet | None) -> socket.socket | None:
        """A new connection's socket; meanwhile the last session (``ending``, a greenlet
        releasing its socket) hands its undelivered replies back to delivery."""
        settings = self.settings

        def open_or_fail():
            try:
                return handshake(settings.url, timeout_s=settings.http_connect_timeout_s + 3,
                                 ca_file=settings.ca_file)
            except ConnectionClosed as e:
                return e

        self._connecting = gevent.spawn(open_or_fail)
        try:
            self._released(ending)
            sock = self._connecting.get()
            if isinstance(sock, ConnectionClosed):
                raise sock
            return None if isinstance(sock, gevent.GreenletExit) else sock
        finally:
            self._connecting = None

    def _serve(self, sock: socket.socket, failures: int) -> tuple[int, gevent.Greenlet | None]:
        """Serve ``sock`` until its connection ends; returns (failures so far, the greenlet
        releasing its socket)."""
        if self.stopping:  # stop() came while we were connecting
            sock.close()
            return failures, None
        self.stats.connects += 1
        log.info("connected to %s (connection %d)", self.settings.url, self.stats.connects)
        session = self.session = Session(
            sock, self.settings, dispatch=self.dispatch, delivery=self.delivery,
            progress=self.progress, stats=self.stats, clock=self.clock)
        self._between_sessions.clear()
        try:
            ended = session.run()
        finally:
            self.session = None
            ending = gevent.spawn(session.release)
        self.last_disconnect = ended.cause
        if self.stopping:
            log.info("disconnected: %s", ended.cause)
            return failures, ending
        self.stats.reconnects += 1
        log.warning("disconnected: %s; reconnecting", ended.cause)
        return self._failures_after(ended, failures), ending

    @staticmethod
    def _failures_after(ended: Ended, failures: int) -> int:
        """The backoff resets once a heartbeat arrived; an upstream that broke RFC 6455 is
        retried at once, without growing the backoff."""
        if ended.heartbeats:
            return 0
        return min(failures, 1) if ended.violation else failures + 1

    def _released(self, ending: gevent.Greenlet | None) -> None:
        """Wait for an ended session to release its socket (see ``_connect``)."""
        if ending is not None:
            ending.join()
        self._between_sessions.set()

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
        log.info("stopping: %d conversion(s) in flight, grace %.1f s", len(self.dispatch),
                 grace_s)
        try:
            if self._connecting is not None:
                self._connecting.kill(block=False)
            session = self.session
            if session is not None:
                session.stop_reading(deadline)
            self.dispatch.finish(close_at - self.clock())
            session = self.session
            if session is not None:
                if not session.drain(max(close_at - self.clock(), 0)):
                    log.warning("grace period over with %d reply(ies) not written",
                                len(self.delivery))
                session.close(min(max(deadline - self.clock(), 0.01), CLOSE_WAIT_S))
            self._between_sessions.wait(max(deadline - self.clock(), 0) + 0.5)
            self.delivery.give_up()
        finally:
            self.stopped.set()

    # -- background jobs -----------------------------------------------------------------

    def summary(self) -> None:
        """Every ``summary_interval_s``: one line of counters and latency percentiles; kept
        replies past the redelivery window are dropped on the way."""
        trimmed_at = -1
        while True:
            gevent.sleep(min(self.settings.summary_interval_s, 1.0))
            if self.session is None:
                self.delivery.expire()
            if self.stats.requests != trimmed_at:  # traffic flowed: give freed memory back
                trimmed_at = self.stats.requests
                memory.trim()
            if self.clock() - self._last_summary_at >= self.settings.summary_interval_s:
                line = self.summary_line()
                log.info("summary: %s", line, extra=self.summary_fields)

    def summary_line(self) -> str:
        """The summary line in l2met form (``logs.format_summary``): ``count#`` figures are
        events since the previous line (a drain sums them), ``sample#`` figures are levels
        now and latency percentiles of the interval. ``summary_fields`` then holds the
        same figures as flat keys, for a JSON log event. docs/operations.md lists them."""
        self._last_summary_at = self.clock()
        s, book = self.stats, self.book
        p50_s, p99_s = s.take_latency_percentiles()
        counts = {
            "requests": s.requests, "replies": s.replies, "delivered": s.delivered,
            "errors": s.errors,
            **{f"errors.{reason}": s.errors_by_kind[reason] for reason in ERROR_REASONS},
            "skipped": s.skipped, "redelivered": s.redelivered, "dropped": s.dropped,
            "possibly_lost": s.possibly_lost, "connect_attempts": s.connect_attempts,
            "connect_failures": s.connect_failures, "connects": s.connects,
            "reconnects": s.reconnects, "memory_hits": book.memory_hits,
            "cache_hits": book.cache.hits, "cache_misses": book.cache.misses,
            "rate_api_calls": book.api_calls, "rate_api_fetches": book.fetches,
            "failed_lookups": self.dispatch.waiting.failed_lookups}
        levels = {"p50_ms": _ms(p50_s), "p99_ms": _ms(p99_s), "in_flight": len(self.dispatch),
                  "outbox": len(self.delivery.outbox), "kept": len(self.delivery.kept)}
        return self._summary.line(counts, levels)

    @property
    def summary_fields(self) -> dict[str, float | int]:
        """The last summary line's figures as flat keys (``count.requests``...)."""
        return self._summary.fields

    def link_state(self) -> LinkState:
        """What ``/healthz`` needs to know of the link, read now."""
        session = self.session
        if session is None or session.conn.closed:
            return LinkState(False, 0, None, None, self.stopping, self.last_disconnect)
        return LinkState(True, session.heartbeats_received, session.silence_s(),
                         self.clock() - session.last_heartbeat_at, self.stopping,
                         self.last_disconnect)


class LinkState:
    """The link as ``/healthz`` sees it: ``silence_s`` is the watchdog's own figure (time
    the upstream was silent while we were free to read it); ``heartbeat_age_s`` the
    wall-clock age of the last heartbeat (for humans)."""

    __slots__ = ("connected", "heartbeats", "silence_s", "heartbeat_age_s", "stopping",
                 "last_disconnect")

    def __init__(self, connected: bool, heartbeats: int, silence_s: float | None,
                 heartbeat_age_s: float | None, stopping: bool,
                 last_disconnect: str | None) -> None:
        self.connected = connected
        self.heartbeats = heartbeats
        self.silence_s = silence_s
        self.heartbeat_age_s = heartbeat_age_s
        self.stopping = stopping
        self.last_disconnect = last_disconnect


def _ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds for the summary; None (left out) when there is no figure."""
    return None if seconds is None else seconds * 1000
