#!/usr/bin/env python
"""A cold storm against a healthy API: queueing must be back-pressure, never failure.

Usage::

    python tools/bench_storm.py [--requests N] [--latency-s S] [--seed N] [--json]

The service runs as a subprocess (``bin/exrate-service``, as an operator runs it) with an
empty cache and ``EXRATE_PROVIDER=frankfurter``; this process plays the upstream (the
bundled simulator) and Frankfurter (the fake rate API, ``--latency-s`` away, default
0.3 s). It sends ``--requests`` (default 50,000) requests for random days of every month
from 1999-01 to the current one (336 months in December 2026) as fast as the upstream
link takes them, and waits for every reply. Printed: error replies (want 0) and their
reasons, rate-API calls (want one range call per past month), reply p50/p99, the wall
time, and the service's peak RSS (``VmHWM``, want under 100 MB).
"""

from gevent import monkey; monkey.patch_all()  # noqa: E702, I001  before ssl/socket load

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: EXRATE_* variables of this process reach the service (e.g. EXRATE_MAX_IN_FLIGHT=2000)
PASSED_ON = {k: v for k, v in os.environ.items() if k.startswith("EXRATE_")}
sys.path.insert(0, str(ROOT))

from exrate_green.rates.http import utc_today
from exrate_green.rates.table import FIRST_DAY
from exrate_green.simulator import FakeRateApi, Upstream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--latency-s", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = storm(args.requests, args.latency_s, random.Random(args.seed))
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for name, value in figures.items():
            print(f"{name:22} {value}")
    ok = (figures["error_replies"] == 0 and figures["unanswered"] == 0
          and figures["max_calls_per_month"] == 1 and figures["peak_rss_mb"] < 100)
    return 0 if ok else 1


def storm(requests: int, latency_s: float, rng: random.Random) -> dict:
    days = past_days_by_month()
    with tempfile.TemporaryDirectory() as tmp, FakeRateApi(latency_s=latency_s) as api, \
            Upstream() as up:
        service = start_service(Path(tmp), up.url, api.frankfurter_url)
        try:
            if not up.wait_for_connections(1, 30):
                raise SystemExit("the service did not connect to the simulator")
            started = time.monotonic()
            for i in range(requests):
                month = days[i % len(days)]   # every month, round-robin, random days in it
                up.send_request({"marketId": 1, "selectionId": 2, "odds": 1.5,
                                 "stake": 10 + i % 997, "currency": "USD",
                                 "date": f"{rng.choice(month).isoformat()}T12:00:00.000Z"})
            up.wait_until(lambda: up.replies >= requests, 600)
            took_s = time.monotonic() - started
            peak_rss_mb = vm_hwm_mb(service.pid)
        finally:
            service.terminate()
            service.wait(timeout=30)
        report = up.report()
    ranges = api.calls_by_range
    return {
        "requests": requests, "replies": report["replies"],
        "error_replies": report["error_replies"], "unanswered": report["unanswered"],
        "error_reasons": dict(sorted(report["error_reasons"].items(),
                                     key=lambda kv: -kv[1])[:3]),
        "months": len(days), "api_calls": api.calls,
        "api_calls_by_endpoint": {k: v for k, v in api.calls_by_endpoint.items() if v},
        "max_calls_per_month": max(ranges.values(), default=0),
        "api_latency_s": latency_s,
        "reply_p50_ms": report["latency_p50_ms"], "reply_p99_ms": report["latency_p99_ms"],
        "took_s": round(took_s, 1), "peak_rss_mb": peak_rss_mb,
    }


def past_days_by_month() -> list[list[datetime.date]]:
    """Every past day from the first ECB publication (1999-01-04) to yesterday, by month."""
    months: dict[tuple[int, int], list[datetime.date]] = {}
    day, today = FIRST_DAY, utc_today()
    while day < today:
        months.setdefault((day.year, day.month), []).append(day)
        day += datetime.timedelta(days=1)
    return list(months.values())


def start_service(tmp: Path, url: str, frankfurter_url: str) -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "EXRATE_URL": url,
           "EXRATE_PROVIDER": "frankfurter", "FRANKFURTER_URL": frankfurter_url,
           "EXRATE_CACHE_DIR": str(tmp / "cache"), "LOG_LEVEL": "WARNING",
           "EXRATE_SUMMARY_INTERVAL": "3600", **PASSED_ON}
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "exrate-service")], env=env,
                            cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=sys.stderr)


def vm_hwm_mb(pid: int) -> float:
    """The peak resident set of process ``pid`` (``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
