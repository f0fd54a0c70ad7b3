"""A reply's whole life, from made to delivered, across connections.

``Delivery`` is the one owner of every reply: it queues what dispatch makes, hands the
writer what to write next, records what the kernel took, learns what the peer's TCP
acknowledged, carries what a dead connection did not deliver to the next one, expires
what waited too long, and counts each step in ``Stats``:

* ``replies``       the kernel took a reply for the first time;
* ``delivered``     the peer's TCP acknowledged its bytes;
* ``redelivered``   a reply kept from a dead connection was written on the next one;
* ``dropped``       never written: no connection within the redelivery window, shutdown;
* ``possibly_lost`` written, never acknowledged, and not sent again.

It never touches a socket and never yields: the writer (``writer.Writer``) asks it for
the next ``Chunk`` and tells it how many of the chunk's bytes the kernel took; the
session tells it when a connection starts (``attach``) and when it ended (``detach``,
with the stream offset the peer acknowledged).

The outbox has a byte bound: past ``OUTBOX_BYTES`` the reader stops reading
(back-pressure) instead of memory growing; ``room`` is set while there is room.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
from collections.abc import Callable

from gevent.event import Event

from . import protocol
from .stats import Stats
from .ws import build_text_frames, frame_bytes

__all__ = ["CHUNK_BYTES", "OUTBOX_BYTES", "Chunk", "Delivery", "SendLog", "Sent"]

log = logging.getLogger("exrate_green.service")
messages_log = logging.getLogger("exrate_green.messages")

#: most reply bytes handed to the writer in one chunk (a heartbeat waits one chunk at most)
CHUNK_BYTES = 256 * 1024
#: reply bytes the outbox holds before the reader stops reading (back-pressure)
OUTBOX_BYTES = 1024 * 1024
#: bytes of a heartbeat frame (it may lead a chunk)
HEARTBEAT_FRAME_BYTES = frame_bytes(len(protocol.HEARTBEAT))
#: written replies recorded before their acknowledgements are read (the log is bounded:
#: past this, ``Delivery.wants_acks()`` asks the writer for the kernel's queue)
SENDLOG_SOFT_LIMIT = 4096



def _frame_ends(start: int, replies: list[bytes]) -> list[int]:
    """Stream offsets just past each reply's frame, framed one after another from ``start``."""
    ends = list(itertools.accumulate((frame_bytes(len(r)) for r in replies), initial=start))
    del ends[0]
    return ends


class Sent:
    """Replies written whole, one after another: the stream from ``start`` to ``end``."""

    __slots__ = ("start", "end", "replies")

    def __init__(self, start: int, end: int, replies: list[bytes]) -> None:
        self.start, self.end, self.replies = start, end, replies

    def split(self, acked: int) -> tuple[list[bytes], list[bytes]]:
        """(acknowledged, not) replies, for ``acked`` inside this stretch."""
        done = bisect.bisect_right(_frame_ends(self.start, self.replies), acked)
        return self.replies[:done], self.replies[done:]


class SendLog:
    """Replies written on one connection whose bytes the peer has not acknowledged yet.

    Kept a stretch of the stream at a time (each ``Sent``: a chunk's replies, or the part
    of a chunk written so far), not a reply at a time: the hot path appends one record per
    write, and offsets are worked out per reply only for the stretch the connection died
    in. ``forget_acked(acked)`` forgets (and counts) what the peer acknowledged; what is
    left when the connection dies is the unacknowledged tail, to send again.
    """

    def __init__(self) -> None:
        self._log: collections.deque[Sent] = collections.deque()
        self.replies = 0  # replies recorded

    def __len__(self) -> int:
        return self.replies

    def add(self, start: int, end: int, replies: list[bytes]) -> None:
        """Record ``replies``, framed one after another from ``start`` to ``end``."""
        self._log.append(Sent(start, end, replies))
        self.replies += len(replies)

    def forget_acked(self, acked: int | None) -> int:
        """Forget the stretches wholly acknowledged up to stream offset ``acked``; returns
        how many replies (0 when ``acked`` is unknown)."""
        if acked is None:
            return 0
        log, settled = self._log, 0
        while log and log[0].end <= acked:
            settled += len(log.popleft().replies)
        self.replies -= settled
        return settled

    def take(self, acked: int | None) -> tuple[int, list[bytes]]:
        """At the end: (replies acknowledged up to ``acked``, the rest, oldest first); the
        log is left empty."""
        delivered = self.forget_acked(acked)
        rest: list[bytes] = []
        for index, sent in enumerate(self._log):
            if index == 0 and acked is not None and sent.start < acked:
                done, left = sent.split(acked)
                delivered += len(done)
                rest.extend(left)
            else:
                rest.extend(sent.replies)
        self._log.clear()
        self.replies = 0
        return delivered, rest


