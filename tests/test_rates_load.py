"""Rates under load and across processes: a cold storm, and two processes on one cache.

The storm runs the whole service in this process against the upstream simulator and the
fake rate API 200 ms away; the two processes are real ``exrate-service convert``
subprocesses sharing one cache directory.
"""

import datetime
import subprocess
import sys

import gevent
import psutil
import pytest

from exrate_green.simulator import FakeRateApi, Upstream

from .support import BIN, ROOT, running_service, service_env

pytestmark = pytest.mark.timeout(120)


def request(day, stake):
    return {"marketId": 1, "selectionId": 2, "odds": 1.5, "stake": stake,
            "currency": "USD", "date": f"{day.isoformat()}T12:00:00.000Z"}


def test_a_cold_storm_of_two_thousand_days_gets_no_error_and_one_call_per_month(tmp_path):
    first = datetime.date(2015, 1, 1)
    days = [first + datetime.timedelta(days=i) for i in range(2000)]
    months = {(day.year, day.month) for day in days}
    with FakeRateApi(latency_s=0.2) as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="frankfurter", frankfurter_url=api.frankfurter_url,
            # the simulator's sending shares this process: heartbeats may come late
            heartbeat_timeout_s=5.0) as service:
        assert up.wait_for_connections(1, 5)
        rss_before = psutil.Process().memory_info().rss
        for i in range(20_000):                 # every day once, then again, ten rounds,
            up.send_request(request(days[i % 2000], 10 + i % 997))
            if i % 250 == 249:                  # within about 8 s: the simulator shares
                gevent.sleep(0.1)               # this process and its 2 cores
        assert up.wait_until(lambda: up.replies >= 20_000, 60), up.report()
        report = up.report()
        rss_growth_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
        assert report["error_replies"] == 0, report["error_reasons"]
        assert report["invalid"] == 0, report["problems"][:3]
        # at most one call per table: one range call per month, each month once
        assert api.calls_by_endpoint == {"frankfurter.range": len(months)}
        assert set(api.calls_by_range.values()) == {1}
        lane = service.book.lanes["frankfurter"]
        assert (lane.fetches, lane.attempts, lane.failures) == (len(months),) * 2 + (0,)
        assert rss_growth_mb < 100, rss_growth_mb
        print(f"\nFIGURES cold storm: 20,000 requests over 2,000 days, {api.calls} API calls "
              f"for {len(months)} months, p50 {report['latency_p50_ms']} ms, p99 "
              f"{report['latency_p99_ms']} ms, RSS +{rss_growth_mb:.0f} MB")


CONVERT = ["convert", "100", "USD", "2021-05-18"]


def test_convert_says_which_provider_of_the_chain_answered(tmp_path):
    with FakeRateApi() as api:
        env = service_env(tmp_path, EXRATE_PROVIDER="frankfurter,exchangerate.host",
                          EXCHANGE_ACCESS_KEY="k3y", FRANKFURTER_URL=api.frankfurter_url,
                          EXCHANGERATE_HOST_URL=api.exchangerate_host_url)
        usd = subprocess.run([sys.executable, str(BIN), *CONVERT], env=env, cwd=str(ROOT),
                             capture_output=True, text=True, timeout=30, check=False)
        uah = subprocess.run([sys.executable, str(BIN), "convert", "100", "UAH", "2021-05-18"],
                             env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=30,
                             check=False)
    assert usd.returncode == 0 and "frankfurter publication of 2021-05-18" in usd.stdout, usd
    assert uah.returncode == 0 and "exchangerate.host publication" in uah.stdout, uah
    assert "k3y" not in usd.stdout + usd.stderr + uah.stdout + uah.stderr


def test_two_processes_on_one_cache_directory_make_one_call_per_table(tmp_path):
    with FakeRateApi(latency_s=0.5) as api:
        env = service_env(tmp_path, EXRATE_PROVIDER="frankfurter",
                          FRANKFURTER_URL=api.frankfurter_url)
        both = [subprocess.Popen([sys.executable, str(BIN), *CONVERT], env=env, cwd=str(ROOT),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        outputs = [p.communicate(timeout=30) for p in both]
        assert [p.returncode for p in both] == [0, 0], outputs
        assert all("81.81967 EUR" in out for out, _ in outputs), outputs
        assert api.calls == 1, api.calls_by_endpoint
