"""One connection: its reader, writer, heartbeat sender and silence watchdog.

``Session`` lives as long as one connection and owns its four greenlets in one ``Group``:

* ``receive_loop`` reads batches of frames and hands them to the service;
* ``write_loop`` is the only greenlet that writes replies and heartbeats: it takes them
  from the session's outbox, a heartbeat first when one is due, and writes them in
  chunks. A write that makes no progress for ``send_timeout_s`` ends the connection
  (``link.MeteredSocket``); until then everything waits in the outbox, and when the
  outbox is full the reader stops reading (back-pressure) instead of memory growing;
* ``heartbeat`` asks for a heartbeat every ``heartbeat_interval_s`` (it never writes,
  so a blocked write never blocks it: the heartbeat queues behind the write);
* ``silence_watchdog`` abandons the connection when the upstream is silent.

The silence rule: time counts towards the heartbeat timeout only while the reader is
parked in ``recv`` on an empty socket, and the connection is abandoned only if, once
more than ``heartbeat_timeout_s`` of such time has passed since the open or the last
upstream heartbeat, the socket still holds no unread byte. Time the reader spends
handling a backlog, blocked on a write (a pong), or waiting for room is not silence.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult, Event
from gevent.pool import Group

from . import protocol
from .errors import ConnectionClosed
from .link import MeteredSocket, SendLog, frame_bytes

if TYPE_CHECKING:
    from .connection import Connection
    from .service import Service

log = logging.getLogger("exrate_green.service")

#: most reply bytes written in one ``sendall`` (a heartbeat waits at most one chunk)
CHUNK_BYTES = 256 * 1024
#: reply bytes the outbox holds before the reader stops reading (back-pressure)
OUTBOX_BYTES = 1024 * 1024


class Session:
    """One connection and its greenlets; ``run()`` serves until the connection ends."""

    def __init__(self, service: Service, conn: Connection,
                 carried: Iterable[tuple[bytes, bool]] = ()) -> None:
        """``carried``: (reply, written_before) pairs from earlier connections, oldest
        first; they are written before anything else."""
        self.service = service
        self.stats = service.stats
        self.progress = service.progress
        self.conn = conn
        self.settings = service.settings
        self.clock = service.clock
        # Connection declares a plain socket and no hook; the metered one stands in for it.
        self.sock = conn.sock = MeteredSocket(  # type: ignore[assignment]
            conn.sock, send_timeout_s=self.settings.send_timeout_s, clock=self.clock)
        conn.before_close = self._flush_before_close  # type: ignore[assignment]
        self.last_heartbeat_at = self.clock()  # for logs and health; the rule is parked time
        self.heartbeats_received = 0
        self.outbox = collections.deque(carried)  # (reply bytes, written before)
        self.outbox_bytes = sum(len(reply) for reply, _ in self.outbox)
        self.carried_left = len(self.outbox)  # the outbox's first entries are carried ones
        self.sent = SendLog()
        self.heartbeat_due = False
        self.closing = False  # shutdown: the reader stops after its batch
        self._wake_writer = Event()
        self._room = Event()
        self._drained = Event()
        self.greenlets = Group()
        self.ended = AsyncResult()
        self.ended_at: float | None = None
        self.reader = self.writer = None

    # -- lifetime -----------------------------------------------------------------------

    def run(self) -> str:
        """Serve until the connection ends; returns why it ended."""
        self.progress.session_started()
        try:
            self.writer = self.greenlets.spawn(self._job, self.write_loop)
            self.greenlets.spawn(self._job, self.heartbeat)
            self.greenlets.spawn(self._job, self.silence_watchdog)
            self.reader = self.greenlets.spawn(self._job, self.receive_loop)
            return self.ended.get()
        finally:
            self.conn.abort()
            self.greenlets.kill(timeout=1)
            self.progress.session_ended()

    @property
    def alive(self) -> bool:
        return not self.ended.ready()

    def end(self, cause: str) -> None:
        """End the session: no more reading or writing (the socket itself is closed by
        ``settle()``, once its unacknowledged bytes are known)."""
        if not self.ended.ready():
            self.ended_at = self.clock()
            self.ended.set(cause)
        self.conn.abort()

    def settle(self) -> tuple[float, list[tuple[bytes, bool]]]:
        """After ``run()``: close the socket, reading its send queue first, and return
        (when it ended, [(reply, written_before), ...]) for the replies not known to be
        delivered, in the order they were made: the unacknowledged tail, then the outbox.
        Nothing is posted to the session any more (``service.session`` is None)."""
        self.sock.settle_and_close()
        self.stats.delivered += self.sent.settle(self.sock.acked_offset())
        unacked = [(reply, True) for reply in self.sent.take()]
        rest = list(self.outbox)
        self.outbox.clear()
        self.outbox_bytes = 0
        return (self.ended_at or self.clock()), unacked + rest

    def _job(self, loop):
        try:
            loop()
        except ConnectionClosed as e:
            self.end(e.cause)
        except gevent.GreenletExit:
            raise
        except Exception:
            log.exception("%s failed", loop.__name__)
            self.end(f"internal error in {loop.__name__}")

    # -- reading --------------------------------------------------------------------------

    def receive_loop(self) -> None:
        progress = self.progress
        while not self.closing:
            progress.reader_parked()  # for room, or for bytes: bounded elsewhere
            self.wait_for_room()
            events = self.conn.receive()
            progress.reader_turned()
            self.service.handle(events, self)
            # Under load recv never blocks: let heartbeats and timers run. Not sleep(0):
            # gevent runs sleep(0) callbacks back to back and looks at its timers only
            # every 50 of them, so with big batches a heartbeat could wait a second.
            # Only under load: with nothing waiting, recv parks (and yields) anyway, and
            # time spent yielding here would not count as silence.
            if self.sock.unread_bytes():
                gevent.idle()

    def stop_reading(self, deadline: float) -> None:
        """Shutdown: read no more, and write nothing past ``deadline`` (a ``clock()``
        time). A reader parked on an empty socket is stopped now; one handling a batch
        finishes it first (those requests were read: they get replies)."""
        self.sock.deadline_at = deadline
        self.closing = True
        reader = self.reader
        if reader is not None and self.sock.parked_since is not None:
            reader.kill(block=False)

    def on_heartbeat(self) -> None:
        self.last_heartbeat_at = self.clock()
        self.sock.reset_parked()
        self.heartbeats_received += 1
        self.stats.heartbeats_received += 1

    def silence_watchdog(self) -> None:
        """End the connection once the upstream has been silent for over
        ``heartbeat_timeout_s`` while we were free to read it (the module's rule)."""
        timeout_s = self.settings.heartbeat_timeout_s
        while True:
            silent_s = self.sock.silent_s()
            if (silent_s > timeout_s and self.sock.parked_since is not None
                    and not self.sock.unread_bytes()):
                raise ConnectionClosed(
                    f"no heartbeat from upstream for {silent_s:.2f} s "
                    f"({self.clock() - self.last_heartbeat_at:.2f} s since the last one)")
            gevent.sleep(max(timeout_s - silent_s, 0.02) + 0.005)

    # -- writing --------------------------------------------------------------------------

    def post(self, replies: list[bytes]) -> None:
        """Queue replies for the writer (never blocks; the reader checks the room)."""
        self.outbox.extend((reply, False) for reply in replies)
        self.outbox_bytes += sum(map(len, replies))
        self._drained.clear()
        self._wake_writer.set()

    def wait_for_room(self) -> None:
        """Back-pressure: while the outbox is over its bound, the reader waits."""
        if self.outbox_bytes > OUTBOX_BYTES:
            self.stats.backpressure_waits += 1
        while self.outbox_bytes > OUTBOX_BYTES:
            self._room.clear()
            self._room.wait()

    def drain(self, timeout_s: float) -> bool:
        """Wait until the outbox is written; False on timeout."""
        deadline = self.clock() + timeout_s
        while self.outbox or self.sock.writing:
            left_s = deadline - self.clock()
            if left_s <= 0 or not self.alive:  # a dead session writes nothing more
                return False
            self._drained.wait(min(left_s, 0.05))
        return True

    def _flush_before_close(self):
        """The peer closes: replies to what it sent before its close frame go first."""
        self.drain(self.settings.heartbeat_timeout_s)

    def heartbeat(self) -> None:
        """Ask for a heartbeat at once, then every ``heartbeat_interval_s``, without drift.
        A heartbeat still waiting behind a blocked write is not doubled."""
        interval_s = self.settings.heartbeat_interval_s
        due = self.clock()
        while True:
            self.progress.heartbeat_turned()
            self.heartbeat_due = True
            self._wake_writer.set()
            due += interval_s
            delay_s = due - self.clock()
            if delay_s < 0:  # we fell behind (a stalled hub): restart the schedule, no burst
                due, delay_s = self.clock(), 0
            gevent.sleep(delay_s)

    def write_loop(self) -> None:
        while True:
            if not self.outbox and not self.heartbeat_due:
                self._drained.set()
                self.stats.delivered += self.sent.settle(self.sock.acked_offset())
                self._wake_writer.clear()
                self._wake_writer.wait()
                continue
            self._write_chunk()

    def _write_chunk(self):
        self._drained.clear()
        beat = self.heartbeat_due
        self.heartbeat_due = False
        chunk: list[tuple[bytes, bool]] = []
        size = 0
        outbox = self.outbox
        while outbox and (size < CHUNK_BYTES or not chunk):
            entry = outbox.popleft()
            chunk.append(entry)
            size += len(entry[0])
        self.outbox_bytes -= size
        messages = [protocol.HEARTBEAT] * beat + [reply for reply, _ in chunk]
        self.sock.last_write = None
        try:
            self.conn.send(messages)
        finally:
            self._account(chunk, beat, messages)
        if beat:
            self.stats.heartbeats_sent += 1
        if self.outbox_bytes <= OUTBOX_BYTES:
            self._room.set()

    def _account(self, chunk, beat, messages):
        """Record what the kernel took (to map unacknowledged bytes back to replies); put
        back what it did not, first in the outbox. One pass over the chunk (hot path)."""
        last = self.sock.last_write
        sizes = [frame_bytes(len(m)) for m in messages]
        if last is None or last[1] != sum(sizes):
            # our write never started (the connection was closed before it)
            self._unwrite(chunk)
            return
        # stream offset just past each reply's frame; those past bytes_sent never left
        ends = list(itertools.accumulate(sizes[beat:], initial=last[0] + sum(sizes[:beat])))
        del ends[0]
        written = bisect.bisect_right(ends, self.sock.bytes_sent)
        taken = chunk[:written]
        self.sent.extend(ends[:written], [reply for reply, _ in taken])
        stats = self.stats
        if self.carried_left:  # only carried entries can have been written before
            carried = min(written, self.carried_left)
            self.carried_left -= carried
            stats.redelivered += carried
            stats.replies += sum(1 for _, before in taken if not before)
        else:
            stats.replies += written
        self._unwrite(chunk[written:])
        stats.delivered += self.sent.settle(self.sock.acked_offset())
        if self.service.show_messages:
            self.service.show_sent(reply for reply, _ in taken)

    def _unwrite(self, entries):
        if entries:
            self.outbox.extendleft(reversed(entries))
            self.outbox_bytes += sum(len(reply) for reply, _ in entries)

    # -- closing --------------------------------------------------------------------------

    def close(self, timeout_s: float) -> None:
        """Shutdown: one close frame (1000) if the stream stands at a frame boundary, and
        the peer's answer awaited; all within ``timeout_s``, counted from now."""
        try:
            with gevent.Timeout(timeout_s, False):
                # mid-frame (a write still blocked, or torn), a close frame would be
                # garbage: then the socket is only aborted
                if not (self.sock.writing or self.sock.torn or self.conn.closed):
                    self.greenlets.kill(timeout=timeout_s)  # nothing may follow the close
                    self.conn.close(1000, "shutting down", timeout_s=timeout_s)
        finally:
            self.end("closed by us: shutting down")
