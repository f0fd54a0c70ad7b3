#!/usr/bin/env python
"""Benchmark the rate path through the whole service: cold start, an outage, a quota error.

Usage::

    python tools/bench_rates.py [--tree DIR] [--scenario NAME]... [--outage-s S] [--json]

``--tree DIR`` runs another checkout of exrate-green (e.g. the code before issue 10,
exported with ``git archive c2caf8e | tar -x -C DIR``) with its own simulator and fake rate
API; the scenarios use only what both trees have. Scenarios:

* ``cold365``: an empty cache, 1,000 requests over a 365-day window (USD, GBP, CZK, PLN),
  sent within about 1 s, Frankfurter 200 ms away: API calls, error replies, reply p50/p99.
* ``outage``: 30 days fetched, then left to expire (EXRATE_CACHE_TTL=5 s), then the API
  answers HTTP 500 for ``--outage-s`` seconds (default 60) while 10 requests/s ask for
  those days and 1/s for days nobody holds: share of success replies, API calls during
  the outage, error-reply latency.
* ``quota``: ``EXRATE_PROVIDER=exchangerate.host,ecb`` (the old tree: exchangerate.host
  alone, it has no chains) with exchangerate.host answering code 104 to every call; 400
  requests over 100 days in USD, GBP, CZK and UAH: success share of ECB currencies, calls.

* ``storm``: an empty cache, 20,000 requests over 2,000 distinct days sent within about
  8 s, Frankfurter 200 ms away: error replies, API calls, reply p50/p99, peak RSS growth.
  (Heartbeat timeout 5 s: the simulator's sending shares the process and its cores.)

Everything runs in this process (service, simulator, fake API) on loopback.
"""

from gevent import monkey; monkey.patch_all()  # noqa: E702, I001  before ssl/socket load

import argparse
import datetime
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import gevent

SCENARIOS = ("cold365", "outage", "quota", "storm")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", help="the exrate-green checkout to run (default: this one)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    root = Path(args.tree or Path(__file__).resolve().parents[1]).resolve()
    sys.path.insert(0, str(root))
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(message)s")
    results = {}
    for name in args.scenario or SCENARIOS:
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = SCENARIO_RUNS[name](Path(tmp), args)
        if not args.json:
            print(f"{name} ({root.name}): " + ", ".join(f"{k} {v}" for k, v in
                                                       results[name].items()), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


# --- the service in this process --------------------------------------------------------

class Running:
    """The tree's service against its simulator and fake rate API."""

    def __init__(self, cache_dir, latency_s=0.0, **settings):
        from exrate_green.simulator import FakeRateApi, Upstream
        self.api = FakeRateApi(latency_s=latency_s).start()
        self.up = Upstream().start()
        self.settings_overrides = settings
        self.cache_dir = cache_dir

    def __enter__(self):
        from exrate_green.config import Settings
        from exrate_green.runtime import Runtime
        from exrate_green.service import Service
        settings = Settings(url=self.up.url, cache_dir=self.cache_dir, summary_interval_s=3600.0,
                            frankfurter_url=self.api.frankfurter_url,
                            exchangerate_host_url=self.api.exchangerate_host_url,
                            **self.settings_overrides)
        settings.validate()
        self.runtime = Runtime(settings)
        self.service = Service(settings, self.runtime.book)
        self.runner = gevent.spawn(self.service.run)
        if not self.up.wait_for_connections(1, 10):
            raise RuntimeError("the service did not connect to the simulator")
        return self

    def __exit__(self, *exc_info):
        stopper = gevent.spawn(self.service.stop)
        stopper.join(timeout=15)
        gevent.killall([stopper, self.runner], timeout=2)
        self.runtime.close()
        self.up.stop()
        self.api.stop()

    def send(self, day, currency="USD", stake=100.0):
        return self.up.send_request({
            "marketId": 1, "selectionId": 2, "odds": 1.5, "stake": stake,
            "currency": currency, "date": f"{day.isoformat()}T12:00:00.000Z"})

    def timed(self, rid, timeout_s=30.0):
        """(seconds from now to the reply, the reply) — started right after sending."""
        t0 = time.monotonic()
        reply = self.up.wait_for_reply(rid, timeout_s)
        return time.monotonic() - t0, reply


def pct(values, p):
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, max(round(p / 100 * len(values)) - 1, 0))]


# --- scenarios --------------------------------------------------------------------------

def cold365(tmp, args):
    rng = random.Random(365)
    first = datetime.date(2021, 1, 1)
    with Running(tmp / "cache", latency_s=0.2, provider="frankfurter") as run:
        started = time.monotonic()
        ids = []
        for i in range(1000):
            day = first + datetime.timedelta(days=rng.randrange(365))
            ids.append(run.send(day, rng.choice(("USD", "GBP", "CZK", "PLN")), 10 + i))
            if i % 100 == 99:
                gevent.sleep(0.1)
        run.up.wait_until(lambda: run.up.replies >= 1000, 60)
        took_s = time.monotonic() - started
        report = run.up.report()
        return {"requests": 1000, "replies": report["replies"],
                "error_replies": report["error_replies"], "api_calls": run.api.calls,
                "reply_p50_ms": report["latency_p50_ms"], "reply_p99_ms": report["latency_p99_ms"],
                "took_s": round(took_s, 2),
                "error_reasons": _top(report["error_reasons"])}


