"""The client connection on the wire: RFC 6455 violations, the closing handshake, and an
independent server (python-websockets) as the upstream.

* The simulator sends hand-made bytes that break RFC 6455: the client answers every
  request it read before them, fails the connection with one close frame (1002, 1007 for
  invalid UTF-8), and the service reconnects at once, its backoff not grown.
* A hand-driven server (``RawPeer``) sees every byte the client writes: one close frame,
  never an answer to the answer of our own close, the upstream's code echoed.
* python-websockets, in a subprocess (its asyncio loop never touches the gevent hub),
  pings, sends fragmented messages and closes with 1000/1001/1011/4000.
"""

import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from exrate_green import ws
from exrate_green.connection import Connection
from exrate_green.errors import ConnectionClosed
from exrate_green.simulator import Upstream

from .support import running_service, wait_until

USD_20210518 = {"marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 253.67,
                "currency": "USD", "date": "2021-05-18T21:32:42.324Z"}


def server_frame(opcode, payload, fin=True):
    return ws.build_frame(opcode, payload, mask=False, fin=fin)


# Hand-made server bytes that break RFC 6455, and the close code the client must send.
VIOLATIONS = {
    "rsv-bit": (bytes((0xC1, 2)) + b"{}", 1002),
    "reserved-opcode": (bytes((0x83, 2)) + b"{}", 1002),
    "masked-server-frame": (ws.build_frame(ws.OP_TEXT, b'{"type":"heartbeat"}', mask=True), 1002),
    "fragmented-ping": (server_frame(ws.OP_PING, b"p", fin=False), 1002),
    "orphan-continuation": (server_frame(ws.OP_CONTINUATION, b"{}"), 1002),
    "new-message-inside-a-fragmented-one": (
        server_frame(ws.OP_TEXT, b"[", fin=False) + server_frame(ws.OP_TEXT, b"{}"), 1002),
    "ping-over-125-bytes": (server_frame(ws.OP_PING, b"p" * 126), 1002),
    "invalid-utf8": (server_frame(ws.OP_TEXT, b'{"type":"heartbeat\xff"}'), 1007),
    "close-code-999": (server_frame(ws.OP_CLOSE, struct.pack("!H", 999)), 1002),
    "close-code-1005": (server_frame(ws.OP_CLOSE, struct.pack("!H", 1005)), 1002),
    "one-byte-close-payload": (server_frame(ws.OP_CLOSE, b"\x03"), 1002),
}


def request_text(rid):
    return json.dumps({"type": "message", "id": rid, "payload": USD_20210518}).encode()


# -- violations, against the service ----------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_a_violation_fails_the_connection_after_answering_what_came_before(tmp_path, name):
    violation, code = VIOLATIONS[name]
    with Upstream(heartbeat_interval_s=0.2) as up, running_service(up.url, tmp_path) as service:
        assert up.wait_for_connections(1, 5)
        assert up.wait_for_reply(up.send_request(USD_20210518), 5)  # the day's rates are known
        rid = up.send_raw_request(request_text(9001), 9001)
        assert up.send_wire(violation) == 1  # right behind the request: one read takes both
        assert up.wait_for_connections(2, 3)
        assert up.client_closes() == [(code, up.client_closes()[0][1])]  # one close frame
        assert up.client_closes()[0][1]  # with a reason that says what was wrong
        reply = up.wait_for_reply(rid, 3)
        assert reply is not None and reply["type"] == "message"
        report = up.report()
        assert report["redelivered"] == 0 and report["duplicates"] == 0  # answered before
        assert service.stats.reconnects == 1
        assert up.wait_for_reply(up.send_request(USD_20210518), 5)  # and serving again


@pytest.mark.timeout(30)
def test_repeated_violations_reconnect_at_once_without_growing_the_backoff(tmp_path):
    # No heartbeats: every connection fails before its first one, as a connect failure
    # would. Backoff that grew with each (0, 0.125, 0.25, 0.5, 1, 2 s at least) would take
    # over 3.8 s for seven reconnects.
    violation, _ = VIOLATIONS["reserved-opcode"]
    with Upstream(heartbeat_interval_s=0.2) as up, running_service(up.url, tmp_path) as service:
        up.pause_heartbeats()
        assert up.wait_for_connections(1, 5)
        started = time.monotonic()
        for n in range(1, 8):
            assert wait_until(lambda: up.connected() == 1, 2)
            assert up.send_wire(violation) >= 1
            assert up.wait_for_connections(n + 1, 2), n
        elapsed_s = time.monotonic() - started
        assert elapsed_s < 2.0, elapsed_s
        assert [code for code, _ in up.client_closes()] == [1002] * 7
        assert service.stats.reconnects == 7


