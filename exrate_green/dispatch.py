"""The requests: from a batch of frames to replies handed to delivery, one way.

``Dispatch`` owns a request's walk from the moment it is read until its reply is made:
the pure ``serving.step`` says what a batch asks for; replies that can be made at once
(a rate table in memory, or an error) go to ``delivery`` straight away; the requests
whose table is not in memory are held in ``waiters.Waiters`` (grouped by lookup: one
greenlet per (day, currency), one fetch per day) and answered when it comes. It counts
requests, error replies and latency in ``Stats``, and logs the messages received
(``--show-messages``) and the ones it had to skip.

Nothing here calls back up: the session's reader calls ``take`` and then ``hold``, and
learns the heartbeats a batch carried from ``take``'s result.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable

from . import protocol, serving
from .delivery import Delivery
from .errors import INTERNAL, RateError
from .protocol import Request
from .rates.book import RateBook
from .rates.table import RateTable
from .stall import Progress
from .stats import Stats
from .waiters import Waiters
from .ws import Event

__all__ = ["MAX_LOOKUPS_IN_FLIGHT", "Dispatch"]

log = logging.getLogger("exrate_green.service")
messages_log = logging.getLogger("exrate_green.messages")
_UTC = datetime.UTC

#: distinct (day, currency) lookups waited for at once (each is one greenlet; those of
#: one day share one fetch in the rate book)
MAX_LOOKUPS_IN_FLIGHT = 256


class Dispatch:
    """Turns batches of frames into replies for ``delivery``; holds what must wait."""

    def __init__(self, book: RateBook, delivery: Delivery, stats: Stats, progress: Progress,
                 *, max_in_flight: int, clock: Callable[[], float],
                 show_messages: bool = False) -> None:
        self.book = book
        self.delivery = delivery
        self.stats = stats
        self.progress = progress
        self.clock = clock
        self.show_messages = show_messages
        self.waiting = Waiters(book, self._answer_waiting, max_requests=max_in_flight,
                               max_lookups=MAX_LOOKUPS_IN_FLIGHT)
        self._stamp_ms = -1  # the millisecond of the cached day and reply timestamp
        self._day = datetime.date.min
        self._stamp = ""

    def __len__(self) -> int:
        """Requests waiting for a rate table."""
        return len(self.waiting)

    def take(self, events: list[Event]) -> serving.Step:
        """Serve what a batch can have now: its replies go to delivery. Returns the step:
        its ``heartbeats`` (for the session) and ``waiting`` requests (for ``hold``)."""
        today, stamp = self._now()
        started = self.clock()
        if self.show_messages:
            self._show_received(events)
        result = serving.step(events, today=today, stamp=stamp, peek=self.book.peek)
        self.stats.requests += result.requests
        if result.errors or result.skipped or result.failures:
            self._count_problems(result)
        if result.replies:
            self.delivery.post(result.replies)
            self.stats.record(self.clock() - started, len(result.replies))
        result.started = started
        return result

    def _now(self) -> tuple[datetime.date, str]:
        """(the UTC day, the reply timestamp) now, formatted once per millisecond: under
        load many batches share one (the stamp has millisecond resolution anyway)."""
        ms = int(time.time() * 1000)
        if ms != self._stamp_ms:
            moment = datetime.datetime.fromtimestamp(ms / 1000, _UTC)
            self._stamp_ms, self._day, self._stamp = ms, moment.date(), \
                protocol.timestamp(moment)
        return self._day, self._stamp

    def hold(self, requests: list[Request], received_at: float) -> None:
        """Hold each request until its day's table comes; while there is no room, the
        reader waits first (back-pressure). That time is never upstream silence, and never
        a stall (each fetch waited on has its own deadline)."""
        for request in requests:
            try:
                self._hold(request, received_at)
            except Exception:  # a bug must cost one message, never the connection
                self.stats.skipped += 1
                log.exception("could not hold request %r for its rate table", request.id)

    def _hold(self, request: Request, received_at: float) -> None:
        waiting = self.waiting
        if not waiting.has_room(request):
            self.stats.backpressure_waits += 1
            self.delivery.push()  # this batch's replies leave before the reader waits
            self.progress.reader_parked()
            waiting.wait_for_room(request)
            self.progress.reader_turned()
        if not waiting.add(request, received_at):  # the grace is over
            self.stats.dropped += 1

    def finish(self, timeout_s: float) -> None:
        """Shutdown: wait up to ``timeout_s`` for the held requests to be answered; the
        rest are abandoned and counted dropped."""
        if not self.waiting.join(timeout=max(timeout_s, 0)):
            lost = self.waiting.kill(timeout=0.2)
            self.stats.dropped += lost
            log.warning("grace period over: %d conversion(s) abandoned", lost)

    # -- answering -------------------------------------------------------------------------

    def _answer_waiting(self, held: list[tuple[Request, float]],
                        outcome: RateTable | RateError) -> None:
        """The replies to requests that waited for a day's table (``outcome``: the table
        or the ``RateError``); never yields."""
        _, stamp = self._now()
        replies: list[bytes] = []
        errors: list[str] = []
        for request, _ in held:
            try:
                if isinstance(outcome, RateError):
                    errors.append(outcome.kind)
                    replies.append(protocol.error_reply(request.id, outcome.reason))
                else:
                    replies.append(serving.answer(request, outcome, stamp, errors))
            except Exception:  # a bug must still leave the request answered
                log.exception("converting request %r failed", request.id)
                errors.append(INTERNAL)
                replies.append(protocol.error_reply(request.id, "internal error"))
        for kind in errors:
            self.stats.error(kind)
        self.delivery.post(replies)
        now = self.clock()
        for _, received_at in held:
            self.stats.record(now - received_at)

    def _count_problems(self, result: serving.Step) -> None:
        """Count the error replies and skipped messages of a step, and log the skipped."""
        stats = self.stats
        for kind in result.errors:
            stats.error(kind)
        for what in result.skipped:
            stats.skipped += 1
            log.warning("skipped a message without an id: %s", what)
        for data, error in result.failures:
            stats.skipped += 1
            log.error("could not serve a message: %s", protocol.excerpt(data), exc_info=error)

    def _show_received(self, events: list[Event]) -> None:
        for kind, data in events:
            if kind == "text":
                messages_log.info("recv %s", protocol.shown(data))
