"""One client connection of the simulated upstream: its reader and its background jobs.

A ``Peer`` lives as long as its connection. ``serve()`` runs the reader in the calling
greenlet (gevent-websocket's handler) and the background jobs (heartbeats, automatic
requests) in a ``Group`` it kills when the connection ends. It reads the owning
``Upstream``'s settings and fault switches, and adds to its ledger, judge and counters.
"""

import logging
import random
import time
from typing import TYPE_CHECKING

import gevent
import gevent.pool

from .. import ws
from .judging import HEARTBEAT_FRAME, describe
from .samples import BeatClock
from .traffic import HEARTBEAT, Pacer, encode_auto_requests
from .wire import WireClosed, WsWire

if TYPE_CHECKING:
    from .server import Upstream

log = logging.getLogger("exrate_green.simulator")

__all__ = ["Peer"]


class Peer:
    """One client connection: number (1 = first accepted), wire, heartbeat clock, jobs."""

    MAX_BATCH = 256      # most requests written in one go by a request job catching up
    #: a slow-read fault reads at most this many bytes per pause
    SLOW_READ_BYTES, SLOW_READ_PAUSE_S = 4096, 0.05

    def __init__(self, upstream: "Upstream", number: int, wire: WsWire, address: str | None):
        self.up = upstream
        self.number = number
        self.wire = wire
        self.address = address
        self.beats = BeatClock(time.monotonic())
        self.closing = False                # we sent a close frame, or answered the client's
        self.jobs = gevent.pool.Group()     # background greenlets, killed when it ends

    def serve(self) -> None:
        """Start the jobs and read until the connection ends; then end everything."""
        try:
            if self.up.heartbeat_interval_s is not None:
                self.jobs.spawn(self.heartbeat_job)
            if self.up.request_rate > 0:
                self.jobs.spawn(self.request_job)
            self.read_job()
        finally:
            self.jobs.kill(block=True, timeout=1)
            self.wire.abort()
            self.wire.detach()

    def heartbeat_job(self) -> None:
        """A heartbeat now and every ``heartbeat_interval_s``, on a drift-free schedule."""
        up, interval = self.up, self.up.heartbeat_interval_s
        if interval is None:   # heartbeats disabled: serve() does not start this job
            return
        due = time.monotonic()
        while True:
            if not up.heartbeats_paused:
                try:
                    self.wire.send_text(HEARTBEAT)
                except WireClosed:
                    return
                up.server_heartbeats += 1
            due += interval
            now = time.monotonic()
            if now - due > interval:   # fell a whole tick behind: resume from now, no burst
                due = now
            gevent.sleep(max(0.0, due - now))

    def request_job(self) -> None:
        """Automatic requests at ``request_rate`` per second, in batches when behind."""
        up = self.up
        rng = random.Random(None if up.seed is None else f"{up.seed}/timing/{self.number}")
        pacer = Pacer(up.request_rate, up.poisson, rng, time.monotonic())
        while True:
            gevent.sleep(max(0.0, pacer.due - time.monotonic()))   # sleep(0) still yields
            n = pacer.take(time.monotonic(), self.MAX_BATCH)
            if up.requests_paused:
                continue
            if up.max_requests is not None:
                n = min(n, up.max_requests - up.auto_requests)
                if n <= 0:
                    return
            if n and not self.send_auto_requests(n):
                return

    def send_auto_requests(self, n: int) -> bool:
        """``n`` automatic requests in one write; False when the connection is gone."""
        up, ledger = self.up, self.up.ledger
        templates = up.maker.next_templates(n)
        ids = ledger.allocate_many(n)
        frames = encode_auto_requests(ids, templates)
        ledger.register_many(ids, templates, self.number, time.monotonic())
        try:
            self.wire.send_texts(frames)
        except WireClosed:
            for rid in ids:
                ledger.unregister(rid)
            up.send_failures += n
            return False
        up.auto_requests += n
        return True

    def read_job(self) -> None:
        """Judge every message the client sends until it closes, breaks the protocol or
        the socket ends."""
        up, wire, judge = self.up, self.wire, self.up.judge
        while True:
            if up.slow_until and time.monotonic() < up.slow_until:
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
                            up.heartbeats.beat(self.beats, t)
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
            up.notify()

    def on_client_close(self, close: ws.Close) -> None:
        """Record the client's close frame and, if it started the closing handshake,
        answer it (once: never a close after ours)."""
        code = None if close.code == ws.CLOSE_NO_STATUS else close.code
        self.up.record_client_close(code, close.reason)
        if not self.closing:
            self.closing = True
            try:
                self.wire.send_close(code if code is not None else ws.CLOSE_NORMAL, "")
            except WireClosed:
                pass

    def on_violation(self, violation: ws.Violation) -> None:
        """The client broke RFC 6455: a problem; fail the connection with its close code."""
        self.up.judge.problem(f"protocol violation by the client: {violation.reason}")
        if not self.closing:
            self.closing = True
            try:
                self.wire.send_close(violation.code, violation.reason)
            except WireClosed:
                pass
