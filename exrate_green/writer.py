"""The one writer of a connection: heartbeats and replies, in order, never two at once.

Writes happen where they are asked for, when they can: ``flush()`` (called by whoever
queued something: a greenlet answering requests that waited for a rate table, the
heartbeat timer) writes what is queued *without waiting*, as far as the kernel takes it.
The reader's own replies are written when its turn ends (``end_turn``: it is about to
wait for bytes, to yield, or to wait for room), so every batch it read in one turn leaves
in one write: under load that is one send for many batches, and a send on loopback costs
more than everything else a reply needs. Only when the kernel has no room, and for the
rest of a frame it took half of, does the ``write_loop`` greenlet take over: it waits for
room with a deadline on progress (``send_timeout_s``), while the reader goes on reading
until the outbox is full. So no reply pays a hand-off (event, hub turn, switch).

Under TLS nothing can be written half-way without waiting, so every write goes through the
greenlet, as a whole.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent
from gevent.event import Event

from . import protocol
from .connection import Connection
from .delivery import Chunk, Delivery
from .errors import ConnectionClosed
from .link import MeteredSocket
from .stats import Stats
from .ws import build_text_frames

__all__ = ["Writer"]

log = logging.getLogger("exrate_green.service")


class Writer:
    """Writes the delivery's chunks and the heartbeats on one connection."""

    def __init__(self, conn: Connection, sock: MeteredSocket, delivery: Delivery,
                 stats: Stats) -> None:
        self.conn = conn
        self.sock = sock
        self.delivery = delivery
        self.stats = stats
        self.heartbeat_due = False
        #: the chunk being written and its first unwritten byte (None: between chunks)
        self._chunk: Chunk | None = None
        self._offset = 0
        self._busy = False  # write_loop is inside a blocking write
        #: the reader greenlet: what it queues waits for the end of its turn
        self.reader: Any = None
        self._deferred = False  # the reader queued something during its turn
        #: a write that failed outside the greenlet: raised by it (whose end ends the session)
        self._failed: ConnectionClosed | None = None
        self._wake = Event()
        self._idle = Event()  # set while nothing is queued or being written
        self._idle.set()

    # -- asking for writes ------------------------------------------------------------------

    def beat(self) -> None:
        """A heartbeat is due: written at once, or first in the next chunk."""
        self.heartbeat_due = True
        self.flush()

    def flush(self) -> None:
        """Write what is queued as far as the kernel takes it now; never waits. What is
        left is the ``write_loop``'s. Asked by the reader, it waits for its turn's end."""
        if self._busy or self._failed is not None:
            return
        if self.reader is not None and gevent.getcurrent() is self.reader:
            self._deferred = True
            return
        self._write_now()

    def end_turn(self) -> None:
        """The reader's turn ends (it is about to wait or yield): write what it queued."""
        if self._deferred:
            self._deferred = False
            if not self._busy and self._failed is None:
                self._write_now()

    def _write_now(self) -> None:
        try:
            while self._chunk is not None or self.heartbeat_due or self.delivery.pending():
                if self._chunk is None:
                    self._take()
                if not self._write_nowait():
                    self._idle.clear()
                    self._wake.set()  # the kernel is full: the greenlet waits for room
                    return
        except ConnectionClosed as e:  # the caller is not the writer: the greenlet raises it
            self.abandon()
            self._failed = e
            self._wake.set()
            return
        self._idle.set()

    def mid_frame(self) -> bool:
        """True if the stream stands inside a frame (a close frame now would be garbage)."""
        return self._chunk is not None and self._offset > 0 or self.sock.writing or \
            self.sock.torn

    def drained(self) -> bool:
        """True when nothing is queued or being written."""
        return self._chunk is None and not self.delivery.pending() and not self._busy

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until everything queued is written; False on timeout."""
        if self.drained():
            return True
        self._idle.clear()
        self._wake.set()
        return self._idle.wait(timeout_s) and self.drained()

    # -- the greenlet -----------------------------------------------------------------------

    def write_loop(self) -> None:
        """Finish what ``flush()`` could not: waits for room, with a deadline on progress."""
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._failed is not None:
                raise self._failed
            while self._chunk is not None or self.heartbeat_due or self.delivery.pending():
                if self._chunk is None:
                    self._take()
                self._write_blocking()
            self._idle.set()

    def read_acks(self) -> None:
        """Read what the peer acknowledged (an ioctl): after writes, when the log of
        written replies is long, and from the heartbeat timer."""
        self.delivery.acked(self.sock.acked_offset())

    def abandon(self) -> None:
        """The connection is gone: what was taken but not written goes back."""
        chunk, self._chunk = self._chunk, None
        if chunk is not None:
            self.delivery.unwrite(chunk)
        self._idle.set()

    # -- one chunk ------------------------------------------------------------------------

    def _take(self) -> None:
        beat, self.heartbeat_due = self.heartbeat_due, False
        if self.delivery.pending():
            self._chunk = self.delivery.next_chunk(self.sock.bytes_sent, beat)
        else:
            data = build_text_frames([protocol.HEARTBEAT], mask=True)
            start = self.sock.bytes_sent
            self._chunk = Chunk(data, start, start + len(data), [], [], True)
        self._offset = 0

    def _write_nowait(self) -> bool:
        """Write the current chunk without waiting; True when it is written whole."""
        chunk = self._chunk
        assert chunk is not None
        data = chunk.data
        sent = self.conn.send_nowait(
            data if not self._offset else memoryview(data)[self._offset:])
        if sent is None:  # TLS: the greenlet writes it
            return False
        self._offset += sent
        self._progress(chunk)
        return self._chunk is None

    def _write_blocking(self) -> None:
        chunk = self._chunk
        assert chunk is not None
        self._busy = True
        before = self.sock.bytes_sent
        try:
            self.conn.send_data(memoryview(chunk.data)[self._offset:])
        finally:
            self._busy = False
            self._offset += self.sock.bytes_sent - before
            if self._chunk is chunk:
                self._progress(chunk)

    def _progress(self, chunk: Chunk) -> None:
        """Account the chunk's bytes written so far; done with it once whole."""
        self.delivery.wrote(chunk, chunk.start + self._offset)
        if self._offset < len(chunk.data):
            return
        self._chunk = None
        if chunk.beat:
            self.stats.heartbeats_sent += 1
        self.delivery.chunk_done()
        if self.delivery.wants_acks():
            self.read_acks()
