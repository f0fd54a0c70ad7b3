"""The socket under one connection, measured: silence, write progress, unacknowledged bytes.

``MeteredSocket`` wraps the connected socket (the ``Connection`` keeps calling ``recv``,
``sendall``, ``shutdown`` and ``close`` on it, unchanged) and measures three things:

* how long the reader has been *parked*: blocked in ``recv`` on an empty socket. Only
  that time can be the upstream's silence; time spent elsewhere (handling a backlog,
  blocked on a write, waiting for room) is our own congestion.
* write progress: ``sendall`` is a loop of ``send`` calls. Each first tries the kernel
  without waiting (no timer armed: the common case costs one syscall); only when the
  kernel has no room does it wait, at most ``send_timeout_s`` (and never past
  ``deadline_at`` once a shutdown sets one). A write that makes no progress for that
  long fails with ``TimeoutError`` (an ``OSError``: the connection turns it into
  ``ConnectionClosed``). ``send_nowait`` never waits at all (the writer's fast path).
  Every byte handed to the kernel is counted: ``bytes_sent`` is the offset of the stream.
* the kernel's send queue (Linux ``SIOCOUTQ``: bytes unsent or not yet acknowledged by
  the peer), read after each write and once more just before the socket is closed, so the
  replies the peer's TCP never acknowledged can be sent again on the next connection.
  So an owner that wants that reading builds the socket with ``close_after_acks=True``:
  then ``close()`` only marks it dying (``shutdown()`` is done at once: the peer sees
  the end), and the owner calls ``close_reading_acks()`` (the session does, always),
  which reads the queue and closes. Without the flag ``close()`` closes.

``delivery.SendLog`` is the record that maps those bytes back to replies.
"""

import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

import gevent

_OUTQ = termios.TIOCOUTQ  # == SIOCOUTQ on Linux: bytes in the send queue not yet acked
_INQ = termios.FIONREAD  # == SIOCINQ: bytes received and not yet read


#: the longest a dying connection waits for the peer to acknowledge bytes in flight
SETTLE_MAX_S = 0.5
#: ... and how long the queue must stand still before we stop waiting (delayed ACKs)
SETTLE_QUIET_S = 0.06
_TCP_CLOSE = 7  # tcpi_state of a reset or fully closed connection
#: dense traffic (see ``MeteredSocket.recv``): above this many bytes a second coming in
#: (~5,000 requests/s of ~200 bytes), an empty socket is read again after a pause
DENSE_BYTES_PER_S = 1_000_000
#: the pause, seconds (the hub's timers have about a millisecond's resolution)
COALESCE_PAUSE_S = 0.0005
#: how often the incoming byte rate is judged, seconds
RATE_WINDOW_S = 0.1


