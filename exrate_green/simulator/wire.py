"""Frame I/O of one server-side WebSocket connection of the simulator (server role).

The simulator's only contact with frames: everything above it deals in whole messages
(``recv_batch``) and in ``send_*`` calls. ``send_wire`` sends raw crafted bytes.
"""

import collections
import socket
import struct

import gevent.lock

from ..connection import _mask

__all__ = ["WireClosed", "WsWire"]


class WireClosed(Exception):
    """A send on a connection that is dead or has already sent its close frame."""


class WsWire:
    """Frame I/O of one server-side WebSocket connection.

    Reads with its own buffered decoder: one read of up to ``RECV_BYTES`` is split into
    every complete frame it holds and each payload is unmasked as one big-integer XOR
    (gevent-websocket's ``read_frame`` unmasks byte by byte, ~12 us per reply). Writes
    frames it encodes itself (server frames are never masked), and never uses
    gevent-websocket's ``receive``/``close`` (they hide the peer's close code and echo a
    second close frame). Writes are serialized by a lock; after a socket error or our
    close frame every send raises ``WireClosed``.
    """

    TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
    MAX_MESSAGE = 16 * 1024 * 1024
    RECV_BYTES = 256 * 1024

    def __init__(self, ws):
        self._ws = ws
        self._sock = ws.handler.socket
        # Like the Node.js servers such upstreams run on: no Nagle delay. Without it a
        # request frame written while the last one is unacknowledged waits for the
        # client's delayed ACK (40 ms) whenever traffic is light.
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        # read1: the bytes the handshake's buffered reader already holds, then the socket
        self._read = ws.handler.rfile.read1
        self._lock = gevent.lock.Semaphore()
        self._inbox = bytearray()
        self._parts = None        # payloads of a fragmented message in progress
        self._part_op = None
        self._part_size = 0
        self._ended = False       # EOF or protocol error: the next read returns None
        self._queue = collections.deque()   # for recv(): the rest of the last batch
        self.close_sent = False
        self.dead = False

    # -- reading
    def recv_batch(self, max_bytes=None):
        """The complete messages of the next read: [(opcode, payload bytes)], at least one;
        None at EOF, on a socket or protocol error.

        TEXT, BINARY and CLOSE messages are returned (a CLOSE is always last); pings are
        answered, pongs skipped, fragments joined. ``max_bytes`` bounds one read.
        """
        while True:
            if self._ended:
                return None
            try:
                data = self._read(max_bytes or self.RECV_BYTES)
            except (OSError, ValueError):  # socket error; file closed under us
                data = b""
            if not data:
                self._ended = True
                return None
            self._inbox += data
            messages = self._parse()
            if messages:
                return messages

    def recv(self):
        """Next (opcode, payload) as ``recv_batch`` returns them, one at a time."""
        queue = self._queue
        if not queue:
            batch = self.recv_batch()
            if batch is None:
                return None
            queue.extend(batch)
        return queue.popleft()

    def _parse(self):
        buf, pos, end, out = self._inbox, 0, len(self._inbox), []
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length, head = second & 0x7F, pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
            if length > self.MAX_MESSAGE:
                self._ended = True     # never buffer a flood
                break
            start = head + 4 if second & 0x80 else head
            if end < start + length:
                break
            if second & 0x80:
                payload = _mask(buf[head:start], buf[start:start + length])
            else:
                payload = bytes(buf[start:start + length])
            pos = start + length
            if not self._message(first & 0x80, first & 0x0F, payload, out):
                self._ended = True
                break
        del buf[:pos]
        return out

    def _message(self, fin, op, payload, out):
        """Add a whole message to ``out``; False on a protocol error or a close frame."""
        if op == self.TEXT or op == self.BINARY:
            if self._parts is not None:
                return False   # a new message inside a fragmented one
            if fin:
                out.append((op, payload))
            else:
                self._parts, self._part_op, self._part_size = [payload], op, len(payload)
            return True
        if op == self.CONT:
            if self._parts is None:
                return False   # a continuation of nothing
            self._parts.append(payload)
            self._part_size += len(payload)
            if self._part_size > self.MAX_MESSAGE:
                return False
            if fin:
                out.append((self._part_op, b"".join(self._parts)))
                self._parts = None
            return True
        if op == self.PING:
            try:
                self._send_frame(self.PONG, payload)
            except WireClosed:
                pass
            return True
        if op == self.PONG:
            return True
        if op == self.CLOSE:
            out.append((op, payload))
            return False       # nothing after a close frame counts
        return False           # reserved opcode

    # -- writing
    def _send_frame(self, opcode, data):
        self.write_raw(_header(opcode, len(data)) + data)

    def write_raw(self, frame):
        """Write ``frame`` bytes as they are (crafted frames included); WireClosed if dead."""
        with self._lock:
            if self.dead or self.close_sent:
                raise WireClosed("connection closed")
            try:
                self._sock.sendall(frame)
            except OSError as e:
                self.abort()
                raise WireClosed(f"send failed: {e}") from None

    def send_text(self, data):
        """One text frame; ``data`` is str or already-encoded bytes (sent unchecked)."""
        self._send_frame(self.TEXT, data.encode() if isinstance(data, str) else bytes(data))

    def send_texts(self, items):
        """Several text frames (bytes) in one write."""
        text = self.TEXT
        self.write_raw(b"".join([_header(text, len(data)) + data for data in items]))

    def send_binary(self, data):
        self._send_frame(self.BINARY, bytes(data))

    def send_close(self, code=1000, reason=""):
        """The close frame (``code=None``: no status at all); no data frame may follow."""
        body = b"" if code is None else struct.pack("!H", code) + reason.encode()
        self._send_frame(self.CLOSE, body)
        self.close_sent = True

    def abort(self):
        """Shut the TCP socket down now (no close frame); the reader sees EOF."""
        self.dead = True
        for step in (lambda: self._sock.shutdown(socket.SHUT_RDWR), self._sock.close):
            try:
                step()
            except OSError:
                pass

    def detach(self):
        """Tell gevent-websocket the socket is done so it sends no close frame of its own."""
        self._ws.closed = True


def _header(opcode, length):
    """The head of an unmasked final frame (a server's) carrying ``length`` bytes."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")
