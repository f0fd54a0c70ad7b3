"""Which requests the simulator sent, on which connection, and which were answered.

Memory stays bounded however long a run lasts:

- a request's payload and send time are kept only while it is pending (``pending``);
  past ``max_pending`` unanswered requests the oldest is given up on (still counted as
  unanswered, in ``given_up``), so a client that never answers cannot grow it forever;
- automatic ids rise from 1 and are remembered only within a window of the last
  ``window`` ids, in two rings: the state (pending / answered / none) and the connection
  they were sent on. An older id is ``FORGOTTEN``: a reply to it is a problem, but whether
  it is a duplicate can no longer be told;
- ids chosen by the caller (``send_request(id=...)``) live in a dict of at most
  ``window`` entries, oldest dropped first.
"""

import collections
from array import array
from collections.abc import Iterable
from typing import Any

__all__ = ["Ledger"]

Entry = tuple  # (expected payload or Template or None, monotonic send time, connection number)


class Ledger:
    """Request ids and what became of them; see the module docstring."""

    NONE, PENDING, ANSWERED, FORGOTTEN = 0, 1, 2, 3

    def __init__(self, window: int = 1 << 16, max_pending: int = 250_000):
        if window & (window - 1) or window <= 0:
            raise ValueError("the id window is a power of two")
        self.window = window
        self.max_pending = max_pending
        self._slot_mask = window - 1
        self._state = bytearray(window)                # slot of an auto id -> its state
        self._conn = array("I", bytes(4 * window))     # slot -> the connection it was sent on
        self._explicit: collections.OrderedDict = collections.OrderedDict()  # id -> [state, conn]
        self.next_id = 1
        self.pending: dict[Any, Entry] = {}
        self.sent = 0          # requests sent (a failed send is taken back)
        self.answered = 0      # requests answered at least once
        self.given_up = 0      # requests dropped from ``pending`` unanswered

    @property
    def unanswered(self) -> int:
        return len(self.pending) + self.given_up

    # -- ids
    def _in_window(self, rid: Any) -> bool:
        return type(rid) is int and 0 < rid < self.next_id and rid >= self.next_id - self.window

    def _is_auto(self, rid: Any) -> bool:
        return type(rid) is int and 0 < rid < self.next_id and rid not in self._explicit

    def allocate(self) -> int:
        """The next automatic id (skipping ids the caller chose)."""
        rid = self.next_id
        while rid in self._explicit:
            rid += 1
        self.next_id = rid + 1
        return rid

    def allocate_many(self, n: int) -> Iterable[int]:
        """``n`` fresh automatic ids, rising."""
        if self._explicit:
            return [self.allocate() for _ in range(n)]
        first = self.next_id
        self.next_id = first + n
        return range(first, first + n)

    # -- sending
    def register(self, rid: Any, expected: Any, conn_number: int, t_sent: float,
                 auto: bool) -> None:
        """``rid`` was sent on connection ``conn_number`` at ``t_sent``; a reply must match
        ``expected`` (a Template, a payload, or None for nothing to compare)."""
        if auto:
            slot = rid & self._slot_mask
            self._state[slot] = self.PENDING
            self._conn[slot] = conn_number
        else:
            explicit = self._explicit
            explicit[rid] = [self.PENDING, conn_number]
            explicit.move_to_end(rid)
            if len(explicit) > self.window:
                explicit.popitem(last=False)
        self._add_pending(rid, (expected, t_sent, conn_number))

    def register_many(self, ids: Iterable[int], expected: Iterable[Any], conn_number: int,
                      t_sent: float) -> None:
        """``register`` for ids from ``allocate_many``, all sent at ``t_sent``."""
        state, conns, slot_mask, pending = self._state, self._conn, self._slot_mask, self.pending
        n = 0
        for rid, payload in zip(ids, expected):
            slot = rid & slot_mask
            state[slot] = self.PENDING
            conns[slot] = conn_number
            pending[rid] = (payload, t_sent, conn_number)
            n += 1
        self.sent += n
        self._give_up_beyond_max()

    def _add_pending(self, rid: Any, entry: Entry) -> None:
        self.pending.pop(rid, None)   # a reused id replaces the earlier record
        self.pending[rid] = entry
        self.sent += 1
        self._give_up_beyond_max()

    def _give_up_beyond_max(self) -> None:
        pending = self.pending
        while len(pending) > self.max_pending:
            oldest = next(iter(pending))
            del pending[oldest]
            self.given_up += 1
            self._mark(oldest, self.FORGOTTEN)

    def _mark(self, rid: Any, state: int) -> None:
        entry = self._explicit.get(rid)
        if entry is not None:
            entry[0] = state
        elif self._in_window(rid):
            self._state[rid & self._slot_mask] = state

    def unregister(self, rid: Any) -> None:
        """The send of ``rid`` failed: as if it had never been registered."""
        if self.pending.pop(rid, None) is None:
            return
        self.sent -= 1
        if rid in self._explicit:
            del self._explicit[rid]
        elif self._in_window(rid):
            self._state[rid & self._slot_mask] = self.NONE
            self._conn[rid & self._slot_mask] = 0

    # -- replies
    def state(self, rid: Any) -> int:
        """NONE (never sent), PENDING, ANSWERED or FORGOTTEN (an automatic id too old)."""
        try:
            entry = self._explicit.get(rid)
        except TypeError:  # unhashable id
            return self.NONE
        if entry is not None:
            return entry[0]
        if not self._is_auto(rid):
            return self.NONE
        return self._state[rid & self._slot_mask] if self._in_window(rid) else self.FORGOTTEN

    def take(self, rid: Any) -> Entry | None:
        """The pending entry of ``rid``, now answered; None if ``rid`` is not pending."""
        try:
            found = self.pending.pop(rid, None)
        except TypeError:  # unhashable id
            return None
        if found is not None:
            self.answered += 1
            self._mark(rid, self.ANSWERED)
        return found

    def answer(self, rid: Any) -> Entry | None:
        """``take`` for a pending id whose reply carries it with another type (1.0 for 1):
        ``state`` found it pending under an equal key."""
        found = self.pending.pop(rid, None)
        if found is not None:
            self.answered += 1
            self._mark(rid, self.ANSWERED)
        return found

    def sent_on(self, rid: Any) -> int | None:
        """The connection number ``rid`` was sent on; None if unknown or forgotten."""
        try:
            entry = self._explicit.get(rid)
            found = self.pending.get(rid)
        except TypeError:
            return None
        if entry is not None:
            return entry[1]
        if found is not None:
            return found[2]
        if self._is_auto(rid) and self._in_window(rid):
            return self._conn[rid & self._slot_mask] or None
        return None

    def pending_on_other_connections(self, live: Iterable[int]) -> int:
        """Pending requests sent on a connection not in ``live`` (one that has ended)."""
        live = set(live)
        return sum(1 for _, _, number in self.pending.values() if number not in live)

    def sizes(self) -> dict:
        """How many entries each structure holds (for tests of the memory bound)."""
        return {"pending": len(self.pending), "explicit": len(self._explicit),
                "state_ring": len(self._state), "conn_ring": len(self._conn)}