class Chunk:
    """Frames to write in one go: an optional heartbeat, then replies, as one bytes object.

    ``start`` is the stream offset of ``data``'s first byte; ``first`` that of the first
    reply's frame. ``carried``: for each of the first replies that were carried from an
    earlier connection, whether it had been written there. ``done`` counts the replies
    already accounted as written.
    """

    __slots__ = ("data", "start", "first", "replies", "carried", "beat", "done", "_ends")

    def __init__(self, data: bytes, start: int, first: int, replies: list[bytes],
                 carried: list[bool], beat: bool) -> None:
        self.data = data
        self.start = start
        self.first = first
        self.replies = replies
        self.carried = carried
        self.beat = beat
        self.done = 0
        self._ends: list[int] | None = None

    def written_by(self, upto: int) -> int:
        """How many of the replies are wholly written once the stream reaches ``upto``."""
        if upto >= self.start + len(self.data):
            return len(self.replies)
        if self._ends is None:  # a part-written chunk: per-reply offsets, only now
            self._ends = _frame_ends(self.first, self.replies)
        return bisect.bisect_right(self._ends, upto)

    def offset_after(self, count: int) -> int:
        """Stream offset just past the first ``count`` replies."""
        if count == 0:
            return self.first
        if count == len(self.replies):
            return self.start + len(self.data)
        if self._ends is None:
            self._ends = _frame_ends(self.first, self.replies)
        return self._ends[count - 1]


