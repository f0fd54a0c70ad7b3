"""One WebSocket connection to the upstream; every socket error leaves as ``ConnectionClosed``.

websocket-client does what it does well: the opening handshake, TLS with certificate
checks, proxies. After the handshake the socket is driven by the small codec below,
because websocket-client reads a frame with several small ``recv`` calls and validates
UTF-8 in pure Python, which caps a client near 7,000 messages/s. Here one ``recv`` of up
to 256 KiB is split into every complete frame it holds, and a batch of replies leaves in
one ``sendall``. UTF-8 is validated once, by the JSON parser.
"""

import os
import socket
import ssl
import struct

import gevent.lock
import websocket

from .errors import ConnectionClosed

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
RECV_BYTES = 256 * 1024
_DATA_KINDS = {OP_TEXT: "text", OP_BINARY: "binary"}


class Connection:
    """A connected WebSocket. ``receive()`` yields events, ``send()`` writes text frames.

    Events are ``("text", bytes)``, ``("binary", bytes)`` and ``("oversize", n_bytes)``
    for a message over ``max_frame_bytes``, whose bytes are discarded as they arrive
    (never buffered). Pings are answered inside ``receive()``; a close frame ends the
    connection with ``ConnectionClosed`` once the frames that came before it have been
    returned (they were sent while the link was up: their requests must be answered),
    and is answered then, after the replies to them.
    """

    def __init__(self, sock, max_frame_bytes=1 << 20):
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self.closed = False
        self._send_lock = gevent.lock.Semaphore()  # one writer on the socket at a time
        self._inbox = bytearray()
        self._message = None  # fragments of a message in progress
        self._message_kind = None
        self._skip_bytes = 0  # left of an oversize frame's payload to discard
        self._skip_message = False  # discard continuation frames of an oversize message
        self._close_frame = None  # (status bytes, cause) of a close frame read, not yet acted on
        #: called before a close frame answers the peer's: replies queued elsewhere for
        #: requests read before it go first (the session's writer drains its outbox)
        self.before_close = None

    @classmethod
    def open(cls, url, *, timeout_s, ca_file=None, max_frame_bytes=1 << 20):
        """Connect and shake hands within ``timeout_s`` seconds; certificates are verified."""
        sslopt = {"cert_reqs": ssl.CERT_REQUIRED}
        if ca_file:
            sslopt["ca_certs"] = ca_file
        try:
            ws = websocket.create_connection(
                url, timeout=timeout_s, sslopt=sslopt, skip_utf8_validation=True,
                enable_multithread=False)
        except (websocket.WebSocketException, OSError) as e:
            raise ConnectionClosed(f"cannot connect to {url}: {_describe(e)}") from e
        ws.sock.settimeout(None)  # liveness is the watchdog's job, not a socket timeout
        return cls(ws.sock, max_frame_bytes)

    # -- reading -------------------------------------------------------------------------

    def receive(self):
        """The events of the next batch of frames (at least one); blocks until there is one."""
        while True:
            if self._close_frame is None:  # nothing after a close frame is read
                events = self._parse()
                if events:
                    return events
            if self._close_frame is not None:
                code_bytes, cause = self._close_frame
                self._answer_close(code_bytes)
                raise self._lost(cause)
            try:
                data = self.sock.recv(RECV_BYTES)
            except (OSError, ValueError) as e:  # ValueError: socket closed under us
                raise self._lost(f"socket error: {_describe(e)}") from e
            if not data:
                raise self._lost("upstream closed the TCP connection")
            self._inbox += data

    def _parse(self):
        buf, pos, end, events = self._inbox, 0, len(self._inbox), []
        while True:
            if self._skip_bytes:
                taken = min(self._skip_bytes, end - pos)
                pos += taken
                self._skip_bytes -= taken
                if self._skip_bytes:
                    break
            if end - pos < 2:
                break
            first, second = buf[pos], buf[pos + 1]
            fin, opcode = first & 0x80, first & 0x0F
            length, head = second & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            mask_at = head
            if second & 0x80:  # servers must not mask; tolerate it anyway
                head += 4
            if end - pos < head:
                break
            if opcode == OP_CONTINUATION and self._skip_message:
                self._skip_message, self._skip_bytes = not fin, length  # rest of an oversize one
                pos += head
                continue
            if opcode >= 8 and length > 125:  # an illegal control frame: never buffer it
                self._skip_bytes = length
                pos += head
                continue
            if opcode < 8 and self._too_big(length):
                events.append(("oversize", length + len(self._message or b"")))
                self._message = None
                self._skip_message = not fin
                self._skip_bytes = length
                pos += head
                continue
            if end - pos < head + length:
                break
            payload = bytes(buf[pos + head:pos + head + length])
            if second & 0x80:
                payload = _mask(bytes(buf[pos + mask_at:pos + head]), payload)
            pos += head + length
            self._frame(fin, opcode, payload, events)
            if self._close_frame is not None:  # nothing after a close frame counts
                break
        del buf[:pos]
        return events

    def _too_big(self, length):
        so_far = len(self._message) if self._message is not None else 0
        return so_far + length > self.max_frame_bytes

    def _frame(self, fin, opcode, payload, events):
        if opcode in _DATA_KINDS:
            if fin:
                events.append((_DATA_KINDS[opcode], payload))
                self._message = None
            else:
                self._message, self._message_kind = bytearray(payload), _DATA_KINDS[opcode]
                self._skip_message = False
        elif opcode == OP_CONTINUATION:
            if self._message is None:  # a continuation of nothing: ignore it
                return
            self._message += payload
            if fin:
                events.append((self._message_kind, bytes(self._message)))
                self._message = None
        elif opcode == OP_PING:
            self.send_frame(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            # repr escapes line breaks: the reason is logged, it must not forge log lines
            reason = repr(payload[2:125].decode("utf-8", "replace"))[1:-1]
            self._close_frame = (payload[:2], f"upstream sent close frame {code}"
                                 + (f" ({reason})" if reason else ""))
        # OP_PONG and reserved opcodes are ignored

    # -- writing -------------------------------------------------------------------------

    def send(self, messages):
        """Send each bytes object of ``messages`` as a text frame, in one ``sendall``."""
        masks = os.urandom(4 * len(messages))
        data = b"".join([_frame(OP_TEXT, m, masks[4 * i:4 * i + 4])
                         for i, m in enumerate(messages)])
        self._sendall(data)

    def send_frame(self, opcode, payload=b""):
        self._sendall(_frame(opcode, payload, os.urandom(4)))

    def _sendall(self, data):
        with self._send_lock:
            if self.closed:
                raise ConnectionClosed("connection already closed")
            try:
                self.sock.sendall(data)
            except (OSError, ValueError) as e:
                raise self._lost(f"socket error while sending: {_describe(e)}") from e

    # -- ending --------------------------------------------------------------------------

    def close(self, code=1000, reason="", timeout_s=1.0):
        """Closing handshake: send a close frame, wait up to ``timeout_s`` for the answer."""
        if self.closed:
            return
        try:
            self.send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120])
            with gevent.Timeout(timeout_s, False):
                while True:
                    self.receive()
        except ConnectionClosed:
            pass
        finally:
            self.abort()

    def abort(self):
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

    def _answer_close(self, code_bytes):
        if self.before_close is not None:
            self.before_close()
        try:
            self.send_frame(OP_CLOSE, code_bytes)
        except ConnectionClosed:
            pass

    def _lost(self, cause):
        self.abort()
        return ConnectionClosed(cause)


def _frame(opcode, payload, mask):
    """A masked client frame (RFC 6455 5.3: clients mask every frame)."""
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, length)
    return head + mask + _mask(mask, payload)


def _mask(mask, data):
    """XOR ``data`` with the repeating 4-byte ``mask``, as one big-integer operation."""
    length = len(data)
    if not length:
        return b""
    key = mask * (length // 4) + mask[:length % 4]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


def _describe(error):
    text = str(error) or type(error).__name__
    return text if len(text) < 200 else text[:200] + "..."
