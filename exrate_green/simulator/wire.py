"""Frame I/O of one server-side WebSocket connection of the simulator (server role).

The simulator's only contact with the socket: everything above it deals in whole
messages (``recv_batch``) and ``send_*`` calls. Frames are parsed and built by the
project's one frame layer, ``exrate_green.ws`` (a ``Parser("server")`` for the masked
frames a client sends; unmasked frames built for the server role). ``write_raw`` sends
crafted bytes unchanged, for tests of how a client takes broken frames.
"""

import socket
from typing import Any

import gevent.lock

from .. import ws

__all__ = ["WireClosed", "WsWire"]


class WireClosed(Exception):
    """A send on a connection that is dead or has already sent its close frame."""


class WsWire:
    """Frame I/O of one server-side WebSocket connection.

    One read of up to ``RECV_BYTES`` goes to the parser, which returns every message it
    completes; pings are answered here, pongs dropped. Never uses gevent-websocket's
    ``receive``/``close`` (they hide the peer's close code and echo a second close frame).
    Writes are serialized by a lock; after a socket error or our close frame every send
    raises ``WireClosed``.
    """

    MAX_MESSAGE = 16 * 1024 * 1024   # bytes; a bigger message is discarded unbuffered
    RECV_BYTES = 256 * 1024

    def __init__(self, websocket: Any):
        self._ws = websocket
        self._sock = websocket.handler.socket
        # Like the Node.js servers such upstreams run on: no Nagle delay. Without it a
        # request frame written while the last one is unacknowledged waits for the
        # client's delayed ACK (40 ms) whenever traffic is light.
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        # read1: the bytes the handshake's buffered reader already holds, then the socket
        self._read = websocket.handler.rfile.read1
        self._lock = gevent.lock.Semaphore()
        self._parser = ws.Parser("server", max_message_bytes=self.MAX_MESSAGE)
        self.close_sent = False
        self.dead = False

    # -- reading
    def recv_batch(self, max_bytes: int | None = None) -> list[tuple[str, Any]] | None:
        """The events of the next read that completes any, at least one: ("text", bytes),
        ("binary", bytes), ("oversize", size), ("close", ws.Close) or ("violation",
        ws.Violation), the last two always last. None at EOF or on a socket error, and
        after a close or a violation. ``max_bytes`` bounds one read."""
        parser = self._parser
        while True:
            if parser.done:
                return None
            try:
                data = self._read(max_bytes or self.RECV_BYTES)
            except (OSError, ValueError):  # socket error; file closed under us
                data = b""
            if not data:
                return None
            events = parser.feed(data)
            if parser.controls:
                events = self._answer_pings(events)
            if events:
                return events

    def _answer_pings(self, events: list) -> list:
        """The events without pings and pongs; each ping answered with its pong."""
        kept = []
        for kind, value in events:
            if kind == "ping":
                try:
                    self._send_frame(ws.OP_PONG, value)
                except WireClosed:
                    pass
            elif kind != "pong":
                kept.append((kind, value))
        return kept

    # -- writing
    def write_raw(self, frame: bytes) -> None:
        """Write ``frame`` bytes as they are (crafted frames included); WireClosed if dead."""
        with self._lock:
            if self.dead or self.close_sent:
                raise WireClosed("connection closed")
            try:
                self._sock.sendall(frame)
            except OSError as e:
                self.abort()
                raise WireClosed(f"send failed: {e}") from None

    def _send_frame(self, opcode: int, data: bytes) -> None:
        self.write_raw(ws.build_frame(opcode, data, mask=False))

    def send_text(self, data: str | bytes) -> None:
        """One text frame; ``data`` is str or already-encoded bytes (sent unchecked)."""
        self._send_frame(ws.OP_TEXT, data.encode() if isinstance(data, str) else bytes(data))

    def send_texts(self, items: list[bytes]) -> None:
        """Several text frames (bytes) in one write."""
        self.write_raw(ws.build_text_frames(items, mask=False))

    def send_binary(self, data: bytes) -> None:
        self._send_frame(ws.OP_BINARY, bytes(data))

    def send_close(self, code: int | None = ws.CLOSE_NORMAL, reason: str = "") -> None:
        """The close frame (``code=None``: no status at all); no data frame may follow."""
        body = ws.build_close_payload(ws.CLOSE_NO_STATUS if code is None else code, reason)
        self._send_frame(ws.OP_CLOSE, body)
        self.close_sent = True

    def abort(self) -> None:
        """Shut the TCP socket down now (no close frame); the reader sees EOF."""
        self.dead = True
        for step in (lambda: self._sock.shutdown(socket.SHUT_RDWR), self._sock.close):
            try:
                step()
            except OSError:
                pass

    def detach(self) -> None:
        """Tell gevent-websocket the socket is done so it sends no close frame of its own."""
        self._ws.closed = True
