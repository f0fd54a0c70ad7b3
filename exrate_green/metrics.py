"""Metrics and health, opt-in: ``/metrics`` (Prometheus text) and ``/healthz`` on one port.

Nothing here runs on the hot path. The figures are read when a scrape comes, from the
counters the service, its session, the rate book and the cache keep anyway (a custom
``Collector``); only the reply latency histogram needs an observation per reply batch, and
``service.Stats.record`` keeps it as a few cumulative-bucket counters.

The endpoint is a WSGI app served by ``gevent.pywsgi`` on the service's hub (not
prometheus-client's threaded server): a scrape is a short greenlet reading counters.
``MetricsServer`` belongs to the service's lifetime: ``cli.run`` binds its port before
anything else (a taken port is a configuration error) and stops it when the service ends.
Without ``EXRATE_METRICS_PORT`` nothing listens.

The port may be exposed (``EXRATE_METRICS_HOST``), so it defends itself (``guard.py``):
at most ``max_connections`` at once, an idle timeout, a request budget per second (a
flood of scrapes waits rather than taking the hub), the exposition cached for
``EXPOSITION_TTL_S``, malformed requests counted and logged at most once a minute without
tracebacks, and a reserve of file descriptors it never eats into.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import __version__
from .errors import ERROR_REASONS
from .metrics_guard import GuardedHandler, GuardedServer, bind_metrics_port, raise_fd_limit
from .stats import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from .rates.book import RateBook
    from .rates.lane import ProviderLane
    from .service import Service

__all__ = ["MetricsApp", "MetricsServer", "ServiceCollector", "bind_metrics_port",
           "health_of", "raise_fd_limit"]

log = logging.getLogger("exrate_green.metrics")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

#: circuit-breaker states, exported as one 0/1 series each per provider ("probing": the
#: cool-down is over and one call is let through)
BREAKER_STATES = ("closed", "open", "probing")


class ServiceCollector(Collector):
    """Reads the service's counters at scrape time.

    ``service`` is the running ``Service``: its ``stats`` (read by name: a renamed counter
    is a type error here, never a silently missing series), ``dispatch``, ``delivery``
    and link state; the rate book's lanes and cache tiers are reached through its ``book``.
    """

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        yield from self._traffic()
        yield self._latency()
        yield from self._link()
        yield from self._rates()
        yield from self._cache()

    # -- requests and replies -------------------------------------------------------------

    def _traffic(self) -> Iterator[Metric]:
        stats = self.service.stats
        yield _counter("exrate_requests", "Conversion requests read (bad ones included).",
                       stats.requests)
        yield _counter("exrate_replies", "Replies written to a connection (errors included).",
                       stats.replies)
        errors = CounterMetricFamily(
            "exrate_error_replies", "Error replies, by reason class.", labels=["reason"])
        by_kind = stats.errors_by_kind
        for kind in sorted(set(ERROR_REASONS) | set(by_kind)):  # every reason, 0 included
            errors.add_metric([kind], by_kind.get(kind, 0))
        yield errors
        yield _counter("exrate_skipped_messages", "Messages without an id, logged and skipped.",
                       stats.skipped)
        yield _counter("exrate_redelivered_replies",
                       "Replies kept from a dropped connection and sent on the next one.",
                       stats.redelivered)
        yield _counter("exrate_dropped_replies",
                       "Replies dropped: no connection within the redelivery window, or "
                       "abandoned at shutdown.", stats.dropped)
        yield _counter("exrate_delivered_replies",
                       "Replies whose bytes the upstream's TCP acknowledged.", stats.delivered)
        yield _counter("exrate_possibly_lost_replies",
                       "Replies written but never acknowledged, and not sent again "
                       "(shutdown, or too old).", stats.possibly_lost)
        yield _counter("exrate_backpressure_waits",
                       "Times the reader stopped reading until a waiting conversion or the "
                       "outbox made room.", stats.backpressure_waits)
        yield _gauge("exrate_in_flight", "Conversions waiting for a rate table.",
                     len(self.service.dispatch))
        yield _gauge("exrate_undelivered_replies",
                     "Replies held for the next connection.", len(self.service.delivery.kept))

    def _latency(self) -> Metric:
        """The histogram from ``Stats``' per-bucket counts, made cumulative here."""
        stats = self.service.stats
        buckets, total = [], 0
        for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), stats.latency_counts):
            total += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), total))
        return HistogramMetricFamily(
            "exrate_reply_latency_seconds",
            "Seconds from reading a request to writing its reply.",
            buckets=buckets, sum_value=stats.latency_sum_s)

    # -- the upstream link ----------------------------------------------------------------

    def _link(self) -> Iterator[Metric]:
        stats = self.service.stats
        yield _counter("exrate_connect_attempts", "Connection attempts to the upstream.",
                       stats.connect_attempts)
        yield _counter("exrate_connect_failures",
                       "Connection attempts that failed before the WebSocket opened.",
                       stats.connect_failures)
        yield _counter("exrate_connects", "WebSocket connections opened.", stats.connects)
        yield _counter("exrate_reconnects",
                       "Connections lost while running (each followed by a reconnect).",
                       stats.reconnects)
        yield _counter("exrate_heartbeats_sent", "Heartbeats sent to the upstream.",
                       stats.heartbeats_sent)
        yield _counter("exrate_heartbeats_received", "Heartbeats received from the upstream.",
                       stats.heartbeats_received)
        health = health_of(self.service)
        yield _gauge("exrate_connected", "1 while a connection to the upstream is open.",
                     1 if health["connected"] else 0)
        yield _gauge("exrate_healthy", "1 while /healthz answers 200.",
                     1 if health["healthy"] else 0)
        if health["heartbeat_age_s"] is not None:
            yield _gauge("exrate_heartbeat_age_seconds",
                         "Seconds since the last heartbeat from the upstream on this "
                         "connection (since it opened, before the first one).",
                         health["heartbeat_age_s"])

    # -- rates and cache ------------------------------------------------------------------

    def _rates(self) -> Iterator[Metric]:
        book = self.service.book
        for name, what, documentation in _PROVIDER_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=["provider"])
            for provider, count in _by_provider(book, what):
                family.add_metric([provider], count)
            yield family
        states = GaugeMetricFamily(
            "exrate_circuit_breaker_state",
            "1 for the provider's current circuit-breaker state, 0 for the others.",
            labels=["provider", "state"])
        for provider, state in _breaker_states(book):
            for candidate in BREAKER_STATES:
                states.add_metric([provider, candidate], 1 if state == candidate else 0)
        yield states

    def _cache(self) -> Iterator[Metric]:
        hits = CounterMetricFamily("exrate_cache_hits", "Rate-table lookups answered, by tier.",
                                   labels=["tier"])
        misses = CounterMetricFamily("exrate_cache_misses",
                                     "Rate-table lookups not answered, by tier.", labels=["tier"])
        errors = CounterMetricFamily("exrate_cache_errors",
                                     "Cache operations that failed (counted as misses), by tier.",
                                     labels=["tier"])
        for tier, counts in _tiers(self.service.book):
            for family, key in ((hits, "hits"), (misses, "misses"), (errors, "errors")):
                count = counts.get(key)
                if count is not None:
                    family.add_metric([tier], count)
        yield hits
        yield misses
        yield errors


def _counter(name: str, documentation: str, value: float) -> Metric:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> Metric:
    return GaugeMetricFamily(name, documentation, value=value)


#: (metric, the provider lane's counter, help) for the per-provider counters
_PROVIDER_COUNTERS = (
    ("exrate_rate_api_calls", "attempts", "HTTP requests to a rate API (retries included)."),
    ("exrate_rate_fetches", "fetches", "Table fetches (a day or a month; retries included)."),
    ("exrate_rate_api_failures", "failures", "Table fetches that failed."),
    ("exrate_stale_tables_served", "stale_served",
     "Requests answered from a stale table because its provider failed (stale-if-error)."),
)


def _by_provider(book: RateBook, what: str) -> Iterable[tuple[str, int]]:
    """``(provider, count)`` of the counter ``what`` of each provider's lane."""
    return [(name, _LANE_COUNTERS[what](lane)) for name, lane in book.lanes.items()]


#: the provider lane's counters, read by name (a renamed one is a type error here)
_LANE_COUNTERS: dict[str, Callable[[ProviderLane], int]] = {
    "attempts": lambda lane: lane.attempts,
    "fetches": lambda lane: lane.fetches,
    "failures": lambda lane: lane.failures,
    "stale_served": lambda lane: lane.stale_served,
}


def _breaker_states(book: RateBook) -> Iterable[tuple[str, str]]:
    """``(provider, state)`` for every provider's circuit breaker."""
    return [(name, lane.breaker.state) for name, lane in book.lanes.items()]


def _tiers(book: Any) -> Iterable[tuple[str, Mapping[str, int | None]]]:
    """``(tier, {"hits": n, "misses": n, "errors": n})``: the book's memory front, then each
    tier of its cache (a count it does not keep is missing)."""
    rows: list[tuple[str, Mapping[str, int | None]]] = [
        ("memory", {"hits": getattr(book, "memory_hits", 0)})]
    cache = getattr(book, "cache", None)
    tiers = getattr(cache, "tiers", None)
    if tiers is None and cache is not None:
        tiers = [cache]  # a single disk cache
    for tier in tiers or ():
        rows.append((getattr(tier, "name", "disk"),
                     {key: getattr(tier, key, None) for key in ("hits", "misses", "errors")}))
    return rows


def health_of(service: Service) -> dict[str, Any]:
    """Whether the service is healthy now, and why not.

    Healthy: a connection is open and the upstream has been silent for less than the
    heartbeat timeout, by the same measure the connection's watchdog uses (time we were
    free to read and nothing came; ``Session.silence_s``). A connection on which no
    heartbeat came yet is not healthy (an upstream that went silent before we reconnected
    would otherwise look healthy for a timeout after every reconnect).
    """
    timeout_s = service.settings.heartbeat_timeout_s
    link = service.link_state()
    result: dict[str, Any] = {"healthy": False, "connected": False, "heartbeat_age_s": None,
                              "reason": None}
    if link.stopping:
        result["reason"] = "shutting down"
        return result
    if not link.connected:
        last = link.last_disconnect
        result["reason"] = f"not connected (last: {last})" if last else "not connected yet"
        return result
    result["connected"] = True
    age_s = max(0.0, link.heartbeat_age_s or 0.0)
    silence_s = link.silence_s or 0.0
    result["heartbeat_age_s"] = round(age_s, 3)
    if not link.heartbeats:
        result["reason"] = f"connected, no heartbeat from upstream yet ({age_s:.1f} s)"
    elif silence_s > timeout_s:
        result["reason"] = (f"no heartbeat from upstream for {silence_s:.1f} s "
                            f"(timeout {timeout_s:g} s)")
    else:
        result["healthy"] = True
    return result


class BuildInfoCollector(Collector):
    """``exrate_build_info{version, python}`` = 1: which build a series comes from."""

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("exrate_build_info",
                                 "Always 1; the labels say which build is running.",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


class TierCollector(Collector):
    """``exrate_cache_tier_up{tier}``: 1 while a cache tier works, 0 while it fails (a
    Redis that is down) or is off; what /healthz reports as the tiers' states."""

    def __init__(self, tiers: TierStates) -> None:
        self.tiers = tiers

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("exrate_cache_tier_up",
                               "1 while the cache tier works, 0 while it fails or is off.",
                               labels=["tier"])
        for tier, state in self.tiers.states().items():
            up.add_metric([tier], 1 if state == "ok" else 0)
        yield up


#: seconds a /metrics exposition is served again before it is computed anew: a flood of
#: scrapes costs one exposition per second, whatever its rate
EXPOSITION_TTL_S = 1.0
#: seconds between two active probes of the Redis tier by /healthz
TIER_PROBE_EVERY_S = 5.0


class MetricsApp:
    """The WSGI app: ``/metrics``, ``/healthz``, and 404 for anything else."""

    def __init__(self, service: Service, *, process_metrics: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(service))
        self.registry.register(BuildInfoCollector())
        self._tiers = TierStates(service, clock)
        self.registry.register(TierCollector(self._tiers))
        if process_metrics:  # RSS, CPU seconds, open fds: read from /proc at scrape time
            ProcessCollector(registry=self.registry)
        self.expositions = 0  # how many times the exposition was computed (tests, docs)
        self._exposition = (float("-inf"), b"")

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", b"GET only\n")
        if path == "/metrics":
            return _respond(start_response, "200 OK", self.exposition(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            status, body = self.health()
            return _respond(start_response, status, orjson.dumps(body) + b"\n",
                            "application/json")
        return _respond(start_response, "404 Not Found", b"try /metrics or /healthz\n")

    def exposition(self) -> bytes:
        """The Prometheus text, computed at most once per ``EXPOSITION_TTL_S``."""
        made_at, text = self._exposition
        now = self.clock()
        if now - made_at >= EXPOSITION_TTL_S:
            text = generate_latest(self.registry)
            self._exposition = (now, text)
            self.expositions += 1
        return text

    def health(self) -> tuple[str, dict[str, Any]]:
        """(HTTP status, JSON body): 503 only when the service cannot serve; a failing
        cache tier (Redis down) is ``degraded`` with 200, since memory and disk still
        answer."""
        health = health_of(self.service)
        tiers = self._tiers.states()
        if not health["healthy"]:
            status, word = "503 Service Unavailable", "unavailable"
        else:
            status = "200 OK"
            word = "ok" if all(state == "ok" for state in tiers.values()) else "degraded"
        body = {"status": word, "version": __version__,
                **{k: v for k, v in health.items() if k != "healthy"}, "tiers": tiers}
        return status, body


class TierStates:
    """Each cache tier's state for /healthz: ``ok``, ``degraded`` (failing; the service
    goes on without it) or ``off`` (not available in this process).

    A Redis that was never asked could be dead without anyone knowing: when its state is
    older than ``TIER_PROBE_EVERY_S`` it is probed (one bounded call, through the tier's
    own failure accounting), never more often, whatever the /healthz rate.
    """

    def __init__(self, service: Any, clock: Callable[[], float]) -> None:
        self.service = service
        self.clock = clock
        self._probed_at = float("-inf")

    def states(self) -> dict[str, str]:
        cache = getattr(getattr(self.service, "book", None), "cache", None)
        tiers = getattr(cache, "tiers", None) or ([cache] if cache is not None else [])
        result = {"memory": "ok"}
        for tier in tiers:
            name = getattr(tier, "name", "disk")
            if name == "redis":
                self._maybe_probe(tier)
            enabled = getattr(tier, "enabled", True)
            result[name] = "ok" if enabled else ("degraded" if name == "redis" else "off")
        return result

    def _maybe_probe(self, tier: Any) -> None:
        now = self.clock()
        if now - self._probed_at < TIER_PROBE_EVERY_S:
            return
        self._probed_at = now
        ping = getattr(tier, "ping", None)
        if ping is not None:
            ping()  # the tier's own bounded call: a failure rests it and warns (rate-limited)


def _respond(start_response: StartResponse, status: str, body: bytes,
             content_type: str = "text/plain; charset=utf-8") -> list[bytes]:
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]


class MetricsServer:
    """``MetricsApp`` on ``host:port`` (port 0: any free one), served by gevent.pywsgi
    behind the guards of ``metrics_guard`` (see there for the bounds).

    ``listener``: a socket already bound by ``bind_metrics_port`` (``cli.run`` binds it
    before connecting, so a taken port is refused at once); else the port is bound here.
    """

    def __init__(self, service: Service, port: int, host: str = "0.0.0.0", *,
                 listener: Any = None, max_connections: int = 32,
                 idle_timeout_s: float = 10.0, requests_per_s: float = 20.0) -> None:
        self.app = MetricsApp(service)
        self.server = GuardedServer(
            listener if listener is not None else bind_metrics_port(host, port), self.app,
            max_connections=max_connections, idle_timeout_s=idle_timeout_s,
            requests_per_s=requests_per_s, handler_class=GuardedHandler)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def start(self) -> MetricsServer:
        self.server.start()
        host = self.server.server_host or "0.0.0.0"
        where = " (every interface)" if host in ("0.0.0.0", "::") else ""
        log.info("metrics and health on %s port %d%s: /metrics, /healthz", host, self.port,
                 where)
        return self

    def stop(self, timeout_s: float = 1.0) -> None:
        self.server.stop(timeout=timeout_s)
