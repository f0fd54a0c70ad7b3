"""One WebSocket connection to the upstream; every socket error leaves as ``ConnectionClosed``.

websocket-client does what it does well: the opening handshake, TLS with certificate
checks, proxies (``handshake``). After it the socket is driven through the project's
sans-I/O frame layer (``exrate_green.ws``), because websocket-client reads a frame with
several small ``recv`` calls and validates UTF-8 in pure Python, which caps a client near
7,000 messages/s. Here one ``recv`` of up to 256 KiB is split into every complete frame
it holds, and a batch of replies leaves in one write. This module only does I/O; frames
are parsed and built, and the closing handshake decided, in ``ws``.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import gevent
import gevent.lock
import websocket

from . import ws
from .errors import ConnectionClosed, ProtocolViolation
from .link import MeteredSocket

RECV_BYTES = 256 * 1024
CLOSE_WAIT_S = 1.0  # how long to wait for the server to close TCP after the closing handshake

__all__ = ["CLOSE_WAIT_S", "RECV_BYTES", "Connection", "handshake"]


def handshake(url: str, *, timeout_s: float, ca_file: str | None = None) -> socket.socket:
    """Connect to ``url`` and shake hands within ``timeout_s`` seconds (certificates are
    verified); the connected socket, in blocking mode for gevent."""
    sslopt: dict[str, object] = {"cert_reqs": ssl.CERT_REQUIRED}
    if ca_file:
        sslopt["ca_certs"] = ca_file
    try:
        conn = websocket.create_connection(
            url, timeout=timeout_s, sslopt=sslopt, skip_utf8_validation=True,
            enable_multithread=False)
    except (websocket.WebSocketException, OSError) as e:
        raise ConnectionClosed(f"cannot connect to {url}: {_describe(e)}") from e
    sock = conn.sock
    assert sock is not None  # create_connection returns a connected WebSocket
    sock.settimeout(None)  # liveness is the watchdog's job, not a socket timeout
    return sock


class Connection:
    """A connected WebSocket. ``receive()`` returns events, ``send()`` writes text frames.

    Built around a connected socket, which it meters (``link.MeteredSocket``: parked
    time, write progress with ``send_timeout_s``, the kernel's queues); ``sock`` is that.

    Events are ``("text", bytes)``, ``("binary", bytes)`` and ``("oversize", n_bytes)``
    for a message over ``max_frame_bytes``, whose bytes are discarded as they arrive
    (never buffered). Pings are answered inside ``receive()``.

    The connection ends with ``ConnectionClosed`` once the frames that came before the end
    have been returned (they were sent while the link was up: their requests must be
    answered); the next ``receive()`` then finishes the closing handshake as
    ``ws.Closing`` says, first calling ``before_close`` (replies queued elsewhere for
    requests read before the end go first), then raising ``ProtocolViolation`` for a
    violation (``violation`` then holds it). Either way the server is given
    ``close_wait_s`` to close TCP first, as RFC 6455 7.1.1 asks, before the socket is dropped.
    """

    def __init__(self, sock: socket.socket | MeteredSocket, max_frame_bytes: int = 1 << 20,
                 *, send_timeout_s: float = 30.0, close_wait_s: float = CLOSE_WAIT_S,
                 before_close: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 close_after_acks: bool = False,
                 before_park: Callable[[], object] | None = None) -> None:
        self.sock = sock if isinstance(sock, MeteredSocket) else MeteredSocket(
            sock, send_timeout_s=send_timeout_s, clock=clock, close_after_acks=close_after_acks,
            before_park=before_park)
        self.max_frame_bytes = max_frame_bytes
        self.close_wait_s = close_wait_s
        self.before_close = before_close
        self.closed = False
        self.violation: ws.Violation | None = None  # how the upstream broke RFC 6455, if it did
        self.closing = ws.Closing()
        self._parser = ws.Parser("client", max_message_bytes=max_frame_bytes)
        self._send_lock = gevent.lock.Semaphore()  # one writer on the socket at a time

    @classmethod
    def open(cls, url: str, *, timeout_s: float, ca_file: str | None = None,
             max_frame_bytes: int = 1 << 20, send_timeout_s: float = 30.0) -> Connection:
        """``handshake`` then a ``Connection`` around the socket."""
        sock = handshake(url, timeout_s=timeout_s, ca_file=ca_file)
        return cls(sock, max_frame_bytes, send_timeout_s=send_timeout_s)

    # -- reading -------------------------------------------------------------------------

    def receive(self) -> list[ws.Event]:
        """The data events of the next batch of frames (at least one); blocks until there
        is one. Raises ``ConnectionClosed`` (``ProtocolViolation``) when the link ends."""
        while True:
            if self.closing.peer is not None:
                raise self._end()
            try:
                data = self.sock.recv(RECV_BYTES)
            except (OSError, ValueError) as e:  # ValueError: socket closed under us
                raise self._lost(f"socket error: {_describe(e)}") from e
            if not data:
                raise self._lost("upstream closed the TCP connection")
            events = self._parser.feed(data)
            if self._parser.controls:
                events = self._take_controls(events)
            if events:
                return events

    def _take_controls(self, events):
        """Answer pings; keep a close or violation for the next call; return the data."""
        data = []
        for event in events:
            kind = event[0]
            if kind == "ping":
                self._pong(event[1])
            elif kind == "close" or kind == "violation":
                self.closing.received(event[1])
            elif kind != "pong":
                data.append(event)
        return data

    def _pong(self, payload):
        if not self.closing.sent:  # no pong after our close frame
            self.send_frame(ws.OP_PONG, payload)

    # -- writing -------------------------------------------------------------------------

    def send(self, messages: list[bytes]) -> None:
        """Send each bytes object of ``messages`` as a text frame, in one write."""
        self.send_data(ws.build_text_frames(messages, mask=True))

    def send_binary(self, payload: bytes) -> None:
        """Send ``payload`` as one binary message."""
        self.send_data(ws.build_frame(ws.OP_BINARY, payload, mask=True))

    def send_frame(self, opcode: int, payload: bytes = b"") -> None:
        """Send one final frame of ``opcode`` (masked, as every client frame)."""
        self.send_data(ws.build_frame(opcode, payload, mask=True))

    def send_data(self, data: bytes | memoryview) -> None:
        """Write already framed bytes whole (waiting for room, with the write deadline)."""
        with self._send_lock:
            self._check_open()
            self._write(data)

    def send_nowait(self, data: bytes | memoryview) -> int | None:
        """Write as much of already framed ``data`` as the kernel takes now; never waits.
        0 while another write holds the socket; None where the socket cannot (TLS)."""
        self._check_open()
        if self._send_lock.locked():
            return 0
        try:
            return self.sock.send_nowait(data)
        except (OSError, ValueError) as e:
            raise self._lost(f"socket error while sending: {_describe(e)}") from e

    def _check_open(self):
        if self.closing.sent_cause is not None:  # RFC 6455 5.5.1: no frame after a close
            raise ConnectionClosed(self.closing.sent_cause)
        if self.closed:
            raise ConnectionClosed("connection already closed")

    def _write(self, data):
        try:
            self.sock.sendall(data)
        except (OSError, ValueError) as e:
            raise self._lost(f"socket error while sending: {_describe(e)}") from e

    # -- ending --------------------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "", timeout_s: float = 1.0) -> None:
        """Closing handshake: send a close frame, wait up to ``timeout_s`` for the answer
        and for the server to close TCP, then drop the socket. Data read meanwhile is
        discarded. A protocol violation read but not yet answered is answered instead."""
        if self.closed:
            return
        try:
            with gevent.Timeout(timeout_s, False):
                if self.closing.peer is None:
                    self._send_close(code, reason, f"closed by us: {reason or code}")
                while True:
                    self.receive()
        except ConnectionClosed:
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the socket now; a greenlet blocked reading or writing wakes with an error."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        try:
            self.sock.close()
        except (OSError, ValueError):
            pass

    def _end(self):
        """Finish the closing handshake the last batch started; the error to raise."""
        ending = self.closing.ending()
        assert ending is not None
        error: ConnectionClosed
        if ending.violation is not None:
            self.violation = ending.violation
            error = ProtocolViolation(ending.cause, ending.code)
        else:
            error = ConnectionClosed(ending.cause)
        if self.before_close is not None:
            self.before_close()
        # Bounded as a whole: a peer that stopped reading cannot hold our close frame's
        # write, nor a peer that keeps the TCP connection open hold the reader.
        with gevent.Timeout(self.close_wait_s, False):
            self._send_close(ending.code, ending.reason, ending.cause)
            self._await_server_close()
        self.abort()
        return error

    def _send_close(self, code, reason, cause):
        """Send our one close frame; later frames are refused with ``cause``."""
        with self._send_lock:
            if not self.closing.send(cause):
                return
            frame = ws.build_frame(ws.OP_CLOSE, ws.build_close_payload(code, reason), mask=True)
            if self.closed:
                return
            try:
                self._write(frame)
            except ConnectionClosed:
                pass

    def _await_server_close(self):
        """Read and discard until the server closes TCP (the caller bounds the wait)."""
        if self.closed:
            return
        try:
            while self.sock.recv(RECV_BYTES):
                pass
        except (OSError, ValueError):
            pass

    def _lost(self, cause):
        self.abort()
        return ConnectionClosed(cause)


def _describe(error):
    text = str(error) or type(error).__name__
    return text if len(text) < 200 else text[:200] + "..."
