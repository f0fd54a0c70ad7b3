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

import collections
import itertools
import logging
from collections.abc import Callable

from gevent.event import Event

from . import protocol
from .stats import Stats
from .ws import build_text_frames, frame_bytes

__all__ = ["CHUNK_BYTES", "OUTBOX_BYTES", "Chunk", "Delivery", "SendLog"]

log = logging.getLogger("exrate_green.service")
messages_log = logging.getLogger("exrate_green.messages")

#: most reply bytes handed to the writer in one chunk (a heartbeat waits one chunk at most)
CHUNK_BYTES = 256 * 1024
#: reply bytes the outbox holds before the reader stops reading (back-pressure)
OUTBOX_BYTES = 1024 * 1024
#: written replies recorded before their acknowledgements are read (the log is bounded:
#: past this, ``Delivery.wants_acks()`` asks the writer for the kernel's queue)
SENDLOG_SOFT_LIMIT = 4096

#: how a queued reply came to be queued (counted differently once written)
NEW, CARRIED, CARRIED_WRITTEN = 0, 1, 2


class SendLog:
    """Replies written on one connection whose bytes the peer has not acknowledged yet.

    Each entry is a reply and the stream offset just past its frame. ``forget_acked(acked)``
    forgets (and counts) the entries the peer acknowledged; what is left when the
    connection dies is the unacknowledged tail, to send again.
    """

    def __init__(self) -> None:
        self._ends: collections.deque[int] = collections.deque()
        self._replies: collections.deque[bytes] = collections.deque()

    def __len__(self) -> int:
        return len(self._ends)

    def extend(self, ends: list[int], replies: list[bytes]) -> None:
        """Record ``replies`` whose frames end at stream offsets ``ends`` (ascending)."""
        self._ends.extend(ends)
        self._replies.extend(replies)

    def forget_acked(self, acked: int | None) -> int:
        """Forget the replies wholly acknowledged up to stream offset ``acked``; returns
        how many (0 when ``acked`` is unknown)."""
        if acked is None:
            return 0
        ends, replies, settled = self._ends, self._replies, 0
        while ends and ends[0] <= acked:
            ends.popleft()
            replies.popleft()
            settled += 1
        return settled

    def take(self) -> list[bytes]:
        """Every reply still recorded, oldest first; the log is left empty."""
        replies = list(self._replies)
        self._ends.clear()
        self._replies.clear()
        return replies


class Chunk:
    """Frames to write in one go: an optional heartbeat, then replies, as one bytes object.

    ``start`` is the stream offset of ``data``'s first byte; ``ends[i]`` the offset just
    past reply ``i``'s frame. ``done`` counts the replies already accounted as written.
    """

    __slots__ = ("data", "start", "ends", "entries", "beat", "done")

    def __init__(self, data: bytes, start: int, ends: list[int],
                 entries: list[tuple[bytes, int]], beat: bool) -> None:
        self.data = data
        self.start = start
        self.ends = ends
        self.entries = entries
        self.beat = beat
        self.done = 0

    @property
    def end(self) -> int:
        """Stream offset just past the chunk."""
        return self.start + len(self.data)


