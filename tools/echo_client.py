"""The bench's echo client: the load a perfect service would put on the simulator.

``python tools/echo_client.py ws://HOST:PORT`` connects, answers every request at once
with a valid reply and a heartbeat every second, and returns when the server closes.
A blocking socket and no framework; frames are parsed and built by the project's frame
layer (``exrate_green.ws``, client role), as everything else in the repository does.
"""

from gevent import monkey

monkey.patch_all()  # first, as in every entry point

import base64
import datetime
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's exrate_green

from exrate_green import ws

HEARTBEAT = b'{"type":"heartbeat"}'


def handshake(url: str) -> tuple[socket.socket, bytes]:
    """A connected, upgraded socket and the bytes that came after the 101 response."""
    parts = urllib.parse.urlsplit(url)
    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms delayed-ACK stalls
    sock.sendall((f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"no upgrade: {head[:80]!r}")
    return sock, rest


def answer(request: bytes, stamp: str) -> bytes | None:
    """A valid reply to a request message (the stake converted at a made-up rate), or None."""
    try:
        message = orjson.loads(request)
        body = message["payload"]
        if body["currency"] != "EUR":
            body["stake"] = round(body["stake"] * 0.85, 2)
        body["currency"], body["date"] = "EUR", stamp
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # not a request an echo can answer
    return orjson.dumps(message)


def echo_client(url: str) -> int:
    """Answer every request on ``url`` until the server closes; 0, or 1 on a violation."""
    sock, rest = handshake(url)
    parser = ws.Parser("client")
    events = parser.feed(rest)
    sock.settimeout(0.05)
    next_beat = time.monotonic()
    while True:
        replies = []
        if time.monotonic() >= next_beat:
            replies.append(HEARTBEAT)
            next_beat += 1.0
        now = datetime.datetime.now(datetime.UTC)
        stamp = f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z"
        for kind, value in events:
            if kind == "text" and value.startswith(b'{"type":"message"'):
                reply = answer(value, stamp)
                if reply is not None:
                    replies.append(reply)
            elif kind == "ping":
                sock.sendall(ws.build_frame(ws.OP_PONG, value, mask=True))
            elif kind == "close":
                sock.sendall(ws.build_frame(
                    ws.OP_CLOSE, ws.build_close_payload(value.code), mask=True))
                return 0
            elif kind == "violation":
                return 1
        if replies:
            sock.sendall(ws.build_text_frames(replies, mask=True))
        try:
            data = sock.recv(262144)
        except TimeoutError:
            data = None
        if data == b"":
            return 0
        events = parser.feed(data) if data else []


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python tools/echo_client.py ws://HOST:PORT", file=sys.stderr)
        sys.exit(2)
    sys.exit(echo_client(sys.argv[1]))
