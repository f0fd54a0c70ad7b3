"""The supervisor: one connection at a time, its greenlets, reconnects and shutdown.

``Service`` lives as long as the process and owns what outlives a connection: the rate
book, the in-flight conversions waiting for a rate, replies a dropped connection could
not take, counters. ``Session`` lives as long as one connection and owns its three
greenlets (``receive_loop``, ``heartbeat``, ``heartbeat_timeout_checker``) in one
``Group``, killed when the connection ends.
"""

import bisect
import collections
import datetime
import logging
import os
import random
import time

import gevent
from gevent import monkey
from gevent.event import AsyncResult, Event
from gevent.pool import Group, Pool

from . import protocol
from .connection import Connection
from .errors import ConnectionClosed, ProtocolError, RateError

log = logging.getLogger("exrate_green.service")
messages_log = logging.getLogger("exrate_green.messages")
_UTC = datetime.timezone.utc
_MAX_SAMPLES = 20_000  # latency samples kept per summary interval (sorted in ~3 ms)
#: upper bounds (seconds) of the reply latency histogram's buckets; one more counts the rest
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                     5.0, 10.0)


class Stats:
    """Counters since start, and latency samples (seconds) since the last summary."""

    def __init__(self):
        self.requests = self.replies = self.errors = self.skipped = 0
        self.connects = self.reconnects = self.redelivered = self.dropped = 0
        self.connect_attempts = self.connect_failures = 0
        self.heartbeats_sent = self.heartbeats_received = 0
        self.errors_by_kind = collections.Counter()  # error replies by ``ExrateError.kind``
        self.latencies_s = []
        self._recorded = 0  # replies recorded since the last summary
        # Since start, for the metrics' histogram: replies per LATENCY_BUCKETS_S bucket
        # (not cumulative: the scrape adds them up) and the sum of their latencies.
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0

    def error(self, kind):
        """Count one error reply of ``kind`` (an ``ExrateError.kind``, e.g. ``"invalid_request"``)."""
        self.errors += 1
        self.errors_by_kind[kind] += 1

    def record(self, latency_s, count=1):
        """Latency of ``count`` replies. Past ``_MAX_SAMPLES`` a sample replaces a random
        one (reservoir sampling), so the summary covers the whole interval at any rate and
        sorting it on the hub stays cheap."""
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += count
        self.latency_sum_s += latency_s * count
        samples = self.latencies_s
        self._recorded += count
        room = _MAX_SAMPLES - len(samples)
        if room > 0:
            samples.extend([latency_s] * min(count, room))
            return
        # Each reply would replace a random slot with probability _MAX_SAMPLES/seen
        # (Algorithm R): draw how many do, per batch rather than per reply (hot path).
        expected = count * _MAX_SAMPLES / self._recorded
        replaced = int(expected) + (random.random() < expected % 1)
        for _ in range(min(replaced, count)):
            samples[random.randrange(_MAX_SAMPLES)] = latency_s

    def take_latencies(self):
        samples, self.latencies_s, self._recorded = self.latencies_s, [], 0
        return samples


