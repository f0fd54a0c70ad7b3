"""A loopback stand-in for the ``currency-assignment`` WebSocket server (docs/design.md 1, 2).

``Upstream`` serves WebSocket clients on 127.0.0.1 with gevent-websocket. Per connection
it sends ``{"type":"heartbeat"}`` at once and then every ``heartbeat_interval_s``, and
(when ``request_rate > 0``) realistic conversion requests; it judges every frame a client
sends and keeps the numbers a test or a benchmark asks for (``report()``).

Faults are injected from the outside (``pause_heartbeats``, ``drop``, ``close``,
``send_raw``, ``send_wire``, ``send_garbage``, ``slow_read``); problems with what the client
sent are recorded, never raised in the server. ``exrate-service simulate`` (``tool.py``)
runs it as a standalone server with a fault script and a JSON report.

The jobs live in their own modules: ``peer`` (one connection: its reader, heartbeat and
request jobs), ``shared`` (the parts of the server a connection is given), ``wire`` (its
frame I/O), ``traffic`` (what is sent and when), ``ledger`` (request ids and what became
of them), ``judging`` (reply validation and the score), ``samples`` (bounded statistics).
This module ties them together: the server, its connections, the fault controls and the
report.

Every connection runs in its pool greenlet (the reader) plus a ``gevent.pool.Group`` of
background jobs (heartbeats, requests) killed when the connection ends. Memory is bounded
however long it runs (see ``ledger`` and ``samples``), and ``report()`` is cheap: the
latency percentiles come from a fixed-size reservoir, sorted only when asked.
"""

import logging
import time
from collections.abc import Callable
from typing import Any, Self

import gevent
import gevent.event
import gevent.pool
import orjson
from geventwebsocket.server import WebSocketServer

from .judging import Judge
from .ledger import Ledger
from .peer import Peer
from .samples import Heartbeats
from .shared import ClientCloses, Counters, PeerSettings, Shared, Switches
from .traffic import (
    DEFAULT_CURRENCIES,
    DEFAULT_DATES,
    GARBAGE,
    RequestMaker,
    Template,
    encode_request,
)
from .wire import WireClosed, WsWire

log = logging.getLogger("exrate_green.simulator")

__all__ = ["Upstream"]


class _Kept:
    """An attribute of ``Upstream`` kept in one of the parts it shares with its connections
    (``part``: the attribute holding it), so the public name reads and sets the value the
    connections see."""

    def __init__(self, part: str, name: str = "") -> None:
        self.part, self.name = part, name   # name "": the same as the Upstream attribute

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, up: Any, owner: type | None = None) -> Any:
        return self if up is None else getattr(getattr(up, self.part), self.name)

    def __set__(self, up: Any, value: Any) -> None:
        setattr(getattr(up, self.part), self.name, value)


