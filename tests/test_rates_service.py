"""Rates through the running service: single-flight, bounded descriptors, every provider."""

import datetime

import gevent
import psutil
import pytest

from exrate_green.simulator import FakeRateApi, Upstream

from .support import running_service

pytestmark = pytest.mark.timeout(90)


def request(day, currency="USD", stake=100):
    return {"marketId": 1, "selectionId": 2, "odds": 1.5, "stake": stake,
            "currency": currency, "date": f"{day.isoformat()}T12:00:00.000Z"}


def test_a_thousand_cold_requests_over_200_days_one_call_per_month_bounded_fds(tmp_path):
    process = psutil.Process()
    first_day = datetime.date(2020, 1, 1)
    days = [first_day + datetime.timedelta(i) for i in range(200)]
    with FakeRateApi(latency_s=0.2) as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="frankfurter",
            frankfurter_url=api.frankfurter_url) as service:
        assert up.wait_for_connections(1, 5)
        gevent.sleep(1.0)
        baseline_fds, peak_fds = process.num_fds(), []
        sampler = gevent.spawn(lambda: [peak_fds.append(process.num_fds()) or gevent.sleep(0.005)
                                        for _ in range(10_000)])
        ids = [up.send_request(request(days[i % 200], stake=10 + i)) for i in range(1000)]
        replies = [up.wait_for_reply(rid, 30) for rid in ids]
        sampler.kill()
        assert all(r and r["type"] == "message" for r in replies)
        # 2020-01-01 to 2020-07-18: one range call per calendar month, nothing else
        assert api.calls_by_endpoint == {"frankfurter.range": 7}, api.calls_by_endpoint
        assert sorted(end.month for _, end in api.calls_by_range) == list(range(1, 8))
        assert max(peak_fds) < 150, (baseline_fds, max(peak_fds))
        assert up.report()["client_heartbeat_max_gap_s"] < 1.3
        assert service.stats.reconnects == 0
        # All 200 tables are now hot: the same requests again make no call at all.
        again = [up.send_request(request(day)) for day in days]
        assert all(up.wait_for_reply(rid, 5) for rid in again)
        assert api.calls == 7


def test_exchangerate_host_converts_the_upstreams_extra_currencies(tmp_path):
    with FakeRateApi() as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="exchangerate.host", access_key="k3y",
            exchangerate_host_url=api.exchangerate_host_url):
        assert up.wait_for_connections(1, 5)
        day = datetime.date(2021, 5, 18)
        ids = {code: up.send_request(request(day, code, 1000)) for code in ("UAH", "BTC", "GBP")}
        replies = {code: up.wait_for_reply(rid, 5) for code, rid in ids.items()}
        assert all(r["type"] == "message" for r in replies.values()), replies
        assert api.calls == 1
        # The fake quotes UAH at 33.6 per EUR (7 significant digits, like the real API).
        assert replies["UAH"]["payload"]["stake"] == pytest.approx(1000 / 33.6, abs=1e-4)


def test_a_failed_fetch_is_not_cached_and_gets_error_replies(tmp_path):
    with FakeRateApi() as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="frankfurter", frankfurter_url=api.frankfurter_url,
            http_timeout_s=1.0) as service:
        assert up.wait_for_connections(1, 5)
        api.fail_next(10, "500")
        day = datetime.date(2021, 3, 3)
        failed = [up.send_request(request(day)) for _ in range(20)]
        replies = [up.wait_for_reply(rid, 5) for rid in failed]
        assert all(r["type"] == "error" for r in replies)
        assert all("exchange rate service unavailable" in r["message"] for r in replies)
        api.reset()
        ok = up.send_request(request(day))
        assert up.wait_for_reply(ok, 5)["type"] == "message"
        assert api.calls == 1
        assert service.stats.errors == 20