@pytest.mark.timeout(30)
def test_a_graceful_stop_sends_exactly_one_close_frame(tmp_path):
    with Upstream(heartbeat_interval_s=0.2) as up:
        with running_service(up.url, tmp_path):
            assert up.wait_for_connections(1, 5)
            assert up.wait_for_reply(up.send_request(USD_20210518), 5)
        gevent.sleep(0.3)
        assert up.client_closes() == [(1000, "shutting down")]


# -- the closing handshake, byte by byte ------------------------------------------------

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3


class RawPeer:
    """A hand-driven WebSocket server for one connection on 127.0.0.1: the test writes
    every byte it sends and reads every byte the client writes."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.sock = None
        self.parser = ws.Parser("server")
        self.after_close = b""  # bytes the client wrote after its close frame

    def accept(self):
        self.sock, _ = self.listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += self.sock.recv(4096)
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")

    def read(self, timeout_s):
        """Events of what the client writes within ``timeout_s``; bytes after its close
        frame go to ``after_close`` (fed one at a time, so none hides behind the close)."""
        events = []
        with gevent.Timeout(timeout_s, False):
            while data := self.sock.recv(65536):
                for i in range(len(data)):
                    if self.parser.done:
                        self.after_close += data[i:]
                        break
                    events += self.parser.feed(data[i:i + 1])
        return events

    def close(self):
        for s in (self.sock, self.listener):
            if s is not None:
                s.close()


@pytest.fixture
def peer():
    raw = RawPeer()
    yield raw
    raw.close()


def connect(peer):
    accepting = gevent.spawn(peer.accept)
    conn = Connection.open(peer.url, timeout_s=3)
    accepting.get(timeout=3)
    return conn


@pytest.mark.timeout(10)
def test_our_close_is_sent_once_and_its_answer_is_not_answered(peer):
    conn = connect(peer)
    closing = gevent.spawn(conn.close, 1000, "bye", 3.0)
    assert peer.read(0.3) == [("close", ws.Close(1000, "bye"))]
    peer.sock.sendall(server_frame(ws.OP_CLOSE, ws.build_close_payload(1000)))
    assert peer.read(0.3) == [] and peer.after_close == b""  # no second close frame
    assert not closing.ready()  # the client lets the server close TCP first
    peer.sock.close()
    closing.join(timeout=1)
    assert closing.ready() and conn.closed


@pytest.mark.timeout(10)
@pytest.mark.parametrize("sent, echoed", [(ws.build_close_payload(4000, "later"), 4000),
                                          (ws.build_close_payload(1001), 1001),
                                          (b"", 1000)])
def test_a_close_from_the_upstream_is_answered_once_with_its_code(peer, sent, echoed):
    conn = connect(peer)
    peer.sock.sendall(server_frame(ws.OP_TEXT, b'{"type":"heartbeat"}')
                      + server_frame(ws.OP_CLOSE, sent))
    assert conn.receive() == [("text", b'{"type":"heartbeat"}')]  # what came before, first
    ending = gevent.spawn(conn.receive)
    assert [(kind, detail.code) for kind, detail in peer.read(0.3)] == [("close", echoed)]
    assert peer.after_close == b""
    peer.sock.close()
    ending.join(timeout=1)
    assert isinstance(ending.exception, ConnectionClosed)
    code = ws.parse_close_payload(sent).code
    assert f"upstream sent close frame {code}" in ending.exception.reason


@pytest.mark.timeout(10)
def test_a_peer_that_never_closes_tcp_is_waited_for_briefly(peer):
    conn = connect(peer)
    conn.close_wait_s = 0.2
    peer.sock.sendall(server_frame(ws.OP_CLOSE, ws.build_close_payload(1000)))
    started = time.monotonic()
    with pytest.raises(ConnectionClosed):
        conn.receive()
    assert 0.15 < time.monotonic() - started < 1.0
    assert conn.closed


@pytest.mark.timeout(10)
def test_a_violation_is_answered_with_one_close_frame_then_nothing(peer):
    conn = connect(peer)
    conn.close_wait_s = 0.3
    peer.sock.sendall(server_frame(ws.OP_PING, b"first") + bytes((0x83, 0)))
    ending = gevent.spawn(conn.receive)
    events = peer.read(0.5)
    assert events[0] == ("pong", b"first")  # a ping before the violation is still answered
    assert [kind for kind, _ in events] == ["pong", "close"]
    assert events[1][1].code == 1002 and "reserved opcode" in events[1][1].reason
    ending.join(timeout=1)
    assert ending.exception.code == 1002 and conn.violation.code == 1002
    with pytest.raises(ConnectionClosed):
        conn.send([b'{"type":"heartbeat"}'])
    assert peer.after_close == b""


# -- an independent upstream: python-websockets ------------------------------------------

@pytest.fixture
def websockets_upstream():
    """python-websockets serving in a subprocess: (base URL, function reading its reports)."""
    script = Path(__file__).with_name("websockets_upstream.py")
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ""})
    try:
        with gevent.Timeout(10):
            port = int(proc.stdout.readline().split()[1])

        def report():
            with gevent.Timeout(5):
                return json.loads(proc.stdout.readline())
        yield f"ws://127.0.0.1:{port}", report
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def serve_echo(conn):
    """Echo every message until the server closes; -> (messages, the ConnectionClosed)."""
    messages = []
    try:
        while True:
            for kind, data in conn.receive():
                messages.append((kind, data))
                if kind == "text":
                    conn.send([data])
                else:
                    conn.send_binary(data)
    except ConnectionClosed as e:
        return messages, e


@pytest.mark.timeout(20)
def test_python_websockets_pings_fragments_and_a_clean_close(websockets_upstream):
    base, report = websockets_upstream
    conn = Connection.open(f"{base}/conversation", timeout_s=5)
    started = time.monotonic()
    with gevent.Timeout(5):
        messages, ended = serve_echo(conn)
    seen = report()
    assert messages == [("text", '{"type":"fragmented","text":"héllo"}'.encode()),
                        ("binary", b"\x00\x01\x02\x03")]
    assert seen["pong"] is True, seen
    assert seen["echoes"] == ['{"type":"fragmented","text":"héllo"}', "00010203"], seen
    assert seen["close_rcvd"] == [1000, ""] and seen["close_rcvd_then_sent"] is False, seen
    assert "error" not in seen, seen
    assert ended.reason == "upstream sent close frame 1000 (done)"
    assert time.monotonic() - started < conn.close_wait_s  # the server closed TCP itself


@pytest.mark.timeout(20)
@pytest.mark.parametrize("code", [1000, 1001, 1011, 4000])
def test_python_websockets_closing_with_a_code_gets_it_echoed_once(websockets_upstream, code):
    base, report = websockets_upstream
    conn = Connection.open(f"{base}/close/{code}", timeout_s=5)
    with gevent.Timeout(5):
        messages, ended = serve_echo(conn)
    seen = report()
    assert messages == [("text", b'{"type":"heartbeat"}')]
    assert seen["close_rcvd"] == [code, ""], seen
    assert "error" not in seen, seen
    assert ended.reason == f"upstream sent close frame {code} (closing with {code})"
    assert conn.closed


@pytest.mark.timeout(10)
def test_a_violation_from_a_peer_that_stopped_reading_ends_the_connection_in_bounded_time(peer):
    conn = connect(peer)
    conn.close_wait_s = 0.3
    # 24 MiB, more than the socket buffers hold: the write blocks, the peer reads nothing.
    # In 1 MiB messages: masking a single 24 MiB one would hold the hub too long.
    writer = gevent.spawn(conn.send, [b"x" * (1 << 20)] * 24)
    gevent.sleep(0.1)
    assert not writer.ready()
    peer.sock.sendall(bytes((0x83, 0)))  # reserved opcode
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as ended:
        conn.receive()
    assert ended.value.code == 1002
    assert time.monotonic() - started < 1.0
    writer.join(timeout=1)
    assert isinstance(writer.exception, ConnectionClosed)  # the write woke with an error
