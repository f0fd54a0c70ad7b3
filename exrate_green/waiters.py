"""Requests waiting for a rate table, grouped by the lookup they wait for.

A request whose table is not in memory is held here as the small parsed object it already
is: one list per lookup, (day, currency), and ONE greenlet per lookup waiting on
``book.get(day, currency)``, not a greenlet per request. (The currency is part of the
lookup because a provider chain may answer one currency of a day from another provider;
the lookups of one day share one fetch in the rate book.) When the table comes (or its
error), every request of that lookup is answered in slices, yielding between them so
heartbeats and the reader keep their turn.

Two bounds make the reader stop (back-pressure) instead of memory growing: requests held
(``max_requests``, EXRATE_MAX_IN_FLIGHT) and lookups waited for (``max_lookups``: each is a
greenlet).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event
from gevent.pool import Group

from .errors import RateError
from .ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from .protocol import Request
    from .rates.book import RateBook
    from .rates.table import RateTable

    #: (request, received_at) pairs answered together, and their table or error
    Answer = Callable[[list[tuple[Request, float]], RateTable | RateError], None]

log = logging.getLogger("exrate_green.service")

#: requests answered between two yields to the hub when a day's table arrives
SLICE = 256
#: at most one "no rate table" warning per this many seconds (the rest are counted)
WARN_EVERY_S = 1.0


class Waiters:
    """Requests by lookup, answered by ``answer(requests, table_or_error)`` when it comes.

    ``answer`` gets a list of (request, received_at) and either the table or the
    ``RateError``; it must not yield.
    """

    def __init__(self, book: RateBook, answer: Answer, *, max_requests: int,
                 max_lookups: int) -> None:
        self.book = book
        self.answer = answer
        self.max_requests = max_requests
        self.max_lookups = max_lookups
        self.by_lookup: dict = {}  # (day, currency) -> [(request, received_at), ...]
        self.count = 0  # requests held
        self.group = Group()
        self._room = Event()
        self._room.set()
        self._idle = Event()
        self._idle.set()
        self.failed_lookups = 0  # lookups that ended in a RateError
        self.closed = False  # kill() came: nothing more is held
        self._failed_log = RateLimitedLog(log, WARN_EVERY_S)

    def __len__(self):
        return self.count

    def __bool__(self):
        return self.count > 0

    def has_room(self, request: Request) -> bool:
        """True if ``request`` can be held now."""
        if self.count >= self.max_requests:
            return False
        return (request.day, request.currency) in self.by_lookup or \
            len(self.by_lookup) < self.max_lookups

    def full(self) -> bool:
        return self.count >= self.max_requests or len(self.by_lookup) >= self.max_lookups

    def add(self, request: Request, received_at: float) -> bool:
        """Hold ``request`` until its table comes; the caller checked ``has_room``. False
        (not held) once ``kill()`` ended the waiting, at shutdown."""
        if self.closed:
            return False
        key = (request.day, request.currency)
        held = self.by_lookup.get(key)
        if held is None:
            held = self.by_lookup[key] = []
            self.group.spawn(self._wait_for, key)
        held.append((request, received_at))
        self.count += 1
        self._idle.clear()
        if self.full():
            self._room.clear()
        return True

    def wait_for_room(self, request: Request, timeout: float | None = None) -> bool:
        """Block until ``request`` can be held; False on timeout."""
        while not self.has_room(request):
            self._room.clear()
            if not self._room.wait(timeout):
                return False
        return True

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no request is held; False on timeout."""
        return self._idle.wait(timeout)

    def kill(self, timeout: float = 1.0) -> int:
        """Abandon every held request; returns how many were abandoned."""
        abandoned = self.count
        self.closed = True
        self.group.kill(timeout=timeout)
        self.by_lookup.clear()
        self.count = 0
        self._changed()
        return abandoned

    def _wait_for(self, key):
        day, currency = key
        outcome: RateTable | RateError
        try:
            outcome = self.book.get(day, currency)
        except RateError as e:
            outcome = e
            self._warn(day, currency, e, len(self.by_lookup.get(key, ())))
        except Exception as e:  # a bug must still leave the requests answered
            log.exception("waiting for the rate table of %s failed", day)
            outcome = RateError(f"internal error ({type(e).__name__})")
        held = self.by_lookup.pop(key, [])
        done = 0
        try:
            while done < len(held):
                part = held[done:done + SLICE]
                done += len(part)
                try:
                    self.answer(part, outcome)  # never yields
                finally:
                    self.count -= len(part)
                    self._changed()
                if done < len(held):
                    gevent.idle()
        finally:
            if done < len(held):  # killed between slices: the rest is abandoned
                self.count -= len(held) - done
                self._changed()

    def _warn(self, day, currency, error, held):
        """A lookup that finally failed is a WARNING; during an outage, one line a second
        at most, saying how many more failed since."""
        self.failed_lookups += 1
        self._failed_log.warning(
            "no rate table for %s (%s): %s; %d request(s) get an error reply",
            day.isoformat(), currency, error, held)

    def _changed(self):
        if not self.full():
            self._room.set()
        if self.count == 0:
            self._idle.set()
