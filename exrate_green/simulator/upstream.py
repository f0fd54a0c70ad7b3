"""A loopback stand-in for the ``currency-assignment`` WebSocket server (DESIGN.md 1, 2).

``Upstream`` serves WebSocket clients on 127.0.0.1 with gevent-websocket. Per connection
it sends ``{"type":"heartbeat"}`` at once and then every ``heartbeat_interval_s``, and
(when ``request_rate > 0``) realistic conversion requests; it validates every frame a
client sends and keeps the numbers a test or a benchmark asks for (``report()``).

Faults are injected from the outside (``pause_heartbeats``, ``drop``, ``close``,
``send_raw``, ``send_garbage``, ``slow_read``); problems with what the client sent are
recorded, never raised in the server. ``exrate-service simulate`` (``tool.py``) runs it
as a standalone server with a fault script and a JSON report.

Every connection runs in its pool greenlet (the reader) plus a ``gevent.pool.Group`` of
background jobs (heartbeats, requests) killed when the connection ends. Frame I/O of a
connection lives in ``WsWire`` alone.

It is built to out-run the clients it measures (a benchmark must not measure its load
generator): frames are read in batches of up to 256 KiB and unmasked as big integers,
automatic requests cycle through pre-encoded payload templates, and a reply to one of
them is validated in a few C-level steps (``_fast_ok``; the detailed checks run only
when those fail, to say what is wrong).

Request ids rise monotonically across the whole server. Memory stays bounded for long
benchmarks: a request's payload is kept only until its first reply, answered ids cost
a few bytes each, and only the last ``keep_replies`` parsed replies are kept for
``wait_for_reply``.
"""

import collections
import datetime
import itertools
import logging
import math
import random
import re
import socket
import struct
import time
from array import array
from decimal import Decimal, InvalidOperation

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import orjson
from geventwebsocket.server import WebSocketServer

from ..connection import _mask

log = logging.getLogger(__name__)

__all__ = ["Upstream", "WsWire", "WireClosed", "DEFAULT_CURRENCY_WEIGHTS", "MARKET_SELECTIONS"]

# Relative frequency of each currency in generated requests (EUR frequent, as recorded).
DEFAULT_CURRENCY_WEIGHTS = {
    "EUR": 30, "USD": 18, "GBP": 12, "PLN": 10, "CZK": 8, "HRK": 6, "UAH": 6, "ZWL": 5, "BTC": 5,
}
_OTHER_CURRENCY_WEIGHT = 5

# The ten fixed (marketId, selectionId) pairs requests are drawn from.
MARKET_SELECTIONS = (
    (123456, 987654), (123456, 987655), (123457, 876543), (123457, 876544), (234567, 765432),
    (234567, 765433), (345678, 654321), (345678, 654322), (456789, 543210), (456789, 543211),
)

HEARTBEAT = b'{"type":"heartbeat"}'
ERROR_PREFIX = "Unable to convert stake. Error: "
_KEPT_AS_IS = ("stake", "currency", "date")  # the payload fields a reply may change
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_STAKE_TEXT_RE = re.compile(rb'"stake"\s*:\s*(-?[0-9][0-9.eE+-]*)')
_MAX_PROBLEMS = 20
#: the frames ``send_garbage`` sends in turn: ("text" | "binary", frame) for frames that
#: carry no id, ("request", raw payload) for requests with an id and a bad payload
GARBAGE = (
    ("text", b"not json"),
    ("request", b'{"stake":NaN,"currency":"USD","date":"2021-05-18T10:00:00.000Z"}'),
    ("text", b"{"),
    ("request", b'{"stake":"12","currency":"USD","date":"2021-05-18T10:00:00.000Z"}'),
    ("text", b'{"type":"unknown"}'),
    ("request", b'{"stake":12,"currency":"US","date":"2021-05-18T10:00:00.000Z"}'),
    ("binary", b"\x00\xff\x10 binary garbage"),
    ("request", b'{"stake":12,"currency":"USD","date":"2021-13-45"}'),
    ("text", b"\xff\xfe\xfd not UTF-8"),
    ("request", b'{"currency":"USD","date":"2021-05-18T10:00:00.000Z"}'),
    ("text", b"[" * 10_000 + b"]" * 10_000),
    ("request", b'{"stake":1e999,"currency":"USD","date":"2021-05-18T10:00:00.000Z"}'),
)
_MAX_ERROR_REASONS = 20


def _trunc(data, n=120):
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else str(data)
    return text if len(text) <= n else text[:n] + "..."


