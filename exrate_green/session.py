"""One connection: its reader, writer, heartbeat sender and silence watchdog.

``Session`` lives as long as one connection and owns its greenlets in one ``Group``,
killed in ``run``'s ``finally``:

* ``receive_loop`` reads batches of frames and walks them one way: ``dispatch`` (replies
  made now go to ``delivery``, which hands them to the writer), the heartbeats counted
  here, then the requests that wait for a rate table held by ``dispatch`` (the reader
  waits for room when there is none: back-pressure);
* ``write_loop`` (``writer.Writer``) finishes the writes the kernel had no room for; a
  write that makes no progress for ``send_timeout_s`` ends the connection;
* ``heartbeat`` asks for a heartbeat every ``heartbeat_interval_s`` (it never waits on a
  write: a heartbeat queues behind a blocked one);
* ``silence_watchdog`` abandons the connection when the upstream is silent.

The silence rule (``silence_s``, also what ``/healthz`` reads): time counts towards the
heartbeat timeout only while the reader is parked in ``recv`` on an empty socket, and the
connection is abandoned only if, once more than ``heartbeat_timeout_s`` of such time has
passed since the open or the last upstream heartbeat, the socket still holds no unread
byte. Time the reader spends handling a backlog, blocked on a write (a pong), or waiting
for room is not silence.

A session is given its collaborators (the connected socket, ``dispatch``, ``delivery``,
``Progress``, ``Stats``, settings) and never sees the supervisor.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import gevent
from gevent.event import AsyncResult
from gevent.pool import Group

from .connection import Connection
from .delivery import Delivery
from .dispatch import Dispatch
from .errors import ConnectionClosed
from .stall import Progress
from .stats import Stats
from .writer import Writer

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["Ended", "Session"]

log = logging.getLogger("exrate_green.service")

#: the reader yields to the hub at least this often while bytes keep coming (seconds), so
#: heartbeats and timers run under load (recv returns at once when bytes are waiting)
YIELD_EVERY_S = 0.005


class Ended(NamedTuple):
    """How a session ended: ``cause`` (for the log), whether the upstream broke RFC 6455
    (``violation``: reconnect at once), and the upstream heartbeats it received."""

    cause: str
    violation: bool
    heartbeats: int


class Session:
    """One connection and its greenlets; ``run()`` serves until the connection ends."""

    def __init__(self, sock: socket.socket, settings: Settings, *, dispatch: Dispatch,
                 delivery: Delivery, progress: Progress, stats: Stats,
                 clock: Callable[[], float]) -> None:
        self.settings = settings
        self.dispatch = dispatch
        self.delivery = delivery
        self.progress = progress
        self.stats = stats
        self.clock = clock
        self.conn = Connection(sock, settings.max_frame_bytes,
                               send_timeout_s=settings.send_timeout_s, clock=clock,
                               before_close=self._flush_before_close, close_after_acks=True,
                               before_park=self._turn_ends)
        self.sock = self.conn.sock
        self.writer = Writer(self.conn, self.sock, delivery, stats)
        self.last_heartbeat_at = clock()  # for logs; the rule is parked time
        self.heartbeats_received = 0
        self.closing = False  # shutdown: the reader stops after its batch
        self.greenlets = Group()
        self.ended = AsyncResult()
        self.ended_at: float | None = None
        self.reader: gevent.Greenlet | None = None

    # -- lifetime -----------------------------------------------------------------------

    def run(self) -> Ended:
        """Serve until the connection ends; returns how it ended. The replies it did not
        deliver are handed back to delivery (kept for the next connection) on the way out."""
        self.progress.session_started()
        self.delivery.attach(self.writer.flush, self.writer.end_turn)
        try:
            self.greenlets.spawn(self._job, self.writer.write_loop)
            self.greenlets.spawn(self._job, self.heartbeat)
            self.greenlets.spawn(self._job, self.silence_watchdog)
            self.reader = self.writer.reader = self.greenlets.spawn(self._job, self.receive_loop)
            cause = self.ended.get()
        finally:
            self.conn.abort()
            self.greenlets.kill(timeout=1)
            self.progress.session_ended()
            self.writer.abandon()
        return Ended(cause, self.conn.violation is not None, self.heartbeats_received)

    def release(self) -> None:
        """After ``run()``: close the socket, reading its send queue first, and tell
        delivery what the peer acknowledged. Runs while the next connection opens."""
        self.sock.close_reading_acks()
        self.delivery.detach(self.ended_at or self.clock(), self.sock.acked_offset())

    @property
    def alive(self) -> bool:
        return not self.ended.ready()

    def end(self, cause: str) -> None:
        """End the session: no more reading or writing (the socket itself is closed by
        ``release()``, once its unacknowledged bytes are known)."""
        if not self.ended.ready():
            self.ended_at = self.clock()
            self.ended.set(cause)
        self.conn.abort()

    def _job(self, loop: Callable[[], None]) -> None:
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
        progress, dispatch, room = self.progress, self.dispatch, self.delivery.room
        clock, yielded_at = self.clock, self.clock()
        while not self.closing:
            progress.reader_parked()  # for room, or for bytes: bounded elsewhere
            if not room.is_set():
                self.stats.backpressure_waits += 1
                self.writer.end_turn()
                room.wait()
            events = self.conn.receive()
            progress.reader_turned()
            step = dispatch.take(events)
            if step.heartbeats:
                self._heartbeats(step.heartbeats)
            if step.waiting:
                dispatch.hold(step.waiting, step.started)
            # Under load recv never blocks: let heartbeats and timers run. Not sleep(0):
            # gevent runs sleep(0) callbacks back to back and looks at its timers only
            # every 50 of them, so with big batches a heartbeat could wait a second.
            now = clock()
            if now - yielded_at > YIELD_EVERY_S:
                yielded_at = now
                self.writer.end_turn()
                gevent.idle()

    def _turn_ends(self) -> None:
        """The reader is about to wait for bytes: what its turn made is written now."""
        self.writer.end_turn()

    def _heartbeats(self, count: int) -> None:
        self.last_heartbeat_at = self.clock()
        self.sock.reset_parked()
        self.heartbeats_received += count
        self.stats.heartbeats_received += count

    def stop_reading(self, deadline: float) -> None:
        """Shutdown: read no more, and write nothing past ``deadline`` (a ``clock()``
        time). A reader parked on an empty socket is stopped now; one handling a batch
        finishes it first (those requests were read: they get replies)."""
        self.sock.deadline_at = deadline
        self.closing = True
        reader = self.reader
        if reader is not None and self.sock.parked_since is not None:
            reader.kill(block=False)

    def silence_s(self) -> float:
        """Seconds the upstream has been silent while we were free to read it (the rule)."""
        return self.sock.silent_s()

    def silence_watchdog(self) -> None:
        """End the connection once the upstream has been silent for over
        ``heartbeat_timeout_s`` while we were free to read it (the module's rule)."""
        timeout_s = self.settings.heartbeat_timeout_s
        while True:
            silent_s = self.silence_s()
            if (silent_s > timeout_s and self.sock.parked_since is not None
                    and not self.sock.unread_bytes()):
                raise ConnectionClosed(
                    f"no heartbeat from upstream for {silent_s:.2f} s "
                    f"({self.clock() - self.last_heartbeat_at:.2f} s since the last one)")
            gevent.sleep(max(timeout_s - silent_s, 0.02) + 0.005)

    # -- writing --------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Ask for a heartbeat at once, then every ``heartbeat_interval_s``, without drift.
        A heartbeat still waiting behind a blocked write is not doubled. Each turn also
        reads what the peer acknowledged (the delivered count stays fresh)."""
        interval_s = self.settings.heartbeat_interval_s
        due = self.clock()
        while True:
            self.progress.heartbeat_turned()
            self.writer.beat()
            self.writer.read_acks()
            due += interval_s
            delay_s = due - self.clock()
            if delay_s < 0:  # we fell behind (a stalled hub): restart the schedule, no burst
                due, delay_s = self.clock(), 0
            gevent.sleep(delay_s)

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything queued is written; False on timeout (or a dead link)."""
        deadline = self.clock() + timeout_s
        while not self.writer.drained():
            left_s = deadline - self.clock()
            if left_s <= 0 or not self.alive:  # a dead session writes nothing more
                return False
            self.writer.wait_idle(min(left_s, 0.05))
        return True

    def _flush_before_close(self) -> None:
        """The peer closes: replies to what it sent before its close frame go first."""
        self.drain(self.settings.heartbeat_timeout_s)

    def close(self, timeout_s: float) -> None:
        """Shutdown: one close frame (1000) if the stream stands at a frame boundary, and
        the peer's answer awaited; all within ``timeout_s``, counted from now."""
        try:
            with gevent.Timeout(timeout_s, False):
                # mid-frame (a write still blocked, or torn), a close frame would be
                # garbage: then the socket is only aborted
                if not (self.writer.mid_frame() or self.conn.closed):
                    self.greenlets.kill(timeout=timeout_s)  # nothing may follow the close
                    self.conn.close(1000, "shutting down", timeout_s=timeout_s)
        finally:
            self.end("closed by us: shutting down")