def outage(tmp, args):
    warm = [datetime.date(2021, 3, 1) + datetime.timedelta(days=i) for i in range(30)]
    unheld = [datetime.date(2005, 1, 1) + datetime.timedelta(days=40 * i) for i in range(100)]
    with Running(tmp / "cache", provider="frankfurter", cache_ttl_s=5.0) as run:
        for day in warm:
            run.send(day)
        run.up.wait_until(lambda: run.up.replies >= len(warm), 30)
        warm_calls = run.api.calls
        gevent.sleep(5.5)                     # every table past EXRATE_CACHE_TTL
        run.api.fail_next(10**7, "500")
        calls_before = run.api.calls
        held, cold = [], []
        t_end = time.monotonic() + args.outage_s
        n = 0
        while time.monotonic() < t_end:
            held.append(gevent.spawn(run.timed, run.send(warm[n % len(warm)])))
            if n % 10 == 0:
                cold.append(gevent.spawn(run.timed, run.send(unheld[(n // 10) % len(unheld)])))
            n += 1
            gevent.sleep(0.1)
        gevent.joinall(held + cold, timeout=40)
        outage_calls = run.api.calls - calls_before
        held_r = [g.value for g in held if g.value]
        cold_r = [g.value for g in cold if g.value]
        ok = sum(1 for _, r in held_r if r and r["type"] == "message")
        errors = [dt for dt, r in cold_r if r and r["type"] == "error"]
        unheld_ok = sum(1 for _, r in cold_r if r and r["type"] == "message")
        return {"warm_up_calls": warm_calls, "outage_s": args.outage_s,
                "held_day_requests": len(held), "held_day_success": f"{ok / len(held):.1%}",
                "unheld_day_requests": len(cold),
                "unheld_day_error_replies": len(errors), "unheld_day_success": unheld_ok,
                "error_reply_p50_ms": _ms(pct(errors, 50)),
                "error_reply_max_ms": _ms(max(errors) if errors else None),
                "api_calls_during_outage": outage_calls,
                "api_calls_per_minute": round(outage_calls * 60 / args.outage_s, 1)}


def quota(tmp, args):
    from exrate_green.config import Settings
    chain = "exchangerate.host,ecb"
    try:
        Settings(provider=chain, access_key="k3y").validate()
    except Exception:
        chain = "exchangerate.host"
    days = [datetime.date(2021, 2, 1) + datetime.timedelta(days=i) for i in range(100)]
    with Running(tmp / "cache", provider=chain, access_key="k3y") as run:
        run.api.fail_next(10**7, "api_error")           # code 104 to every call
        sent = [(c, run.send(day, c)) for day in days for c in ("USD", "GBP", "CZK", "UAH")]
        replies = [(c, run.up.wait_for_reply(rid, 30)) for c, rid in sent]
        ecb = [r for c, r in replies if c != "UAH"]
        uah = [r for c, r in replies if c == "UAH"]
        ok = sum(1 for r in ecb if r and r["type"] == "message")
        return {"provider": chain, "ecb_currency_requests": len(ecb),
                "ecb_currency_success": f"{ok / len(ecb):.1%}",
                "uah_success": sum(1 for r in uah if r and r["type"] == "message"),
                "uah_reason": _top(run.up.report()["error_reasons"], 1),
                "exchangerate_host_calls": run.api.calls}


def storm(tmp, args):
    import psutil
    first = datetime.date(2015, 1, 1)
    days = [first + datetime.timedelta(days=i) for i in range(2000)]
    process = psutil.Process()
    with Running(tmp / "cache", latency_s=0.2, provider="frankfurter",
                 heartbeat_timeout_s=5.0) as run:
        rss_before, peak = process.memory_info().rss, [0]

        def sample():
            while True:
                peak[0] = max(peak[0], process.memory_info().rss)
                gevent.sleep(0.1)

        sampler = gevent.spawn(sample)
        started = time.monotonic()
        for i in range(20_000):
            run.send(days[i % 2000], "USD", 10 + i % 997)
            if i % 250 == 249:
                gevent.sleep(0.1)
        run.up.wait_until(lambda: run.up.replies >= 20_000, 90)
        took_s = time.monotonic() - started
        sampler.kill()
        report = run.up.report()
        return {"requests": 20_000, "replies": report["replies"],
                "error_replies": report["error_replies"], "api_calls": run.api.calls,
                "reply_p50_ms": report["latency_p50_ms"], "reply_p99_ms": report["latency_p99_ms"],
                "took_s": round(took_s, 1), "rss_growth_mb": round((peak[0] - rss_before) / 2**20),
                "reconnects": report["connections"] - 1,
                "error_reasons": _top(report["error_reasons"], 3)}


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def _top(reasons, n=2):
    return dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:n])


SCENARIO_RUNS = {"cold365": cold365, "outage": outage, "quota": quota, "storm": storm}

if __name__ == "__main__":
    sys.exit(main())