class Delivery:
    """Every reply from the moment it is made until it is delivered, dropped or lost."""

    def __init__(self, stats: Stats, *, redelivery_window_s: float,
                 clock: Callable[[], float], show_messages: bool = False) -> None:
        self.stats = stats
        self.redelivery_window_s = redelivery_window_s
        self.clock = clock
        self.show_messages = show_messages
        #: replies for the current connection, oldest first: (reply, NEW/CARRIED/...)
        self.outbox: collections.deque[tuple[bytes, int]] = collections.deque()
        self.outbox_bytes = 0
        #: replies no connection took yet: (kept since, reply, written before), oldest first
        self.kept: collections.deque[tuple[float, bytes, bool]] = collections.deque()
        self.sent = SendLog()
        self.room = Event()  # set while the outbox is under its bound
        self.room.set()
        self.attached = False
        self._wake: Callable[[], object] | None = None

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
        self.outbox.extend((reply, NEW) for reply in replies)
        self.outbox_bytes += sum(map(len, replies))
        if self.outbox_bytes > OUTBOX_BYTES:
            self.room.clear()
        assert self._wake is not None
        self._wake()

    # -- a connection's life -----------------------------------------------------------------

    def attach(self, wake: Callable[[], object]) -> int:
        """A connection starts: replies kept for it (not too old) go first. ``wake`` is
        called whenever there is something new to write. Returns how many were carried."""
        self.expire()
        carried = [(reply, CARRIED_WRITTEN if written else CARRIED)
                   for _, reply, written in self.kept]
        self.kept.clear()
        self.outbox.extendleft(reversed(carried))
        self.outbox_bytes = sum(len(reply) for reply, _ in self.outbox)
        self.sent = SendLog()
        self.attached, self._wake = True, wake
        self._update_room()
        if carried:
            log.info("sending %d reply(ies) kept from earlier connections first", len(carried))
        return len(carried)

    def detach(self, ended_at: float, acked: int | None) -> None:
        """The connection ended at ``ended_at`` and the peer acknowledged our stream up to
        ``acked`` (None: unknown). What it did not deliver is kept for the next one,
        before anything made since (the queue stays in time order, oldest first)."""
        self.stats.delivered += self.sent.forget_acked(acked)
        unacked = self.sent.take()
        leftovers = [(reply, True) for reply in unacked]
        leftovers += [(reply, how == CARRIED_WRITTEN) for reply, how in self.outbox]
        self.outbox.clear()
        self.outbox_bytes = 0
        self.attached, self._wake = False, None
        self.room.set()
        if unacked:
            log.warning("%d written reply(ies) not acknowledged by the peer: kept for the "
                        "next connection", len(unacked))
        self.kept.extendleft((ended_at, reply, written)
                             for reply, written in reversed(leftovers))

    # -- the writer's side -------------------------------------------------------------------

    def pending(self) -> bool:
        """True if the outbox holds a reply to write."""
        return bool(self.outbox)

    def next_chunk(self, start: int, beat: bool) -> Chunk:
        """Take the next chunk (at most ``CHUNK_BYTES`` of replies, at least one reply if
        any) out of the outbox, framed from stream offset ``start``, a heartbeat first if
        ``beat``."""
        outbox, size = self.outbox, 0
        entries: list[tuple[bytes, int]] = []
        while outbox and (size < CHUNK_BYTES or not entries):
            entry = outbox.popleft()
            entries.append(entry)
            size += len(entry[0])
        self.outbox_bytes -= size
        messages = [reply for reply, _ in entries]
        if beat:
            messages.insert(0, protocol.HEARTBEAT)
        data = build_text_frames(messages, mask=True)
        first = start + (frame_bytes(len(protocol.HEARTBEAT)) if beat else 0)
        ends = list(itertools.accumulate((frame_bytes(len(r)) for r, _ in entries),
                                         initial=first))
        del ends[0]
        return Chunk(data, start, ends, entries, beat)

    def wrote(self, chunk: Chunk, upto: int) -> None:
        """The kernel took the chunk's bytes up to stream offset ``upto``: record the
        replies wholly written since the last call (hot path: one pass, no per-reply
        bookkeeping beyond two list slices)."""
        ends = chunk.ends
        done = chunk.done
        written = done
        if ends and ends[-1] <= upto:
            written = len(ends)
        else:
            while written < len(ends) and ends[written] <= upto:
                written += 1
        if written == done:
            return
        chunk.done = written
        taken = chunk.entries[done:written]
        self.sent.extend(ends[done:written], [reply for reply, _ in taken])
        stats = self.stats
        new = 0
        for _, how in taken:
            if how == NEW:
                new += 1
            else:
                stats.redelivered += 1
                if how == CARRIED:
                    new += 1
        stats.replies += new
        if self.show_messages:
            for reply, _ in taken:  # the formatter escapes it (text) or encodes it (JSON)
                messages_log.info("send %s", reply.decode("utf-8", "replace"))

    def unwrite(self, chunk: Chunk) -> None:
        """The rest of ``chunk`` was never (wholly) written: back to the outbox front."""
        rest = chunk.entries[chunk.done:]
        chunk.done = len(chunk.entries)
        if rest:
            self.outbox.extendleft(reversed(rest))
            self.outbox_bytes += sum(len(reply) for reply, _ in rest)

    def chunk_done(self) -> None:
        """A chunk was written whole: maybe there is room again for the reader."""
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
        entries = [written for _, _, written in self.kept]
        entries += [how == CARRIED_WRITTEN for _, how in self.outbox]
        entries += [True] * len(self.sent.take())
        self.kept.clear()
        self.outbox.clear()
        self.outbox_bytes = 0
        written = sum(entries)
        unwritten = len(entries) - written
        if unwritten:
            self.stats.dropped += unwritten
            log.warning("%d reply(ies) dropped: not written by the end of the grace period",
                        unwritten)
        if written:
            self.stats.possibly_lost += written
            log.warning("%d reply(ies) possibly lost: written, never acknowledged by the peer",
                        written)