def percentile(samples, fraction):
    """The ``fraction`` quantile of ``samples`` (nearest rank), or None when empty."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def backoff_delay_s(failures, cap_s, rng=random):
    """Seconds to wait before the next attempt after ``failures`` consecutive failures.

    The first retry is immediate; then 0.25 s doubling up to ``cap_s``, each with jitter
    (50-100 % of the step) so a fleet of clients does not reconnect in lockstep.
    """
    if failures <= 1:
        return 0.0
    step = min(cap_s, 0.25 * 2 ** (failures - 2))
    return step * rng.uniform(0.5, 1.0)


class Service:
    """Keeps one connection to the upstream and answers its requests until ``stop()``."""

    def __init__(self, settings, book, *, clock=time.monotonic):
        self.settings = settings
        self.book = book
        self.clock = clock
        self.stats = Stats()
        self.session = None
        self.stopping = False
        self.stopped = Event()
        self._wake = Event()  # cuts a backoff sleep short on stop()
        self.waiting = Pool(settings.max_in_flight)  # conversions waiting for a rate table
        self.undelivered = collections.deque()  # (when, reply bytes) caught by a drop
        self.jobs = Group()  # service-lifetime background jobs
        self.show_messages = settings.show_messages
        self.progress = {}  # job name -> clock() of its last turn, for the stall watchdog
        self.last_disconnect = None  # why the last connection (or connect) ended, for /healthz

    # -- the supervisor ------------------------------------------------------------------

    def run(self):
        """Connect, serve, reconnect until ``stop()``; returns the process exit code."""
        self.jobs.spawn(self.summary)
        start_stall_watchdog(self, self.settings.stall_exit_s)
        failures = 0
        try:
            while not self.stopping:
                delay_s = backoff_delay_s(failures, self.settings.reconnect_max_delay_s)
                if delay_s:
                    log.info("reconnecting in %.2f s (attempt %d)", delay_s, failures + 1)
                    self._wake.wait(delay_s)
                    if self.stopping:
                        break
                self.stats.connect_attempts += 1
                try:
                    conn = Connection.open(
                        self.settings.url, timeout_s=self.settings.http_connect_timeout_s + 3,
                        ca_file=self.settings.ca_file,
                        max_frame_bytes=self.settings.max_frame_bytes)
                except ConnectionClosed as e:
                    failures += 1
                    self.stats.connect_failures += 1
                    self.last_disconnect = f"connect failed: {e.cause}"
                    log.warning("connect failed (%d in a row): %s", failures, e.cause)
                    continue
                failures = self._serve(conn, failures)
            self.stopped.wait(self.settings.shutdown_grace_s + 5)
            return 0
        finally:
            self.jobs.kill(timeout=1)

    def _serve(self, conn, failures):
        if self.stopping:  # stop() came while we were connecting
            conn.close(1000, "shutting down")
            return failures
        self.stats.connects += 1
        log.info("connected to %s (connection %d)", self.settings.url, self.stats.connects)
        session = self.session = Session(self, conn)
        try:
            cause = session.run()
        finally:
            self.session = None
        self.last_disconnect = cause
        if self.stopping:
            log.info("disconnected: %s", cause)
            return failures
        self.stats.reconnects += 1
        log.warning("disconnected: %s; reconnecting", cause)
        if conn.violation is not None:  # the upstream broke RFC 6455: retry at once, no growth
            return 0 if session.heartbeats_received else min(failures, 1)
        return 0 if session.heartbeats_received else failures + 1

    def stop(self):
        """Graceful stop: no more reading; in-flight conversions get ``shutdown_grace_s``
        seconds to finish and send their replies; then a close frame. Idempotent."""
        if self.stopping:
            return
        self.stopping = True
        self._wake.set()
        grace_s = self.settings.shutdown_grace_s
        log.info("stopping: %d conversion(s) in flight, grace %.1f s", len(self.waiting), grace_s)
        try:
            session = self.session
            if session is not None:
                session.stop_reading()
            if not self.waiting.join(timeout=grace_s):
                lost = len(self.waiting)
                self.waiting.kill(timeout=1)
                self.stats.dropped += lost
                log.warning("grace period over: %d conversion(s) abandoned", lost)
            session = self.session
            if session is not None:
                self.redeliver(session)
                session.close()
            if self.undelivered:
                self.stats.dropped += len(self.undelivered)
                log.warning("%d reply(ies) dropped: no connection at shutdown", len(self.undelivered))
                self.undelivered.clear()
        finally:
            self.stopped.set()

    # -- serving requests (the hot path runs inside the receive loop) --------------------

    def handle(self, events, session):
        """Answer a batch of incoming frames; requests with a hot rate are answered inline."""
        now = datetime.datetime.now(_UTC)
        today, stamp, started = now.date(), protocol.timestamp(now), self.clock()
        replies = []
        for kind, data in events:
            if kind != "text":
                self._refuse_frame(kind, data, today, replies)
                continue
            if self.show_messages:
                messages_log.info("recv %s", protocol.shown(data))
            try:
                request = protocol.parse(data, today)
                if request is None:
                    session.on_heartbeat()
                    continue
                self.stats.requests += 1
                table = self.book.peek(request.day, request.currency)
                if table is None:
                    if self.waiting.full():
                        replies = self._wait_for_room(replies, started, session)
                    self.waiting.spawn(self.convert_later, request, started)
                    continue
                replies.append(self.answer(request, table, stamp))
            except ProtocolError as e:
                if e.request_id is None:
                    self._skip(f"{e.reason}: {protocol.excerpt(data)}")
                else:
                    self.stats.requests += 1  # a request, if a bad one: it gets a reply
                    self.stats.error(e.kind)
                    replies.append(protocol.error_reply(e.request_id, e.reason))
            except Exception:  # a bug must cost one message, never the connection
                self.stats.skipped += 1
                log.exception("could not serve a message: %s", protocol.excerpt(data))
        if replies:
            self._flush(replies, started)

    def _wait_for_room(self, replies, started, session):
        """Back-pressure: the reader stops until a waiting conversion finishes. Replies
        already made are sent first, and the watchdog does not count the pause as
        upstream silence (its heartbeats wait unread in our socket): silence counts again
        from when reading resumes."""
        if replies:
            replies = self._flush(replies, started)
        session.reading = False
        try:
            self.waiting.wait_available()
        finally:
            session.reading = True
            session.last_heartbeat_at = max(session.last_heartbeat_at, self.clock())
        return replies

    def _flush(self, replies, started):
        self.deliver(replies)
        self.stats.record(self.clock() - started, len(replies))
        return []

    def answer(self, request, table, stamp):
        """The reply to ``request`` from ``table``: converted, or an error reply."""
        try:
            stake_eur = protocol.convert(request.stake, table.rate(request.currency))
            return protocol.reply(request, stake_eur, stamp)
        except (RateError, ProtocolError) as e:
            self.stats.error(e.kind)
            return protocol.error_reply(request.id, getattr(e, "reason", None) or str(e))

    def convert_later(self, request, received_at):
        """A request whose table is not in memory: wait for it, off the receive loop."""
        try:
            table = self.book.get(request.day, request.currency)
            reply = self.answer(request, table, protocol.timestamp(datetime.datetime.now(_UTC)))
        except RateError as e:
            self.stats.error(e.kind)
            reply = protocol.error_reply(request.id, str(e))
        except Exception:  # a bug must still leave the request answered
            log.exception("converting request %r failed", request.id)
            self.stats.error("internal")
            reply = protocol.error_reply(request.id, "internal error")
        self.deliver([reply])
        self.stats.record(self.clock() - received_at)

    def deliver(self, replies):
        """Send replies on the current connection, or keep them for the next one."""
        session = self.session
        if session is not None and not session.conn.closed:
            try:
                session.conn.send(replies)
                self._sent(replies)
                return
            except ConnectionClosed as e:
                session.end(e.cause)
            except BaseException:  # killed mid-send (shutdown): keep them, then go
                self._keep(replies)
                raise
        self._keep(replies)

    def redeliver(self, session):
        """Send replies a dropped connection could not take; drop those too old."""
        if not self.undelivered:
            return
        oldest_allowed = self.clock() - self.settings.redelivery_window_s
        kept = [(when, reply) for when, reply in self.undelivered if when >= oldest_allowed]
        self._drop(len(self.undelivered) - len(kept))
        self.undelivered.clear()
        if not kept:
            return
        try:
            session.conn.send([reply for _, reply in kept])
        except BaseException:
            self.undelivered.extend(kept)
            raise
        self.stats.redelivered += len(kept)
        self._sent([reply for _, reply in kept])
        log.info("redelivered %d reply(ies) kept from the last connection", len(kept))

    def _keep(self, replies):
        now = self.clock()
        self.undelivered.extend((now, reply) for reply in replies)

    def _sent(self, replies):
        self.stats.replies += len(replies)
        if self.show_messages:
            for reply in replies:
                messages_log.info("send %s", reply.decode())

    def _drop(self, count):
        if count:
            self.stats.dropped += count
            log.warning("dropped %d reply(ies): no connection within %.0f s",
                        count, self.settings.redelivery_window_s)

    def _refuse_frame(self, kind, data, today, replies):
        """Binary and oversize frames are never served; a binary one with an id is answered."""
        request_id = None
        if kind == "binary":
            try:
                request = protocol.parse(data, today)
                request_id = request.id if request is not None else None
            except ProtocolError as e:
                request_id = e.request_id
        if request_id is None:
            size = data if kind == "oversize" else len(data)
            self._skip(f"{kind} frame of {size} bytes")
            return
        self.stats.requests += 1  # a request, if in the wrong frame type: it gets a reply
        self.stats.error("invalid_request")
        replies.append(protocol.error_reply(
            request_id, "binary frames are not supported: send the request as a text frame"))

    def _skip(self, what):
        self.stats.skipped += 1
        log.warning("skipped a message without an id: %s", what)

    # -- background jobs -----------------------------------------------------------------

    def summary(self):
        """Every ``summary_interval_s``: one line of counters and latency percentiles."""
        while True:
            gevent.sleep(self.settings.summary_interval_s)
            if not self.session and self.undelivered:
                oldest_allowed = self.clock() - self.settings.redelivery_window_s
                expired = sum(1 for when, _ in self.undelivered if when < oldest_allowed)
                for _ in range(expired):
                    self.undelivered.popleft()
                self._drop(expired)
            log.info("summary: %s", self.summary_line())

    def summary_line(self):
        s, samples = self.stats, self.stats.take_latencies()
        cache = getattr(self.book.cache, "hits", 0), getattr(self.book.cache, "misses", 0)
        return (f"requests={s.requests} replies={s.replies} errors={s.errors} "
                f"skipped={s.skipped} p50_ms={_ms(percentile(samples, 0.5))} "
                f"p99_ms={_ms(percentile(samples, 0.99))} connect_attempts={s.connect_attempts} "
                f"connect_failures={s.connect_failures} connects={s.connects} "
                f"reconnects={s.reconnects} redelivered={s.redelivered} dropped={s.dropped} "
                f"in_flight={len(self.waiting)} memory_hits={self.book.memory_hits} "
                f"cache_hits={cache[0]} cache_misses={cache[1]} rate_api_calls={self.book.api_calls}")


def _ms(seconds):
    """Seconds as milliseconds for the summary; ``-`` when there is no figure."""
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


class Session:
    """One connection: its reader, heartbeat sender and watchdog, in one ``Group``."""

    def __init__(self, service, conn):
        self.service = service
        self.conn = conn
        self.settings = service.settings
        self.clock = service.clock
        self.last_heartbeat_at = self.clock()  # the watchdog counts from the open
        self.heartbeats_received = 0
        self.reading = True  # False while back-pressure holds the reader
        self.greenlets = Group()
        self.ended = AsyncResult()
        self.reader = self.watchdog = None

    def run(self):
        """Serve until the connection ends; returns why it ended."""
        self.service.progress = {"receive_loop": self.clock(), "heartbeat": self.clock()}
        try:
            self.greenlets.spawn(self._job, self.heartbeat)
            self.watchdog = self.greenlets.spawn(self._job, self.heartbeat_timeout_checker)
            self.reader = self.greenlets.spawn(self._job, self.receive_loop)
            return self.ended.get()
        finally:
            self.service.progress = {}
            self.conn.abort()
            self.greenlets.kill(timeout=1)

    def end(self, cause):
        """End the session: abort the socket now, so no reply is written to a connection
        being abandoned (it is kept for the next one instead)."""
        self.conn.abort()
        if not self.ended.ready():
            self.ended.set(cause)

    def stop_reading(self):
        """For shutdown: no more requests are read; heartbeats keep the link alive."""
        self.service.progress.pop("receive_loop", None)
        for greenlet in (self.reader, self.watchdog):
            if greenlet is not None:
                greenlet.kill(timeout=1)

    def close(self):
        """Send a close frame (1000), wait briefly for the answer, end the session."""
        self.greenlets.kill(timeout=1)  # nothing may follow our close frame, heartbeats included
        self.conn.close(1000, "shutting down")
        self.end("closed by us: shutting down")

    def _job(self, loop):
        try:
            loop()
        except ConnectionClosed as e:
            self.end(e.cause)
        except gevent.GreenletExit:
            raise
        except Exception:
            log.exception("%s failed", loop.__name__)
            self.end(f"internal error in {loop.__name__}")

    def receive_loop(self):
        self.service.redeliver(self)
        progress = self.service.progress
        while True:
            progress["receive_loop"] = self.clock()
            events = self.conn.receive()
            self.service.handle(events, self)
            # Under load recv never blocks: let heartbeats and timers run. Not sleep(0):
            # gevent runs sleep(0) callbacks back to back and looks at its timers only
            # every 50 of them, so with big batches a heartbeat could wait a second.
            gevent.idle()

    def heartbeat(self):
        """Send a heartbeat at once, then every ``heartbeat_interval_s``, without drift."""
        interval_s = self.settings.heartbeat_interval_s
        due = self.clock()
        while True:
            self.service.progress["heartbeat"] = self.clock()
            self.conn.send([protocol.HEARTBEAT])
            self.service.stats.heartbeats_sent += 1
            due += interval_s
            delay_s = due - self.clock()
            if delay_s < 0:  # we fell behind (a stalled hub): restart the schedule, no burst
                due, delay_s = self.clock(), 0
            gevent.sleep(delay_s)

    def heartbeat_timeout_checker(self):
        """End the connection once no heartbeat has come for over ``heartbeat_timeout_s``."""
        timeout_s = self.settings.heartbeat_timeout_s
        while True:
            silent_s = self.clock() - self.last_heartbeat_at
            if silent_s > timeout_s and self.reading:
                raise ConnectionClosed(f"no heartbeat from upstream for {silent_s:.2f} s")
            gevent.sleep(max(timeout_s - silent_s, 0.05) + 0.005)

    def on_heartbeat(self):
        self.last_heartbeat_at = self.clock()
        self.heartbeats_received += 1
        self.service.stats.heartbeats_received += 1


def start_stall_watchdog(service, stall_exit_s, check_every_s=1.0):
    """A native thread that ends the process if a connection's reader or heartbeat sender
    makes no progress for ``stall_exit_s`` seconds (a wedged greenlet or a blocked hub),
    so the platform restarts us. The reader turns at least once per upstream heartbeat.
    A ticker greenlet (one of ``service.jobs``) shows the hub turning between connections
    too, while the supervisor reconnects: a hub blocked then is caught as well.

    It must be a real OS thread: a greenlet would be stuck with the hub it watches. It
    writes straight to the file descriptors: logging's locks are gevent's.
    """
    sleep = monkey.get_original("time", "sleep")
    start_new_thread = monkey.get_original("_thread", "start_new_thread")
    clock = service.clock
    hub_turned = [clock()]

    def tick():
        while True:
            hub_turned[0] = clock()
            gevent.sleep(min(check_every_s, stall_exit_s / 4))

    service.jobs.spawn(tick)

    def watch():
        while not service.stopped.is_set():
            sleep(check_every_s)
            for job, last in [("hub", hub_turned[0]), *service.progress.items()]:
                stalled_s = clock() - last
                if stalled_s > stall_exit_s and not service.stopping:
                    line = (f"CRITICAL exrate_green.service: {job} made no progress for "
                            f"{stalled_s:.1f} s; exiting so the platform restarts us\n")
                    os.write(1, line.encode())
                    os._exit(3)

    start_new_thread(watch, ())