class Delivery:
    """Every reply from the moment it is made until it is delivered, dropped or lost."""

    def __init__(self, stats: Stats, *, redelivery_window_s: float,
                 clock: Callable[[], float], show_messages: bool = False) -> None:
        self.stats = stats
        self.redelivery_window_s = redelivery_window_s
        self.clock = clock
        self.show_messages = show_messages
        #: replies for the current connection, oldest first
        self.outbox: collections.deque[bytes] = collections.deque()
        self.outbox_bytes = 0
        #: for the outbox's first entries, carried from an earlier connection: whether each
        #: had been written there (so its write counts as a redelivery, not a new reply)
        self._carried: collections.deque[bool] = collections.deque()
        #: replies no connection took yet: (kept since, reply, written before), oldest first
        self.kept: collections.deque[tuple[float, bytes, bool]] = collections.deque()
        self.sent = SendLog()
        self.room = Event()  # set while the outbox is under its bound
        self.room.set()
        self.attached = False
        self._wake: Callable[[], object] | None = None
        self._push: Callable[[], object] | None = None

    def __len__(self) -> int:
        """Replies not yet written (queued for this connection, or kept for the next)."""
        return len(self.outbox) + len(self.kept)

    # -- replies in ------------------------------------------------------------------------

    def post(self, replies: list[bytes]) -> None:
        """Queue replies: on the current connection (the writer is told), else kept for
        the next one. Never blocks (the reader checks ``room`` before reading more)."""
        if not self.attached:
            now = self.clock()
            self.kept.extend((now, reply, False) for reply in replies)
            return
        self.outbox.extend(replies)
        self.outbox_bytes += sum(map(len, replies))
        if self.outbox_bytes > OUTBOX_BYTES:
            self.room.clear()
        assert self._wake is not None
        self._wake()

    # -- a connection's life -----------------------------------------------------------------

    def attach(self, wake: Callable[[], object], push: Callable[[], object]) -> int:
        """A connection starts: replies kept for it (not too old) go first. ``wake`` is
        called whenever there is something new to write (the writer chooses when);
        ``push`` when it must be written before the caller waits. Returns how many were
        carried."""
        self.expire()
        carried = list(self.kept)
        self.kept.clear()
        self.outbox.extendleft(reply for _, reply, _ in reversed(carried))
        self._carried = collections.deque(written for _, _, written in carried)
        self.outbox_bytes = sum(map(len, self.outbox))
        self.sent = SendLog()
        self.attached, self._wake, self._push = True, wake, push
        self._update_room()
        if carried:
            log.info("sending %d reply(ies) kept from earlier connections first", len(carried))
        return len(carried)

    def detach(self, ended_at: float, acked: int | None) -> None:
        """The connection ended at ``ended_at`` and the peer acknowledged our stream up to
        ``acked`` (None: unknown). What it did not deliver is kept for the next one,
        before anything made since (the queue stays in time order, oldest first)."""
        delivered, unacked = self.sent.take(acked)
        self.stats.delivered += delivered
        flags = list(self._carried) + [False] * (len(self.outbox) - len(self._carried))
        leftovers = [(reply, True) for reply in unacked]
        leftovers += zip(self.outbox, flags)
        self.outbox.clear()
        self._carried.clear()
        self.outbox_bytes = 0
        self.attached, self._wake, self._push = False, None, None
        self.room.set()
        if unacked:
            log.warning("%d written reply(ies) not acknowledged by the peer: kept for the "
                        "next connection", len(unacked))
        self.kept.extendleft((ended_at, reply, written)
                             for reply, written in reversed(leftovers))

    def push(self) -> None:
        """Whoever made replies is about to wait: they are written now, not later."""
        if self._push is not None:
            self._push()

    # -- the writer's side -------------------------------------------------------------------

    def pending(self) -> bool:
        """True if the outbox holds a reply to write."""
        return bool(self.outbox)

    def next_chunk(self, start: int, beat: bool) -> Chunk:
        """Take the next chunk (at most ``CHUNK_BYTES`` of replies, at least one reply if
        any) out of the outbox, framed from stream offset ``start``, a heartbeat first if
        ``beat``."""
        outbox = self.outbox
        if self.outbox_bytes <= CHUNK_BYTES:  # the usual case: everything queued
            replies = list(outbox)
            outbox.clear()
            size = self.outbox_bytes
        else:
            replies, size = [], 0
            while outbox and (size < CHUNK_BYTES or not replies):
                reply = outbox.popleft()
                replies.append(reply)
                size += len(reply)
        self.outbox_bytes -= size
        carried: list[bool] = []
        if self._carried:
            take = min(len(self._carried), len(replies))
            carried = [self._carried.popleft() for _ in range(take)]
        if beat:
            data = build_text_frames([protocol.HEARTBEAT, *replies], mask=True)
            first = start + HEARTBEAT_FRAME_BYTES
        else:
            data = build_text_frames(replies, mask=True)
            first = start
        return Chunk(data, start, first, replies, carried, beat)

    def wrote(self, chunk: Chunk, upto: int) -> None:
        """The kernel took the chunk's bytes up to stream offset ``upto``: record the
        replies wholly written since the last call (one record per call, not per reply)."""
        done = chunk.done
        written = chunk.written_by(upto)
        if written == done:
            return
        chunk.done = written
        replies = chunk.replies if done == 0 and written == len(chunk.replies) \
            else chunk.replies[done:written]
        self.sent.add(chunk.offset_after(done), chunk.offset_after(written), replies)
        stats = self.stats
        new = len(replies)
        if chunk.carried and done < len(chunk.carried):
            flags = chunk.carried[done:written]
            stats.redelivered += len(flags)
            new -= sum(flags)  # written before: counted in replies then
        stats.replies += new
        if self.show_messages:
            for reply in replies:  # the formatter escapes it (text) or encodes it (JSON)
                messages_log.info("send %s", reply.decode("utf-8", "replace"))

    def unwrite(self, chunk: Chunk) -> None:
        """The rest of ``chunk`` was never (wholly) written: back to the outbox front."""
        done = chunk.done
        rest = chunk.replies[done:]
        chunk.done = len(chunk.replies)
        if not rest:
            return
        self.outbox.extendleft(reversed(rest))
        self.outbox_bytes += sum(map(len, rest))
        flags = chunk.carried[done:]
        if flags:
            self._carried.extendleft(reversed(flags))

    def chunk_done(self) -> None:
        """A chunk was written whole: maybe there is room again for the reader."""
        if not self.room.is_set():
            self._update_room()

    def wants_acks(self) -> bool:
        """True when the written log is long enough that reading the peer's
        acknowledgements (an ioctl) is worth it now."""
        return len(self.sent) > SENDLOG_SOFT_LIMIT

    def acked(self, upto: int | None) -> None:
        """The peer acknowledged our stream up to offset ``upto`` (None: unknown)."""
        self.stats.delivered += self.sent.forget_acked(upto)

    def _update_room(self) -> None:
        if self.outbox_bytes <= OUTBOX_BYTES:
            self.room.set()
        else:
            self.room.clear()

    # -- what no connection took ----------------------------------------------------------

    def expire(self) -> None:
        """Drop kept replies older than the redelivery window (the oldest are first)."""
        oldest_allowed = self.clock() - self.redelivery_window_s
        kept, dropped, lost = self.kept, 0, 0
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
                        "no connection within %.0f s", dropped, lost, self.redelivery_window_s)

    def give_up(self) -> None:
        """Shutdown: whatever is still kept or queued is counted, dropped or possibly lost."""
        _, unacked = self.sent.take(None)
        flags = [written for _, _, written in self.kept]
        flags += list(self._carried) + [False] * (len(self.outbox) - len(self._carried))
        flags += [True] * len(unacked)
        self.kept.clear()
        self.outbox.clear()
        self._carried.clear()
        self.outbox_bytes = 0
        written = sum(flags)
        unwritten = len(flags) - written
        if unwritten:
            self.stats.dropped += unwritten
            log.warning("%d reply(ies) dropped: not written by the end of the grace period",
                        unwritten)
        if written:
            self.stats.possibly_lost += written
            log.warning("%d reply(ies) possibly lost: written, never acknowledged by the peer",
                        written)
