"""One client connection of the simulated upstream: its reader and its background jobs.

A ``Peer`` lives as long as its connection. ``serve()`` runs the reader in the calling
greenlet (gevent-websocket's handler) and the background jobs (heartbeats, automatic
requests) in a ``Group`` it kills when the connection ends. It is given the parts of
its server it needs (``shared.Shared``: settings, fault switches, ledger, judge, counters),
never the server itself, so the server is the one module that knows both.
"""

import logging
import random
import time

import gevent
import gevent.pool

from .. import ws
from .judging import HEARTBEAT_FRAME, describe
from .samples import BeatClock
from .shared import Shared
from .traffic import HEARTBEAT, Pacer, encode_auto_requests
from .wire import WireClosed, WsWire

log = logging.getLogger("exrate_green.simulator")

__all__ = ["Peer"]


class Peer:
    """One client connection: number (1 = first accepted), wire, heartbeat clock, jobs."""

    MAX_BATCH = 256      # most requests written in one go by a request job catching up
    #: a slow-read fault reads at most this many bytes per pause
    SLOW_READ_BYTES, SLOW_READ_PAUSE_S = 4096, 0.05

    def __init__(self, shared: Shared, number: int, wire: WsWire, address: str | None):
        self.shared = shared
        self.number = number
        self.wire = wire
        self.address = address
        self.beats = BeatClock(time.monotonic())
        self.closing = False                # we sent a close frame, or answered the client's
        self.jobs = gevent.pool.Group()     # background greenlets, killed when it ends

    def serve(self) -> None:
        """Start the jobs and read until the connection ends; then end everything."""
        try:
            settings = self.shared.settings
            if settings.heartbeat_interval_s is not None:
                self.jobs.spawn(self.heartbeat_job)
            if settings.request_rate > 0:
                self.jobs.spawn(self.request_job)
            self.read_job()
        finally:
            self.jobs.kill(block=True, timeout=1)
            self.wire.abort()
            self.wire.detach()

    def heartbeat_job(self) -> None:
        """A heartbeat now and every ``heartbeat_interval_s``, on a drift-free schedule."""
        switches, counters = self.shared.switches, self.shared.counters
        interval = self.shared.settings.heartbeat_interval_s
        if interval is None:   # heartbeats disabled: serve() does not start this job
            return
        due = time.monotonic()
        while True:
            if not switches.heartbeats_paused:
                try:
                    self.wire.send_text(HEARTBEAT)
                except WireClosed:
                    return
                counters.server_heartbeats += 1
            due += interval
            now = time.monotonic()
            if now - due > interval:   # fell a whole tick behind: resume from now, no burst
                due = now
            gevent.sleep(max(0.0, due - now))

    def request_job(self) -> None:
        """Automatic requests at ``request_rate`` per second, in batches when behind."""
        settings, switches = self.shared.settings, self.shared.switches
        seed = settings.seed
        rng = random.Random(None if seed is None else f"{seed}/timing/{self.number}")
        pacer = Pacer(settings.request_rate, settings.poisson, rng, time.monotonic())
        while True:
            gevent.sleep(max(0.0, pacer.due - time.monotonic()))   # sleep(0) still yields
            n = pacer.take(time.monotonic(), self.MAX_BATCH)
            if switches.requests_paused:
                continue
            if settings.max_requests is not None:   # a cap on all connections together
                n = min(n, settings.max_requests - self.shared.counters.auto_requests)
                if n <= 0:
                    return
            if n and not self.send_auto_requests(n):
                return

    def send_auto_requests(self, n: int) -> bool:
        """``n`` automatic requests in one write; False when the connection is gone."""
        ledger, counters = self.shared.ledger, self.shared.counters
        templates = self.shared.maker.next_templates(n)
        ids = ledger.allocate_many(n)
        frames = encode_auto_requests(ids, templates)
        ledger.register_many(ids, templates, self.number, time.monotonic())
        try:
            self.wire.send_texts(frames)
        except WireClosed:
            for rid in ids:
                ledger.unregister(rid)
            counters.send_failures += n
            return False
        counters.auto_requests += n
        return True

    def read_job(self) -> None:
        """Judge every message the client sends until it closes, breaks the protocol or
        the socket ends."""
        shared, wire, judge = self.shared, self.wire, self.shared.judge
        while True:
            if shared.switches.reading_slowly(time.monotonic()):
                gevent.sleep(self.SLOW_READ_PAUSE_S)
                events = wire.recv_batch(self.SLOW_READ_BYTES)
            else:
                events = wire.recv_batch()
            if events is None:
                return
            t, wall = time.monotonic(), time.time()   # when this batch arrived
            for kind, value in events:
                try:
                    if kind == "text":
                        if judge.on_text(self.number, value, t, wall) == HEARTBEAT_FRAME:
                            shared.heartbeats.beat(self.beats, t)
                    elif kind == "binary":
                        judge.on_binary(value)
                    elif kind == "oversize":
                        judge.problem(f"message of {value} bytes, over the simulator's limit")
                    elif kind == "close":
                        self.on_client_close(value)
                    else:
                        self.on_violation(value)
                except Exception as e:  # a simulator bug must not end the connection
                    log.exception("upstream: error handling a frame")
                    judge.problem(f"simulator error on frame {describe(value)!r}: {e!r}")
            shared.changed()

    def start_closing(self, code: int | None, reason: str) -> bool:
        """Send our close frame (``code=None``: no status), unless one was already sent or
        answered (never two); -> whether it was sent now."""
        if self.closing:
            return False
        self.closing = True
        try:
            self.wire.send_close(code, reason)
        except WireClosed:
            return False
        return True

    def on_client_close(self, close: ws.Close) -> None:
        """Record the client's close frame and, if it started the closing handshake,
        answer it (once: never a close after ours)."""
        code = None if close.code == ws.CLOSE_NO_STATUS else close.code
        self.shared.closes.record(code, close.reason)
        self.start_closing(code if code is not None else ws.CLOSE_NORMAL, "")

    def on_violation(self, violation: ws.Violation) -> None:
        """The client broke RFC 6455: a problem; fail the connection with its close code."""
        self.shared.judge.problem(f"protocol violation by the client: {violation.reason}")
        self.start_closing(violation.code, violation.reason)