class Upstream:
    """The ``currency-assignment`` simulator; see the module docstring."""

    CLOSE_WAIT_S = 1.0   # after our close frame, how long to wait for the client's
    MAX_CLIENT_CLOSES = 100

    # switches the fault controls set and the connections (``peer``) read
    heartbeats_paused = _Kept("_switches")
    requests_paused = _Kept("_switches")
    slow_until = _Kept("_switches")     # monotonic end of a slow-read fault
    # counters the connections add to
    auto_requests = _Kept("_counters")  # automatic requests sent so far
    server_heartbeats = _Kept("_counters")
    send_failures = _Kept("_counters")
    client_close_count = _Kept("_closes", "count")

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 heartbeat_interval_s: float | None = 1.0, request_rate: float = 0.0,
                 poisson: bool = False, seed: Any = None, dates: tuple = DEFAULT_DATES,
                 currencies: tuple | dict = DEFAULT_CURRENCIES, ssl_context: Any = None,
                 keep_replies: int = 10_000, reply_date_tolerance_s: float | None = 300.0,
                 max_requests: int | None = None, latency_samples: int = 10_000,
                 ledger_window: int = 1 << 16):
        """
        heartbeat_interval_s: None disables heartbeats altogether.
        request_rate: automatic requests per second on each connection (0: none), paced
            at fixed intervals or, with ``poisson``, exponentially distributed ones.
        max_requests: stop the automatic requests after this many in all (None: never).
        currencies: codes (weighted by DEFAULT_CURRENCY_WEIGHTS) or a {code: weight} dict.
        keep_replies: how many parsed replies ``wait_for_reply`` can still find.
        reply_date_tolerance_s: a reply ``date`` further than this from now is a problem
            (the reply date is the time the reply was made); None disables the check.
        latency_samples, ledger_window: the memory bounds (see ``samples``, ``ledger``).
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
        self.max_requests = max_requests
        self.maker = RequestMaker(seed, currencies, dates)
        self.ledger = Ledger(ledger_window)
        self.judge = Judge(self.ledger, keep_replies=keep_replies, latency_samples=latency_samples,
                           reply_date_tolerance_s=reply_date_tolerance_s)
        self.heartbeats = Heartbeats()
        self._switches, self._counters = Switches(), Counters()
        self._closes = ClientCloses(self.MAX_CLIENT_CLOSES)
        self._shared: Shared | None = None   # what each connection is given, from start()

        self._pool = gevent.pool.Pool()
        self._server: WebSocketServer | None = None
        self.url: str | None = None
        self._conns: dict[int, Peer] = {}   # number -> live connection
        self.connections = 0            # accepted so far (WebSocket upgrades)
        self.max_connected = 0
        self._refusing = False
        self._started_at: float | None = None
        self._changed = gevent.event.Event()
        self._waiting = 0
        self.garbage_sent = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("Upstream already started")
        if self.request_rate > 0:   # ~60 ms once, rather than a slow first second of requests
            self.maker.prepare(lambda: gevent.sleep(0))   # in slices: the hub may be shared
        self._shared = self._share()
        self._listen()
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        self.url = f"{'wss' if self.ssl_context is not None else 'ws'}://{host}:{self.port}"
        self._started_at = time.monotonic()
        log.debug("upstream simulator listening on %s", self.url)
        return self

    def _share(self) -> Shared:
        """The parts each connection is given, its settings as they are now (at start)."""
        settings = PeerSettings(self.heartbeat_interval_s, self.request_rate, self.poisson,
                                self.seed, self.max_requests)
        return Shared(settings, self._switches, self._counters, self.maker, self.ledger,
                      self.judge, self.heartbeats, self._closes, self.notify)

    def _listen(self) -> None:
        kwargs = {"ssl_context": self.ssl_context} if self.ssl_context is not None else {}
        self._server = WebSocketServer((self.host, self.port), self._app, spawn=self._pool,
                                       log=None, error_log=log, **kwargs)
        self._server.start()
        self.port = self._server.server_port

    def refuse_connections(self) -> None:
        """Go down: close the listening socket, so connecting fails with ECONNREFUSED.
        Connections already open live on (``drop()`` ends them)."""
        if self._server is not None and not self._refusing:
            self._refusing = True
            self._server.close()

    def accept_connections(self) -> None:
        """Come back up on the same port after ``refuse_connections()``."""
        if self._refusing:
            self._refusing = False
            self._listen()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, close every connection with 1001, wait for them (at most timeout)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self.close(1001, "simulator stopping", wait=min(self.CLOSE_WAIT_S, timeout))
        server.stop(timeout=timeout)   # joins the pool up to timeout, then kills the rest
        for conn in list(self._conns.values()):
            conn.wire.abort()
        self.notify()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ fault controls
    def pause_heartbeats(self) -> None:
        """Send no heartbeat on any connection (new ones included) until resumed."""
        self.heartbeats_paused = True

    def resume_heartbeats(self) -> None:
        self.heartbeats_paused = False

    def pause_requests(self) -> None:
        """Stop the automatic requests (``request_rate``) until ``resume_requests()``;
        lets a run drain, so a client is not blamed for requests sent as it stopped."""
        self.requests_paused = True

    def resume_requests(self) -> None:
        self.requests_paused = False

    def drop(self) -> int:
        """Abruptly end every connection: TCP shutdown + close, no close frame. -> count."""
        conns = list(self._conns.values())
        for conn in conns:
            conn.wire.abort()
        return len(conns)

    def close(self, code: int | None = 1000, reason: str = "", *,
              wait: float | None = None) -> int:
        """Send every connection a close frame (``code=None``: no status) and end it once the
        client answers, or after ``wait`` seconds (default CLOSE_WAIT_S). -> count."""
        wait = self.CLOSE_WAIT_S if wait is None else wait
        n = 0
        for conn in list(self._conns.values()):
            if conn.start_closing(code, reason):
                conn.jobs.add(gevent.spawn_later(wait, conn.wire.abort))
                n += 1
        return n

    def _each_connection(self, send: Callable[[WsWire], None]) -> int:
        """``send(wire)`` on every live connection; -> how many it succeeded on."""
        n = 0
        for conn in list(self._conns.values()):
            try:
                send(conn.wire)
                n += 1
            except WireClosed:
                pass
        return n

    def send_raw(self, data: str | bytes, binary: bool = False) -> int:
        """Send one frame to every connection: str (text) or bytes (a text frame with those
        bytes, valid UTF-8 or not, unless ``binary``). -> count of connections sent to."""
        if binary:
            body = data.encode() if isinstance(data, str) else data
            return self._each_connection(lambda wire: wire.send_binary(body))
        return self._each_connection(lambda wire: wire.send_text(data))

    def send_wire(self, data: bytes) -> int:
        """Write ``data`` unchanged to every connection's socket: hand-made frames the wire
        never produces (reserved opcodes, stray continuations, oversize control frames,
        masked server frames). -> count of connections written to."""
        raw = bytes(data)
        return self._each_connection(lambda wire: wire.write_raw(raw))

    def slow_read(self, seconds: float) -> None:
        """For ``seconds``, read what clients send slowly (``SLOW_READ_BYTES`` per
        ``SLOW_READ_PAUSE_S``, ~80 KiB/s): their writes back up into the TCP buffers."""
        self.slow_until = time.monotonic() + seconds

    def send_garbage(self, n: int) -> int:
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

    # ------------------------------------------------------------------ requests by hand
    def _newest_connection(self) -> Peer:
        conns = [c for c in self._conns.values() if not c.closing and not c.wire.dead]
        if not conns:
            raise ConnectionError("no client connected to the upstream simulator")
        return conns[-1]

    def _send_registered(self, conn: Peer, rid: Any, frame: str | bytes,
                         binary: bool = False) -> None:
        """Send a request already in the ledger; on failure take it back, ConnectionError."""
        try:
            if binary:
                conn.wire.send_binary(frame.encode() if isinstance(frame, str) else frame)
            else:
                conn.wire.send_text(frame)
        except WireClosed as e:
            self.ledger.unregister(rid)
            self.send_failures += 1
            raise ConnectionError(f"request {rid!r} not sent: {e}") from None

    def send_request(self, payload: Any = None, id: Any = None) -> Any:
        """Send one conversion request on the newest connection and return its id.

        payload: None -> a realistic one; a JSON-able value -> sent as is; str/bytes -> the
        raw JSON text of the payload (e.g. with NaN). id: None -> the next id; any other
        JSON value is used as is (a reused id replaces the earlier record).
        Raises ConnectionError when no client is connected or the send fails.
        """
        conn = self._newest_connection()
        auto = id is None
        rid = self.ledger.allocate() if auto else id
        if payload is None:
            payload = self.maker.make_payload()
        frame = encode_request(rid, payload)
        if isinstance(payload, (str, bytes, bytearray)):
            try:
                payload = orjson.loads(payload)
            except orjson.JSONDecodeError:
                payload = None   # nothing to compare a reply with
        expected = Template.of(payload) or payload
        self.ledger.register(rid, expected, conn.number, time.monotonic(), auto)
        self._send_registered(conn, rid, frame)
        return rid

    def send_raw_request(self, frame: str | bytes, id: Any, binary: bool = False) -> Any:
        """Send a hand-made request ``frame`` (str or bytes, sent as is, as a text frame
        unless ``binary``) on the newest connection and expect exactly one reply to ``id``,
        which the frame is supposed to carry: for hostile requests whose envelope, not only
        the payload, is crafted. Replies are checked and counted as for ``send_request``
        (``duplicates``, ``unanswered``); raises ConnectionError the same way. -> ``id``."""
        conn = self._newest_connection()
        self.ledger.register(id, None, conn.number, time.monotonic(), False)
        self._send_registered(conn, id, frame, binary)
        return id

    def make_payload(self) -> dict:
        """A realistic request payload (the recorded shape and ranges)."""
        return self.maker.make_payload()

    # ------------------------------------------------------------------ observations
    def connected(self) -> int:
        """Clients connected now."""
        return len(self._conns)

    def wait_until(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Wait (gevent-friendly) until predicate() is true; -> its last value. The
        predicate runs after every batch of frames read: keep it cheap (counters, not
        ``report()``)."""
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

    def wait_for_connections(self, n: int, timeout: float) -> bool:
        """Wait until at least n connections have been accepted so far (not: are live)."""
        return bool(self.wait_until(lambda: self.connections >= n, timeout))

    def wait_for_reply(self, id: Any, timeout: float) -> dict | None:
        """The first parsed reply (valid or not) whose id is ``id``, or None on timeout
        (only the last ``keep_replies`` replies can be found)."""
        return self.wait_until(lambda: self.judge.replies_by_id.get(id), timeout)

    def client_heartbeats(self) -> list[float]:
        """time.monotonic() stamps of the last ``Heartbeats.RECENT`` client heartbeats, all
        connections, in order (``report()["client_heartbeats"]`` counts them all)."""
        return list(self.heartbeats.recent)

    def client_closes(self) -> list[tuple]:
        """(code or None, reason) of the close frames clients sent, in order (the first
        ``MAX_CLIENT_CLOSES``; ``client_close_count`` counts them all)."""
        return list(self._closes.first)

    def sent_on(self, id: Any) -> int | None:
        """Number (1 = first accepted) of the connection request ``id`` was sent on (None
        if unknown, or an automatic id older than the ledger's window)."""
        return self.ledger.sent_on(id)

    @property
    def requests_sent(self) -> int:
        return self.ledger.sent

    @property
    def unanswered(self) -> int:
        """Requests sent and not answered yet (a cheap counter)."""
        return self.ledger.unanswered

    @property
    def replies(self) -> int:
        return self.judge.replies

    def problems(self) -> list[str]:
        return list(self.judge.problems)

    def report(self) -> dict:
        """The score so far, as JSON-able numbers. Cheap: counters, and percentiles of a
        fixed-size latency sample (sorted at most once per change)."""
        judge, ledger, latencies = self.judge, self.ledger, self.judge.latencies_ms
        now = time.monotonic()
        gap = self.heartbeats.max_gap([c.beats for c in self._conns.values()], now)
        return {
            "connections": self.connections,
            "connected": len(self._conns),
            "max_connected": self.max_connected,
            "requests": ledger.sent,
            "replies": judge.replies,
            "ok": judge.ok,
            "error_replies": judge.error_replies,
            "unanswered": ledger.unanswered,
            # of which sent on a connection that has ended since: a request written just
            # before a drop may never have reached the client
            "unanswered_on_ended_connections": ledger.pending_on_other_connections(self._conns),
            "given_up": ledger.given_up,
            "duplicates": judge.duplicates,
            "invalid": judge.invalid,
            "problems": list(judge.problems),
            "redelivered": judge.redelivered,
            "send_failures": self.send_failures,
            "garbage_sent": self.garbage_sent,
            "error_reasons": dict(judge.error_reasons),
            "latency_p50_ms": _rounded(latencies.percentile(50), 3),
            "latency_p99_ms": _rounded(latencies.percentile(99), 3),
            "latency_max_ms": _rounded(latencies.max, 3),
            "latency_samples": len(latencies),
            "server_heartbeats": self.server_heartbeats,
            "client_heartbeats": self.heartbeats.count,
            "client_heartbeat_max_gap_s": _rounded(gap, 3),
            "client_closes": list(self._closes.first),
            "elapsed_s": round(now - self._started_at, 3) if self._started_at else 0.0,
        }

    # ------------------------------------------------------------------ per connection
    def _app(self, environ: dict, start_response: Callable) -> list:
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("426 Upgrade Required", [("Content-Type", "text/plain")])
            return [b"a WebSocket upgrade is required\n"]
        assert self._shared is not None, "a connection before start()"
        self.connections += 1
        peer = Peer(self._shared, self.connections, WsWire(ws), environ.get("REMOTE_ADDR"))
        self._conns[peer.number] = peer
        self.max_connected = max(self.max_connected, len(self._conns))
        log.debug("upstream: connection %d opened from %s", peer.number, peer.address)
        self.notify()
        try:
            peer.serve()
        finally:
            del self._conns[peer.number]
            self.heartbeats.ended(peer.beats)
            log.debug("upstream: connection %d ended", peer.number)
            self.notify()
        return []

    def record_client_close(self, code: int | None, reason: str) -> None:
        """A client sent a close frame with ``code`` (None: no status) and ``reason``."""
        self._closes.record(code, reason)

    def notify(self) -> None:
        """Wake ``wait_until`` callers: something they may wait for changed."""
        if self._waiting:
            changed, self._changed = self._changed, gevent.event.Event()
            changed.set()


def _rounded(value: float | None, places: int) -> float | None:
    return None if value is None else round(value, places)