def _same(a, b):
    """JSON equality that also tells 2 from 2.0 and 1 from true."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _utc_ms(dt):
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


# --------------------------------------------------------------------------- wire I/O

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
        self._write(_header(opcode, len(data)) + data)

    def _write(self, frame):
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
        self._write(b"".join([_header(text, len(data)) + data for data in items]))

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


# --------------------------------------------------------------------------- bookkeeping

class _Connection:
    __slots__ = ("number", "wire", "opened", "heartbeats", "closing", "address", "jobs")

    def __init__(self, number, wire, address):
        self.number = number
        self.wire = wire
        self.address = address
        self.opened = time.monotonic()
        self.heartbeats = []
        self.closing = False
        self.jobs = gevent.pool.Group()   # background greenlets, killed when it ends


class _Ledger:
    """Which request ids were sent (and on which connection) and which were answered.

    Auto-assigned ids are dense from 1 and live in arrays (a few bytes each); ids chosen
    by the caller live in a dict. Payload and send time are kept only while pending.
    """

    NONE, PENDING, ANSWERED = 0, 1, 2

    def __init__(self):
        self.next_id = 1
        self._state = bytearray(1)     # index = auto id
        self._conn = array("I", [0])   # connection number the auto id was sent on
        self._explicit = {}            # id -> [state, connection number]
        self.pending = {}              # id -> (payload, t_sent, connection number)
        self.sent = 0

    def _is_auto(self, rid):
        return type(rid) is int and 0 < rid < len(self._state) and rid not in self._explicit

    def allocate(self):
        rid = self.next_id
        while rid in self._explicit:
            rid += 1
        self._state.extend(bytes(rid + 1 - len(self._state)))
        self._conn.extend([0] * (rid + 1 - len(self._conn)))
        self.next_id = rid + 1
        return rid

    def allocate_many(self, n):
        """``n`` fresh auto ids, rising."""
        if self._explicit:
            return [self.allocate() for _ in range(n)]
        first = self.next_id
        self.next_id = first + n
        grow = self.next_id - len(self._state)
        self._state.extend(bytes(grow))
        self._conn.frombytes(bytes(self._conn.itemsize * grow))
        return range(first, first + n)

    def register(self, rid, payload, conn_number, t_sent, auto):
        if auto:
            self._state[rid] = self.PENDING
            self._conn[rid] = conn_number
        else:
            self._explicit[rid] = [self.PENDING, conn_number]
        self.pending[rid] = (payload, t_sent, conn_number)
        self.sent += 1

    def register_many(self, ids, payloads, conn_number, t_sent):
        """``register`` for ids from ``allocate_many``, all sent at ``t_sent``."""
        for rid, payload in zip(ids, payloads):
            self._state[rid] = self.PENDING
            self._conn[rid] = conn_number
            self.pending[rid] = (payload, t_sent, conn_number)
        self.sent += len(ids)

    def unregister(self, rid):
        if self.pending.pop(rid, None) is None:
            return
        self.sent -= 1
        if rid in self._explicit:
            del self._explicit[rid]
        elif self._is_auto(rid):
            self._state[rid] = self.NONE
            self._conn[rid] = 0

    def state(self, rid):
        try:
            entry = self._explicit.get(rid)
        except TypeError:  # unhashable id
            return self.NONE
        if entry is not None:
            return entry[0]
        return self._state[rid] if self._is_auto(rid) else self.NONE

    def answer(self, rid):
        entry = self._explicit.get(rid)
        if entry is not None:
            entry[0] = self.ANSWERED
        else:
            self._state[rid] = self.ANSWERED
        return self.pending.pop(rid)

    def take(self, rid):
        """``answer(rid)`` if ``rid`` is pending, else None (its state is unchanged)."""
        try:
            found = self.pending.pop(rid, None)
        except TypeError:  # unhashable id
            return None
        if found is not None:
            entry = self._explicit.get(rid)
            if entry is not None:
                entry[0] = self.ANSWERED
            else:
                self._state[rid] = self.ANSWERED
        return found

    def sent_on(self, rid):
        try:
            entry = self._explicit.get(rid)
        except TypeError:
            return None
        if entry is not None:
            return entry[1]
        return (self._conn[rid] or None) if self._is_auto(rid) else None


# --------------------------------------------------------------------------- the server

class Upstream:
    """The ``currency-assignment`` simulator; see the module docstring."""

    CLOSE_WAIT_S = 1.0   # after our close frame, how long to wait for the client's
    MAX_BATCH = 256      # most requests written in one go by a request job catching up
    #: distinct payloads the automatic requests cycle through: each is drawn once from the
    #: recorded distribution and pre-encoded, so a request costs a few string operations
    TEMPLATES = 4096
    #: a slow-read fault reads at most this many bytes per pause
    SLOW_READ_BYTES, SLOW_READ_PAUSE_S = 4096, 0.05

    def __init__(self, host="127.0.0.1", port=0, *, heartbeat_interval_s=1.0,
                 request_rate=0.0, poisson=False, seed=None,
                 dates=(datetime.date(2021, 1, 1), datetime.date(2022, 6, 30)),
                 currencies=("EUR", "USD", "GBP", "PLN", "CZK", "HRK", "UAH", "ZWL", "BTC"),
                 ssl_context=None, keep_replies=10_000, reply_date_tolerance_s=300.0,
                 max_requests=None):
        """
        heartbeat_interval_s: None disables heartbeats altogether.
        request_rate: automatic requests per second on each connection (0: none), paced
            at fixed intervals or, with ``poisson``, exponentially distributed ones.
        max_requests: stop the automatic requests after this many in all (None: never).
        currencies: codes (weighted by DEFAULT_CURRENCY_WEIGHTS) or a {code: weight} dict.
        keep_replies: how many parsed replies ``wait_for_reply`` can still find.
        reply_date_tolerance_s: a reply ``date`` further than this from now is a problem
            (the reply date is the time the reply was made); None disables the check.
        """
        if request_rate < 0:
            raise ValueError("request_rate must be >= 0")
        if heartbeat_interval_s is not None and heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be > 0 (or None for no heartbeats)")
        self.host, self.port = host, port
        self.heartbeat_interval_s = heartbeat_interval_s
        self.request_rate = float(request_rate)
        self.poisson = poisson
        self.seed = seed
        self.ssl_context = ssl_context
        self.keep_replies = keep_replies
        self.reply_date_tolerance_s = reply_date_tolerance_s
        self.max_requests = max_requests

        self._rng = random.Random(seed)
        if isinstance(currencies, dict):
            weights = dict(currencies)
        else:
            weights = {c: DEFAULT_CURRENCY_WEIGHTS.get(c, _OTHER_CURRENCY_WEIGHT)
                       for c in currencies}
        if not weights:
            raise ValueError("currencies must not be empty")
        self._currencies = list(weights)
        self._currency_cum = list(itertools.accumulate(weights.values()))
        first, last = (d if isinstance(d, datetime.datetime) else
                       datetime.datetime.combine(d, datetime.time()) for d in dates)
        utc = datetime.timezone.utc
        first, last = (d.replace(tzinfo=utc) if d.tzinfo is None else d.astimezone(utc)
                       for d in (first, last))
        if not isinstance(dates[1], datetime.datetime):
            last += datetime.timedelta(days=1, milliseconds=-1)   # the whole last day
        if last < first:
            raise ValueError("dates window ends before it starts")
        self._date_first = first
        self._date_span_ms = int((last - first) / datetime.timedelta(milliseconds=1))

        self._pool = gevent.pool.Pool()
        self._server = None
        self.url = None
        self._conns = {}                # number -> _Connection, live ones
        self.connections = 0            # accepted so far (WebSocket upgrades)
        self.max_connected = 0
        self._paused = False
        self._refusing = False
        self._requests_paused = False
        self._slow_until = 0.0          # monotonic end of a slow-read fault
        self._started_at = None
        self._changed = gevent.event.Event()
        self._waiting = 0

        self._ledger = _Ledger()
        self._templates = []            # pre-encoded payloads the automatic requests cycle
        self._template_turn = 0
        self.auto_requests = 0          # automatic requests sent so far
        self.garbage_sent = 0
        self._good_date = (None, 0.0)   # (last reply date found valid, its epoch seconds)
        self._replies = collections.OrderedDict()  # id -> first parsed reply (last keep_replies)
        self._latencies_ms = array("d")
        self._heartbeats = []           # client heartbeat stamps, all connections
        self._client_closes = []        # (code, reason) of close frames clients sent
        self._ended_max_gap = None      # longest client heartbeat gap of ended connections
        self._problems = []
        self.server_heartbeats = 0
        self.replies = self.ok = self.error_replies = self.invalid = 0
        self.duplicates = self.redelivered = self.send_failures = 0
        self._error_reasons = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        if self._server is not None:
            raise RuntimeError("Upstream already started")
        if self.request_rate > 0:   # ~60 ms once, rather than a slow first second of requests
            self._next_templates(self.TEMPLATES)
            self._template_turn = 0
        self._listen()
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        self.url = f"{'wss' if self.ssl_context is not None else 'ws'}://{host}:{self.port}"
        self._started_at = time.monotonic()
        log.debug("upstream simulator listening on %s", self.url)
        return self

    def _listen(self):
        kwargs = {"ssl_context": self.ssl_context} if self.ssl_context is not None else {}
        self._server = WebSocketServer((self.host, self.port), self._app, spawn=self._pool,
                                       log=None, error_log=log, **kwargs)
        self._server.start()
        self.port = self._server.server_port

    def refuse_connections(self):
        """Go down: close the listening socket, so connecting fails with ECONNREFUSED.
        Connections already open live on (``drop()`` ends them)."""
        if self._server is not None and not self._refusing:
            self._refusing = True
            self._server.close()

    def accept_connections(self):
        """Come back up on the same port after ``refuse_connections()``."""
        if self._refusing:
            self._refusing = False
            self._listen()

    def stop(self, timeout=2.0):
        """Stop accepting, close every connection with 1001, wait for them (at most timeout)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self.close(1001, "simulator stopping", wait=min(self.CLOSE_WAIT_S, timeout))
        server.stop(timeout=timeout)   # joins the pool up to timeout, then kills the rest
        for conn in list(self._conns.values()):
            conn.wire.abort()
        self._notify()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ fault controls
    def pause_heartbeats(self):
        """Send no heartbeat on any connection (new ones included) until resumed."""
        self._paused = True

    def pause_requests(self):
        """Stop the automatic requests (``request_rate``) until ``resume_requests()``;
        lets a run drain, so a client is not blamed for requests sent as it stopped."""
        self._requests_paused = True

    def resume_requests(self):
        self._requests_paused = False

    def resume_heartbeats(self):
        self._paused = False

    def drop(self):
        """Abruptly end every connection: TCP shutdown + close, no close frame. -> count."""
        conns = list(self._conns.values())
        for conn in conns:
            conn.wire.abort()
        return len(conns)

    def close(self, code=1000, reason="", *, wait=None):
        """Send every connection a close frame (``code=None``: no status) and end it once the
        client answers, or after ``wait`` seconds (default CLOSE_WAIT_S). -> count."""
        wait = self.CLOSE_WAIT_S if wait is None else wait
        n = 0
        for conn in list(self._conns.values()):
            if conn.closing:
                continue
            conn.closing = True
            try:
                conn.wire.send_close(code, reason)
            except WireClosed:
                continue
            conn.jobs.add(gevent.spawn_later(wait, conn.wire.abort))
            n += 1
        return n

    def send_raw(self, data, binary=False):
        """Send one frame to every connection: str (text) or bytes (a text frame with those
        bytes, valid UTF-8 or not, unless ``binary``). -> count of connections sent to."""
        n = 0
        for conn in list(self._conns.values()):
            try:
                if binary:
                    conn.wire.send_binary(data.encode() if isinstance(data, str) else data)
                else:
                    conn.wire.send_text(data)
                n += 1
            except WireClosed:
                pass
        return n

    def send_raw_request(self, frame, id, binary=False):
        """Send a hand-made request ``frame`` (str or bytes, sent as is, as a text frame
        unless ``binary``) on the newest connection and expect exactly one reply to ``id``,
        which the frame is supposed to carry: for hostile requests whose envelope, not only
        the payload, is crafted. Replies are checked and counted as for ``send_request``
        (``duplicates``, ``unanswered``); raises ConnectionError the same way. -> ``id``."""
        conns = [c for c in self._conns.values() if not c.closing and not c.wire.dead]
        if not conns:
            raise ConnectionError("no client connected to the upstream simulator")
        conn = conns[-1]
        self._ledger.register(id, None, conn.number, time.monotonic(), False)
        try:
            if binary:
                conn.wire.send_binary(frame.encode() if isinstance(frame, str) else frame)
            else:
                conn.wire.send_text(frame)
        except WireClosed as e:
            self._ledger.unregister(id)
            self.send_failures += 1
            raise ConnectionError(f"request {id!r} not sent: {e}") from None
        return id

    def slow_read(self, seconds):
        """For ``seconds``, read what clients send slowly (``SLOW_READ_BYTES`` per
        ``SLOW_READ_PAUSE_S``, ~80 KiB/s): their writes back up into the TCP buffers."""
        self._slow_until = time.monotonic() + seconds

    def send_garbage(self, n):
        """Send ``n`` bad frames, in turn from ``GARBAGE``: those without an id go to every
        connection (a client must skip them), the requests with a bad payload to the newest
        one (each must get one error reply). -> frames sent."""
        sent = 0
        for i in range(n):
            kind, data = GARBAGE[(self.garbage_sent + i) % len(GARBAGE)]
            if kind == "request":
                try:
                    self.send_request(payload=data)
                    sent += 1
                except ConnectionError:
                    pass
            else:
                sent += min(1, self.send_raw(data, binary=kind == "binary"))
        self.garbage_sent += n
        return sent

    def send_wire(self, data):
        """Write ``data`` unchanged to every connection's socket: hand-made frames WsWire
        never produces (reserved opcodes, stray continuations, oversize control frames,
        masked server frames). -> count of connections written to."""
        n = 0
        for conn in list(self._conns.values()):
            try:
                conn.wire._write(bytes(data))
                n += 1
            except WireClosed:
                pass
        return n

    def send_request(self, payload=None, id=None):
        """Send one conversion request on the newest connection and return its id.

        payload: None -> a realistic one; a JSON-able value -> sent as is; str/bytes -> the
        raw JSON text of the payload (e.g. with NaN). id: None -> the next id; any other
        JSON value is used as is (a reused id replaces the earlier record).
        Raises ConnectionError when no client is connected or the send fails.
        """
        conns = [c for c in self._conns.values() if not c.closing and not c.wire.dead]
        if not conns:
            raise ConnectionError("no client connected to the upstream simulator")
        conn = conns[-1]
        auto = id is None
        rid = self._ledger.allocate() if auto else id
        if payload is None:
            payload = self.make_payload()
        frame = self._encode_request(rid, payload)
        if isinstance(payload, (str, bytes, bytearray)):
            try:
                payload = orjson.loads(payload)
            except orjson.JSONDecodeError:
                payload = None   # nothing to compare a reply with
        expected = _Template.of(payload) or payload
        self._ledger.register(rid, expected, conn.number, time.monotonic(), auto)
        try:
            conn.wire.send_text(frame)
        except WireClosed as e:
            self._ledger.unregister(rid)
            self.send_failures += 1
            raise ConnectionError(f"request {rid} not sent: {e}") from None
        return rid

    # ------------------------------------------------------------------ observations
    def connected(self):
        """Clients connected now."""
        return len(self._conns)

    def wait_until(self, predicate, timeout):
        """Wait (gevent-friendly) until predicate() is true; -> its last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            remaining = deadline - time.monotonic()
            if value or remaining <= 0:
                return value
            self._waiting += 1
            try:
                self._changed.wait(min(remaining, 0.1))
            finally:
                self._waiting -= 1

    def wait_for_connections(self, n, timeout):
        """Wait until at least n connections have been accepted so far (not: are live)."""
        return bool(self.wait_until(lambda: self.connections >= n, timeout))

    def wait_for_reply(self, id, timeout):
        """The first parsed reply (valid or not) whose id is ``id``, or None on timeout."""
        return self.wait_until(lambda: self._replies.get(id), timeout)

    def client_heartbeats(self):
        """time.monotonic() stamps of client heartbeats, all connections, in order."""
        return list(self._heartbeats)

    def client_closes(self):
        """(code or None, reason) of each close frame a client sent, in order."""
        return list(self._client_closes)

    def sent_on(self, id):
        """Number (1 = first accepted) of the connection request ``id`` was sent on."""
        return self._ledger.sent_on(id)

    @property
    def requests_sent(self):
        return self._ledger.sent

    @property
    def unanswered(self):
        """Requests sent and not answered yet."""
        return len(self._ledger.pending)

    def problems(self):
        return list(self._problems)

    def report(self):
        lat = sorted(self._latencies_ms)

        def pct(p):
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, math.ceil(p / 100 * len(lat)) - 1)], 3)

        now = time.monotonic()
        gaps = [self._ended_max_gap] + [self._max_gap(c, now) for c in self._conns.values()]
        gaps = [g for g in gaps if g is not None]
        gap = max(gaps) if gaps else None
        return {
            "connections": self.connections,
            "connected": len(self._conns),
            "max_connected": self.max_connected,
            "requests": self._ledger.sent,
            "replies": self.replies,
            "ok": self.ok,
            "error_replies": self.error_replies,
            "unanswered": len(self._ledger.pending),
            # of which sent on a connection that has ended since: a request written just
            # before a drop may never have reached the client
            "unanswered_on_ended_connections": sum(
                1 for _, _, number in self._ledger.pending.values() if number not in self._conns),
            "duplicates": self.duplicates,
            "invalid": self.invalid,
            "problems": list(self._problems),
            "redelivered": self.redelivered,
            "send_failures": self.send_failures,
            "garbage_sent": self.garbage_sent,
            "error_reasons": dict(self._error_reasons),
            "latency_p50_ms": pct(50),
            "latency_p99_ms": pct(99),
            "latency_max_ms": round(lat[-1], 3) if lat else None,
            "server_heartbeats": self.server_heartbeats,
            "client_heartbeats": len(self._heartbeats),
            "client_heartbeat_max_gap_s": None if gap is None else round(gap, 3),
            "client_closes": list(self._client_closes),
            "elapsed_s": round(now - self._started_at, 3) if self._started_at else 0.0,
        }

    @staticmethod
    def _max_gap(conn, now=None):
        """Longest wait for a client heartbeat on conn: open -> first, between them, and
        (while live) last -> now."""
        stamps = [conn.opened] + conn.heartbeats + ([now] if now is not None else [])
        if len(stamps) < 2:
            return None
        return max(b - a for a, b in zip(stamps, stamps[1:]))

    # ------------------------------------------------------------------ request generation
    def make_payload(self):
        """A realistic request payload (the recorded shape and ranges)."""
        rng = self._rng
        market_id, selection_id = rng.choice(MARKET_SELECTIONS)
        odds = rng.randint(2, 9) if rng.random() < 0.15 else round(rng.uniform(1.02, 9.01), 2)
        places = rng.choice((0, 1, 2, 2, 2, 3, 4, 5, 5))
        stake = round(rng.uniform(18.2, 9983.6), places)
        if places == 0 and rng.random() < 0.5:
            stake = int(stake)
        currency = rng.choices(self._currencies, cum_weights=self._currency_cum)[0]
        offset_ms = rng.randint(0, self._date_span_ms)
        when = self._date_first + datetime.timedelta(milliseconds=offset_ms)
        return {"marketId": market_id, "selectionId": selection_id, "odds": odds,
                "stake": stake, "currency": currency, "date": _utc_ms(when)}

    def _next_templates(self, n):
        """``n`` request templates: fresh ones until ``TEMPLATES`` exist, then in turn."""
        pool, out = self._templates, []
        while len(pool) < self.TEMPLATES and len(out) < n:
            pool.append(_Template(self.make_payload()))
            out.append(pool[-1])
        turn = self._template_turn
        for _ in range(n - len(out)):
            out.append(pool[turn])
            turn = turn + 1 if turn + 1 < len(pool) else 0
        self._template_turn = turn
        return out

    @staticmethod
    def _encode_request(rid, payload):
        if isinstance(payload, str):
            payload = payload.encode()
        if isinstance(payload, (bytes, bytearray)):
            return (b'{"type":"message","id":' + orjson.dumps(rid)
                    + b',"payload":' + bytes(payload) + b"}")
        return orjson.dumps({"type": "message", "id": rid, "payload": payload})

    # ------------------------------------------------------------------ per connection
    def _app(self, environ, start_response):
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("426 Upgrade Required", [("Content-Type", "text/plain")])
            return [b"a WebSocket upgrade is required\n"]
        self.connections += 1
        conn = _Connection(self.connections, WsWire(ws), environ.get("REMOTE_ADDR"))
        self._conns[conn.number] = conn
        self.max_connected = max(self.max_connected, len(self._conns))
        log.debug("upstream: connection %d opened from %s", conn.number, conn.address)
        self._notify()
        try:
            if self.heartbeat_interval_s is not None:
                conn.jobs.spawn(self._heartbeat_job, conn)
            if self.request_rate > 0:
                conn.jobs.spawn(self._request_job, conn)
            self._read_job(conn)
        finally:
            conn.jobs.kill(block=True, timeout=1)
            conn.wire.abort()
            conn.wire.detach()
            del self._conns[conn.number]
            gap = self._max_gap(conn)
            if gap is not None:
                self._ended_max_gap = max(gap, self._ended_max_gap or 0.0)
            log.debug("upstream: connection %d ended", conn.number)
            self._notify()
        return []

    def _heartbeat_job(self, conn):
        interval = self.heartbeat_interval_s
        due = time.monotonic()
        while True:
            if not self._paused:
                try:
                    conn.wire.send_text(HEARTBEAT)
                except WireClosed:
                    return
                self.server_heartbeats += 1
            due += interval
            now = time.monotonic()
            if now - due > interval:   # fell a whole tick behind: resume from now, no burst
                due = now
            gevent.sleep(max(0.0, due - now))

    def _request_job(self, conn):
        rng = random.Random(None if self.seed is None else f"{self.seed}/timing/{conn.number}")
        rate = self.request_rate

        def gap():
            return rng.expovariate(rate) if self.poisson else 1.0 / rate

        due = time.monotonic() + gap()
        while True:
            now = time.monotonic()
            gevent.sleep(max(0.0, due - now))    # sleep(0) still yields when behind
            now = time.monotonic()
            n = 0
            while due <= now and n < self.MAX_BATCH:
                n += 1
                due += gap()
            if now - due > 1.0:                   # over a second behind: shed the backlog
                due = now
            if self._requests_paused:
                continue
            if self.max_requests is not None:
                n = min(n, self.max_requests - self.auto_requests)
                if n <= 0:
                    return
            if n and not self._send_auto_requests(conn, n):
                return

    def _send_auto_requests(self, conn, n):
        ledger = self._ledger
        templates = self._next_templates(n)
        ids = ledger.allocate_many(n)
        frames = [b'{"type":"message","id":%d,"payload":%b}' % (rid, template.encoded)
                  for rid, template in zip(ids, templates)]
        ledger.register_many(ids, templates, conn.number, time.monotonic())
        try:
            conn.wire.send_texts(frames)
        except WireClosed:
            for rid in ids:
                ledger.unregister(rid)
            self.send_failures += n
            return False
        self.auto_requests += n
        return True

    def _read_job(self, conn):
        wire = conn.wire
        while True:
            if self._slow_until and time.monotonic() < self._slow_until:
                gevent.sleep(self.SLOW_READ_PAUSE_S)
                frames = wire.recv_batch(self.SLOW_READ_BYTES)
            else:
                frames = wire.recv_batch()
            if frames is None:
                return
            t, wall = time.monotonic(), time.time()   # when this batch arrived
            for opcode, data in frames:
                if opcode == WsWire.CLOSE:
                    self._on_client_close(conn, data)
                    return
                try:
                    self._on_frame(conn, opcode, data, t, wall)
                except Exception as e:  # a simulator bug must not end the connection
                    log.exception("upstream: error handling a frame")
                    self._problem(f"simulator error on frame {_trunc(data)!r}: {e!r}")
            self._notify()

    def _on_client_close(self, conn, data):
        code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
        self._client_closes.append((code, data[2:].decode("utf-8", "replace")))
        if not conn.closing:       # the client started the closing handshake: answer it
            conn.closing = True
            try:
                conn.wire.send_close(code if code is not None else 1000, "")
            except WireClosed:
                pass

    # ------------------------------------------------------------------ validation
    def _problem(self, text):
        self.invalid += 1
        if len(self._problems) < _MAX_PROBLEMS:
            self._problems.append(text)
        log.debug("upstream: invalid: %s", text)

    def _notify(self):
        if self._waiting:
            changed, self._changed = self._changed, gevent.event.Event()
            changed.set()

    def _on_frame(self, conn, opcode, data, t, wall):
        if opcode == WsWire.BINARY:
            self._problem(f"binary frame of {len(data)} bytes")
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._problem(f"not JSON: {_trunc(data)!r}")
            return
        kind = msg.get("type") if type(msg) is dict else None
        if kind == "message" or kind == "error":
            self._on_reply(conn, msg, data, t, wall)
        elif kind == "heartbeat":
            conn.heartbeats.append(t)
            self._heartbeats.append(t)
        else:
            self._problem(f"unknown frame: {_trunc(data)!r}")

    def _keep_reply(self, rid, msg):
        try:
            if rid in self._replies:
                return
        except TypeError:   # unhashable id
            return
        self._replies[rid] = msg
        if len(self._replies) > self.keep_replies:
            self._replies.popitem(last=False)

    def _on_reply(self, conn, msg, data, t, wall):
        rid = msg.get("id")
        found = self._ledger.take(rid) if type(rid) is int or type(rid) is str else None
        if found is None:
            state = self._ledger.state(rid) if not isinstance(rid, bool) else _Ledger.NONE
            if state == _Ledger.NONE:
                self._keep_reply(rid, msg)
                self._problem(f"reply to unknown id {_trunc(orjson.dumps(rid), 40)}: "
                              f"{_trunc(data)!r}")
                return
            if state == _Ledger.ANSWERED:
                self.duplicates += 1
                self._problem(f"duplicate reply to id {rid}: {_trunc(data)!r}")
                return
            found = self._ledger.answer(rid)   # a pending id of another type (a float...)
        expected, t_sent, sent_on = found
        self.replies += 1
        self._latencies_ms.append((t - t_sent) * 1000.0)
        if sent_on != conn.number:
            self.redelivered += 1
        self._keep_reply(rid, msg)
        if msg["type"] == "message":
            if type(expected) is _Template:
                if self._fast_ok(msg, expected, data, wall):
                    self.ok += 1
                    return
                expected = expected.payload
            problems = self._check_message(msg, expected, data)
        else:
            problems = self._check_error(msg)
        if problems:
            self._problem(f"reply to id {rid}: {'; '.join(problems)}: {_trunc(data)!r}")
        elif msg["type"] == "message":
            self.ok += 1
        else:
            self.error_replies += 1
            reason = msg["message"][len(ERROR_PREFIX):]
            if reason in self._error_reasons or len(self._error_reasons) < _MAX_ERROR_REASONS:
                self._error_reasons[reason] = self._error_reasons.get(reason, 0) + 1

    def _fast_ok(self, msg, template, data, wall):
        """True when a success reply is certainly valid: the checks of ``_check_message``
        in few steps. False means "look closer" (``_check_message`` says what is wrong)."""
        payload = msg.get("payload")
        if type(payload) is not dict or payload.get("currency") != "EUR":
            return False
        stake = payload.get("stake")
        if type(stake) is not float and type(stake) is not int:
            return False
        rest = {k: v for k, v in payload.items() if k not in _KEPT_AS_IS}
        if orjson.dumps(rest, option=orjson.OPT_SORT_KEYS) != template.rest:
            return False
        texts = _STAKE_TEXT_RE.findall(data)
        if not texts:
            return False
        for text in texts:
            head, dot, tail = text.partition(b".")
            if len(tail) > 5 or not head.lstrip(b"-").isdigit() or (dot and not tail.isdigit()):
                return False   # more than 5 decimals, an exponent: the slow path decides
        if template.eur_stake is not None and float(texts[-1]) != template.eur_stake:
            return False
        date = payload.get("date")
        good, epoch = self._good_date
        if date != good:
            epoch = _reply_date_epoch(date)
            if epoch is None:
                return False
            self._good_date = (date, epoch)
        tolerance = self.reply_date_tolerance_s
        return tolerance is None or abs(wall - epoch) <= tolerance

    def _check_error(self, msg):
        message = msg.get("message")
        if not isinstance(message, str) or not message.startswith(ERROR_PREFIX):
            return [f"error message must start with {ERROR_PREFIX!r}"]
        if not message[len(ERROR_PREFIX):].strip():
            return ["error message has no reason"]
        return []

    def _check_message(self, msg, original, data):
        payload = msg.get("payload")
        if not isinstance(payload, dict):
            return ["payload is not an object"]
        problems = []
        if isinstance(original, dict):
            for key, value in original.items():
                if key in _KEPT_AS_IS:
                    continue
                if key not in payload:
                    problems.append(f"field {key!r} missing")
                elif not _same(payload[key], value):
                    problems.append(f"field {key!r} changed: {payload[key]!r} != {value!r}")
            extra = [k for k in payload if k not in original and k not in _KEPT_AS_IS]
            if extra:
                problems.append(f"unexpected fields {extra}")
        if payload.get("currency") != "EUR":
            problems.append(f"currency {payload.get('currency')!r} is not 'EUR'")
        problems += self._check_stake(payload, original, data)
        problems += self._check_date(payload.get("date"))
        return problems

    def _check_stake(self, payload, original, data):
        stake = payload.get("stake")
        if isinstance(stake, bool) or not isinstance(stake, (int, float)):
            return [f"stake {stake!r} is not a JSON number"]
        if not math.isfinite(stake):
            return [f"stake {stake!r} is not finite"]
        texts = _STAKE_TEXT_RE.findall(data)
        if not texts:
            return ["stake text not found in the frame"]
        problems = []
        for text in texts:
            places = _decimal_places(text)
            if places is None:
                problems.append(f"stake text {text.decode()!r} is not a number")
            elif places > 5:
                problems.append(f"stake {text.decode()} has more than 5 decimals")
        if (not problems and isinstance(original, dict) and original.get("currency") == "EUR"
                and isinstance(original.get("stake"), (int, float))
                and not isinstance(original.get("stake"), bool)):
            want = Decimal(repr(original["stake"])).quantize(Decimal("0.00001"))
            if Decimal(texts[-1].decode()) != want:
                problems.append(f"EUR stake changed: {texts[-1].decode()} != {want.normalize()}")
        return problems

    def _check_date(self, date):
        if not isinstance(date, str) or not _DATE_RE.fullmatch(date):
            return [f"date {date!r} is not YYYY-MM-DDTHH:MM:SS.mmmZ"]
        epoch = _reply_date_epoch(date)
        if epoch is None:
            return [f"date {date!r} is not a real time"]
        tolerance = self.reply_date_tolerance_s
        if tolerance is not None:
            skew = abs(time.time() - epoch)
            if skew > tolerance:
                return [f"date {date} is not the reply time (off by {skew:.0f} s)"]
        return []


class _Template:
    """A request payload, pre-encoded, with what every valid reply to it must hold:
    ``rest`` the other fields as sorted-key JSON (which tells 2 from 2.0 and 1 from true),
    ``eur_stake`` the stake a EUR request must keep (None for other currencies)."""

    __slots__ = ("payload", "encoded", "rest", "eur_stake")

    def __init__(self, payload):
        self.payload = payload
        self.encoded = orjson.dumps(payload)
        self.rest = orjson.dumps({k: v for k, v in payload.items() if k not in _KEPT_AS_IS},
                                 option=orjson.OPT_SORT_KEYS)
        stake = payload.get("stake")
        self.eur_stake = None
        if payload.get("currency") == "EUR" and type(stake) in (int, float):
            self.eur_stake = float(Decimal(repr(stake)).quantize(Decimal("0.00001")))

    @classmethod
    def of(cls, payload):
        """A template for ``payload`` if it is a plain JSON object with string keys, else None."""
        if type(payload) is not dict:
            return None
        try:
            return cls(payload)
        except (TypeError, ValueError, InvalidOperation):   # orjson's errors are these
            return None


def _reply_date_epoch(date):
    """Epoch seconds of a ``YYYY-MM-DDTHH:MM:SS.mmmZ`` text; None if it is not one."""
    if type(date) is not str or not _DATE_RE.fullmatch(date):
        return None
    try:
        moment = datetime.datetime.fromisoformat(date[:-1])
    except ValueError:
        return None
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def _decimal_places(text):
    """Digits after the point of a JSON number's text (exponent counted); None if not one."""
    if b"e" not in text and b"E" not in text:
        head, dot, tail = text.partition(b".")
        return len(tail) if tail.isdigit() or not dot else None
    try:
        exponent = Decimal(text.decode()).as_tuple().exponent
    except InvalidOperation:
        return None
    return max(0, -exponent) if isinstance(exponent, int) else None