def _ioctl_int(fd: int, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


class MeteredSocket:
    """A connected (gevent) socket that measures parking, writes and the send queue."""

    def __init__(self, sock: socket.socket, *, send_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 close_after_acks: bool = False,
                 before_park: Callable[[], object] | None = None) -> None:
        self._sock = sock
        #: called when the reader is about to wait for bytes (its turn is over: the
        #: writer writes what the turn made, in one write)
        self.before_park = before_park
        # the incoming byte rate, judged per RATE_WINDOW_S (see recv)
        self._window_start = clock()
        self._window_bytes = 0
        self._dense = False
        self.close_after_acks = close_after_acks
        # the plain socket under gevent's (non-blocking), for writes that must not wait;
        # None under TLS, whose records cannot be written half-way from here
        raw = getattr(sock, "_sock", None)
        self._raw = None if hasattr(sock, "_sslobj") or raw is None else raw
        self.send_timeout_s = send_timeout_s
        self.clock = clock
        #: clock() after which no write may wait (set by shutdown)
        self.deadline_at: float | None = None
        self.bytes_sent = 0  # stream offset: every byte the kernel accepted so far
        self.writing = False  # inside sendall: the stream may stand mid-frame
        self.torn = False  # a write failed part-way: the stream ends mid-frame
        #: clock() when the reader parked in recv, None if not
        self.parked_since: float | None = None
        self.parked_s = 0.0  # seconds parked since reset_parked()
        self.unacked_at_close: int | None = None  # SIOCOUTQ read just before the socket closed
        self.dying = False  # close() called: the real one waits for close_reading_acks()
        self.fin_sent = False  # shut down (our FIN is queued behind the data)

    def __getattr__(self, name):
        return getattr(self._sock, name)

    # -- reading: parked time ---------------------------------------------------------

    def recv(self, size: int) -> bytes:
        """Bytes waiting, else wait for some. The wait is parked time (see the module).

        Dense traffic is read in fewer, larger batches. While the upstream sends more than
        ``DENSE_BYTES_PER_S`` (about 5,000 requests a second), an empty socket is read
        again after one short pause (``COALESCE_PAUSE_S``; the turn's replies are written
        first) instead of being waited on: every read costs a batch's fixed work, and at
        10,000 requests a second this reads ~10 at a time instead of ~1.8, for about a
        millisecond more latency. Sparser traffic is read the moment it comes."""
        raw = self._raw
        if raw is not None:
            try:
                return self._counted(raw.recv(size))  # bytes waiting: no switch
            except (BlockingIOError, InterruptedError):
                pass
        if self.before_park is not None:
            self.before_park()
        if raw is None:  # TLS: gevent's own read (it knows the TLS buffer)
            return self._parked(self._sock.recv, (size,))
        if self._dense:
            self._parked(gevent.sleep, (COALESCE_PAUSE_S,))
            try:
                return self._counted(raw.recv(size))
            except (BlockingIOError, InterruptedError):
                pass
        return self._counted(self._parked(self._wait_and_recv, (raw, size)))

    def _counted(self, data: bytes) -> bytes:
        """Count ``data`` towards the incoming byte rate, judged per ``RATE_WINDOW_S``."""
        self._window_bytes += len(data)
        now = self.clock()
        if now - self._window_start >= RATE_WINDOW_S:
            rate = self._window_bytes / (now - self._window_start)
            self._dense = rate > DENSE_BYTES_PER_S
            self._window_start, self._window_bytes = now, 0
        return data

    def _wait_and_recv(self, raw, size):
        sock: Any = self._sock  # gevent's socket: its wait is not in the stdlib's stubs
        while True:  # gevent's own wait: a close() by another greenlet cancels it
            sock._wait(sock._read_event)
            try:
                return raw.recv(size)
            except (BlockingIOError, InterruptedError):
                continue  # a spurious wake-up

    def _parked(self, call, args):
        # gevent's recv returns at once when bytes are waiting and parks the greenlet only
        # on an empty socket: time spent in here is time the reader was free to read.
        self.parked_since = started = self.clock()
        try:
            return call(*args)
        finally:
            self.parked_s += self.clock() - started
            self.parked_since = None

    def silent_s(self) -> float:
        """Seconds parked on an empty socket since the last ``reset_parked()``."""
        since = self.parked_since
        return self.parked_s + (self.clock() - since if since is not None else 0.0)

    def reset_parked(self) -> None:
        self.parked_s = 0.0
        if self.parked_since is not None:
            self.parked_since = self.clock()

    def unread_bytes(self) -> int:
        """Bytes the kernel (or TLS) holds that the reader has not taken yet; 0 if unknown."""
        pending = 0
        try:
            pending = self._sock.pending() if hasattr(self._sock, "pending") else 0
            return pending + _ioctl_int(self._sock.fileno(), _INQ)
        except (OSError, ValueError):
            return pending

    # -- writing: a deadline on progress ----------------------------------------------

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        total = len(view)
        self.writing = True
        try:
            while view:
                sent = self._send_some(view, flags)
                self.bytes_sent += sent
                view = view[sent:]
        except BaseException:
            if view and len(view) < total:
                self.torn = True
            raise
        finally:
            self.writing = False

    def send_nowait(self, data: bytes | memoryview) -> int | None:
        """Bytes of ``data`` the kernel took at once (0 if it had no room); never waits.
        None when this socket cannot write without waiting (TLS): use ``sendall``."""
        raw = self._raw
        if raw is None:
            return None
        try:
            sent = raw.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        self.bytes_sent += sent
        return sent

    def _send_some(self, view, flags):
        raw = self._raw
        if raw is not None:  # first without waiting: no timer armed for a write that fits
            try:
                return raw.send(view, flags)
            except (BlockingIOError, InterruptedError):
                pass
        wait_s = self.send_timeout_s
        if self.deadline_at is not None:
            wait_s = min(wait_s, self.deadline_at - self.clock())
        if wait_s <= 0:
            raise TimeoutError("shutdown deadline reached with the write unfinished")
        stalled = TimeoutError(f"write made no progress for {wait_s:.1f} s")
        with gevent.Timeout(wait_s, stalled):
            return self._sock.send(view, flags)

    # -- the kernel's send queue ------------------------------------------------------

    def unacked_bytes(self) -> int | None:
        """Bytes written and not yet acknowledged by the peer (SIOCOUTQ), None if unknown."""
        if self.unacked_at_close is not None:
            return self.unacked_at_close
        try:
            return self._unacked_data(self._sock.fileno())
        except (OSError, ValueError):
            return None

    def acked_offset(self) -> int | None:
        """Stream offset up to which the peer's TCP acknowledged our bytes, None if unknown."""
        unacked = self.unacked_bytes()
        return None if unacked is None else max(self.bytes_sent - unacked, 0)

    def shutdown(self, how: int) -> None:
        """Shut both directions down now (the peer sees the connection end: never two
        live at once), sending our FIN behind the bytes still queued. The socket itself
        stays open until ``close()`` (or ``close_reading_acks()``)."""
        if self.fin_sent:
            return
        reset = self._tcp_state()[0] == _TCP_CLOSE  # then no FIN is queued
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
            self.fin_sent = not reset
        except (OSError, ValueError):
            pass  # already reset or closed: no FIN in the queue

    def close(self) -> None:
        """Close the socket; with ``close_after_acks`` only mark it dying: its send
        queue is still to be read by ``close_reading_acks()``."""
        if self.close_after_acks:
            self.dying = True
            return
        try:
            self._sock.close()
        except (OSError, ValueError):
            pass

    def close_reading_acks(self) -> None:
        """Read the send queue one last time, then really close the socket.

        The peer's acknowledgements of bytes already in flight get a moment to arrive
        first: the queue is polled until it is empty or has not shrunk for two round trips
        (at least ``SETTLE_QUIET_S``: a peer may delay its ACK), never longer than
        ``SETTLE_MAX_S`` nor past ``deadline_at``. A reset connection is read at once:
        nothing more will be acknowledged. Runs off the supervisor's path (the next
        connection is being opened meanwhile)."""
        try:
            if not self.fin_sent:
                self.shutdown(socket.SHUT_RDWR)
            if self.unacked_at_close is None:
                fd = self._sock.fileno()
                unacked = self._unacked_data(fd)
                self.unacked_at_close = self._wait_for_acks(fd, unacked) if unacked else 0
        except (OSError, ValueError):
            pass
        finally:
            try:
                self._sock.close()
            except (OSError, ValueError):
                pass

    def _unacked_data(self, fd):
        """Our data bytes not acknowledged: SIOCOUTQ counts our FIN too, once sent (it
        takes a sequence number, and is acknowledged after every byte before it)."""
        queued = _ioctl_int(fd, _OUTQ)
        return max(queued - 1, 0) if self.fin_sent else queued

    def _wait_for_acks(self, fd, unacked):
        state, rtt_s = self._tcp_state()
        if state == _TCP_CLOSE:
            return unacked
        patience_s = min(max(2 * rtt_s, SETTLE_QUIET_S), SETTLE_MAX_S)
        give_up_at = self.clock() + SETTLE_MAX_S
        if self.deadline_at is not None:
            give_up_at = min(give_up_at, self.deadline_at)
        quiet_since = self.clock()
        while unacked and self.clock() < give_up_at:
            gevent.sleep(0.005)
            now_unacked = self._unacked_data(fd)
            if now_unacked < unacked:
                quiet_since = self.clock()
            elif self.clock() - quiet_since > patience_s:
                break
            unacked = now_unacked
        return unacked

    def _tcp_state(self):
        """(tcpi_state, smoothed round-trip time in seconds) from TCP_INFO."""
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            return info[0], struct.unpack_from("I", info, 68)[0] / 1e6
        except (OSError, ValueError, struct.error, AttributeError):
            return None, 0.0
