"""The metrics port's defences: it may be exposed, and it must never cost the service.

- **Connections**: at most ``max_connections`` at once (a gevent ``Pool``: when it is full
  the server stops accepting and the kernel's small backlog holds the rest, costing this
  process no descriptor).
- **Slow and idle clients**: a request's head (request line and headers) must arrive
  within ``idle_timeout_s`` however slowly it trickles, and every read or write waits at
  most that long; a keep-alive connection idle that long is closed.
- **Floods**: ``requests_per_s`` requests are answered per second, in a burst of twice that;
  past it a request waits its turn on its own connection (the pool bounds how many wait),
  so a flood costs a bounded share of a core and the hub stays free for the service.
- **Malformed requests**: answered 400, counted, logged at most once a minute with the
  count: never a traceback, never a line per request.
- **File descriptors**: ``raise_fd_limit`` lifts the soft ``RLIMIT_NOFILE`` to the hard
  limit at start; the server accepts only while ``fd_reserve`` descriptors stay free for
  the service's own work (rate fetches, Redis, the disk cache), and pauses accepting for a
  second when accept itself fails (EMFILE) instead of logging a traceback per attempt.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import time
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from .ratelimit import RateLimitedLog

log = logging.getLogger("exrate_green.metrics")

#: accept errors that mean "out of resources for now", not "the listener is broken"
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: seconds accepting pauses after running short of descriptors
PAUSE_S = 1.0
#: the kernel's queue of connections not yet accepted (they cost us no descriptor)
BACKLOG = 16


def bind_metrics_port(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``"0.0.0.0"``: every IPv4 interface; a
    name is resolved). Raises ``OSError`` (port taken, no permission, unknown host)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or "0.0.0.0", port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def raise_fd_limit(ceiling: int = 1 << 20) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (at most ``ceiling``); returns
    the soft limit in force. A limit that cannot be raised is left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(ceiling if hard == resource.RLIM_INFINITY else hard, ceiling)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("file descriptor limit raised from %d to %d", soft, target)
            return target
        except (ValueError, OSError) as e:
            log.info("file descriptor limit stays %d (%s)", soft, e)
    return soft


def fd_reserve(soft_limit: int | None = None) -> int:
    """Descriptors the metrics port leaves for the service: a quarter of the soft limit,
    at least 64."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(64, soft_limit // 4)


def open_fds() -> int | None:
    """Descriptors open in this process now (Linux ``/proc``), else None."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class RequestBudget:
    """A token bucket: ``rate`` requests a second, bursts of ``2 * rate``; ``wait()``
    sleeps (yielding to the hub) until the caller's turn."""

    def __init__(self, rate: float, clock: Any = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = 2.0 * self.rate
        self.clock = clock
        self.tokens = self.burst
        self.updated = clock()
        self.waits = 0  # requests that had to wait (tests, docs)

    def wait(self) -> None:
        while True:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            self.waits += 1
            gevent.sleep((1.0 - self.tokens) / self.rate)


class GuardedServer(WSGIServer):
    """``WSGIServer`` with the bounds of this module (see its docstring)."""

    def __init__(self, listener: Any, application: Any, *, max_connections: int = 32,
                 idle_timeout_s: float = 10.0, requests_per_s: float = 20.0,
                 handler_class: type[WSGIHandler] | None = None) -> None:
        self.malformed = RateLimitedLog(
            log, what="malformed requests on the metrics port answered 400")
        self.accept_failures = RateLimitedLog(
            log, what=f"metrics port: accept failed, pausing {PAUSE_S:g} s")
        self.fd_pauses = RateLimitedLog(
            log, what="metrics port: paused accepting to keep file descriptors for the "
                      "service")
        # log=None: a scrape every few seconds must not become a log line each time.
        super().__init__(listener, application, spawn=Pool(max_connections), log=None,
                         error_log=_ErrorLog(self.malformed),
                         handler_class=handler_class or GuardedHandler)
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.budget = RequestBudget(requests_per_s)
        self.fd_reserve = fd_reserve()
        self._pause_timer: Any = None

    def do_read(self) -> Any:
        """Accept one connection, unless descriptors run short: then pause accepting."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        in_use = open_fds()
        if in_use is not None and in_use + self.fd_reserve >= soft:
            self.fd_pauses.hit(f"{in_use} of {soft} descriptors in use")
            self._pause()
            return None
        try:
            return super().do_read()
        except OSError as e:
            if e.errno not in _RESOURCE_ERRORS:
                raise
            self.accept_failures.hit(os.strerror(e.errno or 0))
            self._pause()
            return None

    def handle(self, sock: Any, address: Any) -> None:
        sock.settimeout(self.idle_timeout_s)  # every read and write, once the head is in
        super().handle(sock, address)

    def _pause(self) -> None:
        self.stop_accepting()
        self._pause_timer = self.loop.timer(PAUSE_S)
        self._pause_timer.start(self._start_accepting_if_started)


class GuardedHandler(WSGIHandler):
    """pywsgi's handler with a deadline on the request head, the request budget, and
    malformed requests counted instead of printed."""

    server: GuardedServer
    _head_timer: Any = None

    def read_requestline(self) -> str:
        # the whole head (this line and the headers) within idle_timeout_s
        self._head_timer = gevent.Timeout.start_new(
            self.server.idle_timeout_s, TimeoutError("request head too slow"))
        return super().read_requestline()

    def read_request(self, raw_requestline: str) -> Any:
        try:
            return super().read_request(raw_requestline)
        finally:
            self._cancel_head_timer()

    def handle_one_request(self) -> Any:
        try:
            return super().handle_one_request()
        finally:
            self._cancel_head_timer()

    def run_application(self) -> None:
        self.server.budget.wait()
        super().run_application()

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes]:
        self.server.malformed.hit(f"{type(ex).__name__}: {str(ex)[:120]}")
        return super()._handle_client_error(ValueError())

    def log_error(self, msg: str, *args: Any) -> None:
        pass  # counted by _handle_client_error; pywsgi would write one line per request

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.close()
            self._head_timer = None


class _ErrorLog:
    """pywsgi's ``error_log`` (and ``wsgi.errors``): counted, rate-limited, one line."""

    def __init__(self, limited: RateLimitedLog) -> None:
        self.limited = limited

    def write(self, text: str) -> None:
        if text.strip():
            self.limited.hit(text.strip().splitlines()[-1][:200])

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass
