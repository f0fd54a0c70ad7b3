"""``exrate-service demo``: the whole job on loopback, offline, with a summary at the end.

The bundled currency-assignment simulator plays the upstream and a fake rate API plays
Frankfurter and exchangerate.host (from the bundled ECB data), so every provider's code
path runs with no network. The service runs in this process exactly as in production.

The demo is sealed: its fake rates must never reach anything real. The configuration is
read and checked as for every command (a bad value is still refused at start), then
``seal`` replaces everything real in it: ``REDIS_URL`` (a fleet would serve the fake
tables), the user's cache directory, the real rate-API URLs, access key and CA file, and
the upstream URL. The demo runs on a temporary cache of its own, removed at the end.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event

from .service import Service

if TYPE_CHECKING:
    from .config import Settings
    from .simulator import FakeRateApi

log = logging.getLogger("exrate_green.demo")

#: the access key the demo gives its fake exchangerate.host (never the user's real one)
DEMO_ACCESS_KEY = "demo-access-key"
def run_demo(settings: Settings, *, duration_s: float | None = None, rate: float = 20.0,
             out: Callable[[str], object] = print) -> int:
    """Run until ``duration_s`` seconds pass or SIGINT/SIGTERM; 0 if every reply was right."""
    from .runtime import Runtime
    from .simulator import FakeRateApi, Upstream

    cache_dir = tempfile.mkdtemp(prefix="exrate-demo-")  # the demo never touches a real cache
    done = Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, done.set)
    try:
        with FakeRateApi() as rate_api, Upstream(request_rate=rate) as upstream:
            assert upstream.url is not None  # started by the with
            demo_settings = seal(settings, upstream.url, rate_api.url, cache_dir)
            log.info("demo: upstream simulator at %s, fake rate API at %s, provider %s, "
                     "%g requests/s%s", upstream.url, rate_api.url, demo_settings.provider, rate,
                     f", {duration_s:g} s" if duration_s else ", Ctrl-C to stop")
            runtime = Runtime(demo_settings)
            service = Service(demo_settings, runtime.book)
            metrics = None
            if demo_settings.metrics_port is not None:  # as in production: opt-in
                from .metrics import MetricsServer
                metrics = MetricsServer(service, demo_settings.metrics_port).start()
            runner = gevent.spawn(service.run)
            try:
                done.wait(duration_s)
                upstream.pause_requests()  # drain: every request sent gets its reply
                upstream.wait_until(lambda: upstream.unanswered == 0, 3.0)  # a counter: cheap
                service.stop()
                runner.join(timeout=demo_settings.shutdown_grace_s + 5)
            finally:
                runner.kill(timeout=1)
                if metrics is not None:
                    metrics.stop()
                runtime.close()
            report = upstream.report()
            out(format_summary(report, service, rate_api, demo_settings))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 0 if not report["invalid"] and not report["unanswered"] else 1


def seal(settings: Settings, upstream_url: str, rate_api_url: str, cache_dir: str) -> Settings:
    """``settings`` with everything real replaced by the demo's own: no Redis, a temporary
    cache, the fake rate API and its key, the simulator as upstream, the system CAs."""
    return settings.replace(
        url=upstream_url, cache_dir=cache_dir, redis_url=None, ca_file=None,
        frankfurter_url=rate_api_url + "/v1", exchangerate_host_url=rate_api_url,
        access_key=DEMO_ACCESS_KEY, summary_interval_s=min(settings.summary_interval_s, 10.0))


def format_summary(report: dict, service: Service, rate_api: FakeRateApi,
                   settings: Settings) -> str:
    stats = service.stats
    lines = [
        "",
        f"demo summary (provider {settings.provider}):",
        f"  requests sent         {report['requests']}",
        f"  replies               {report['replies']} ({report['error_replies']} error replies)",
        f"  unanswered            {report['unanswered']}",
        f"  invalid replies       {report['invalid']}",
        f"  latency p50/p99/max   {report['latency_p50_ms']:.2f} / "
        f"{report['latency_p99_ms']:.2f} / {report['latency_max_ms']:.2f} ms",
        f"  client heartbeats     {report['client_heartbeats']} "
        f"(max gap {report['client_heartbeat_max_gap_s']:.3f} s)",
        f"  connections           {report['connections']}",
        f"  rate API calls        {rate_api.calls}",
        f"  service counters      requests={stats.requests} replies={stats.replies} "
        f"errors={stats.errors} redelivered={stats.redelivered} dropped={stats.dropped}",
    ]
    for problem in report.get("problems", [])[:5]:
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)

