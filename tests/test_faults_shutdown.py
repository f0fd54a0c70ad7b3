"""SIGTERM under load, the service as a real process (docs/design.md 2 "Shutdown").

``bin/exrate-service`` runs as a subprocess against the simulator and the fake rate API,
both in this process. The simulator sends 300 requests/s over 18 months of dates and the
API answers after 300 ms, so when SIGTERM comes, conversions are waiting for rates. Proved:

* exit code 0, well within the grace period;
* every request the service read got its reply, and every reply reached the simulator
  before the service's close frame (1000), which the simulator received; none dropped;
* a conversion that cannot finish within the grace is abandoned, counted as dropped, and
  the process still exits 0 on time; a second signal exits at once.
"""

import datetime
import re
import signal

import gevent
import pytest

from exrate_green.simulator import FakeRateApi, Upstream

from .support import ServiceProcess, summary_totals, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

IN_FLIGHT = re.compile(r"stopping: (\d+) conversion\(s\) in flight")


def running(tmp_path, up, api, **env):
    """The service process against ``up`` and ``api``, quick heartbeats."""
    return ServiceProcess(tmp_path, up.url, EXRATE_PROVIDER="frankfurter",
                          FRANKFURTER_URL=api.frankfurter_url, EXRATE_HEARTBEAT_INTERVAL=0.2,
                          EXRATE_HEARTBEAT_TIMEOUT=0.6, **env)

def test_sigterm_under_load_answers_everything_read_and_closes_with_1000(tmp_path):
    # Dates over 10 years: the rate book fetches a month per call, so with 18 months (the
    # default window) every table is hot within a second and nothing is in flight.
    with FakeRateApi(latency_s=0.3) as api, Upstream(
            heartbeat_interval_s=0.2, request_rate=300, seed=3,
            dates=(datetime.date(2011, 1, 1), datetime.date(2020, 12, 31))) as up:
        service = running(tmp_path, up, api)
        try:
            assert up.wait_for_connections(1, 15), service.output
            # load: cold days wait 300 ms for their table; a hundred replies written
            # (counted, however long a busy machine takes to get there)
            assert wait_until(lambda: up.report()["replies"] > 100, 20, interval_s=0.05), \
                up.report()
            service.proc.send_signal(signal.SIGTERM)
            code, exit_s = service.wait(15)
            gevent.sleep(0.1)
        finally:
            service.kill()
        report = up.report()
    out = service.output
    assert code == 0, out[-3000:]
    assert exit_s < 10.0, exit_s  # within the grace (10 s); typically 1-3 s
    totals = summary_totals(out)
    requests, replies, redelivered, dropped = (int(totals[name]) for name in (
        "requests", "replies", "redelivered", "dropped"))
    in_flight = int(IN_FLIGHT.search(out).group(1))
    assert in_flight > 0, "SIGTERM came when nothing was in flight: the test proves nothing"
    assert dropped == 0 and requests == replies, (requests, replies, dropped)
    assert report["replies"] == replies, (report["replies"], replies)  # all reached the simulator
    assert report["duplicates"] == 0 and report["invalid"] == 0, report["problems"]
    assert (1000, "shutting down") in report["client_closes"] or \
        any(c == 1000 for c, _ in report["client_closes"]), report["client_closes"]
    unread = report["requests"] - requests
    print(f"\nFIGURES sigterm: {in_flight} conversions in flight at SIGTERM; exit 0 after "
          f"{exit_s:.2f} s; read {requests}, answered {replies} (all received), dropped 0; "
          f"{unread} sent after the service stopped reading (never read)")


def test_a_conversion_past_the_grace_is_dropped_and_the_exit_is_on_time(tmp_path):
    with FakeRateApi() as api, Upstream(heartbeat_interval_s=0.2) as up:
        service = running(tmp_path, up, api, EXRATE_SHUTDOWN_GRACE=1, EXRATE_HTTP_TIMEOUT=20)
        try:
            assert up.wait_for_connections(1, 15), service.output
            api.fail_next(5, "hang")
            rid = up.send_request({"marketId": 1, "selectionId": 2, "odds": 2.0, "stake": 10,
                                   "currency": "USD", "date": "2021-05-18T10:00:00.000Z"})
            gevent.sleep(0.5)
            service.proc.send_signal(signal.SIGTERM)
            code, exit_s = service.wait(15)
        finally:
            service.kill()
    out = service.output
    assert code == 0, out[-3000:]
    # conversions get the grace minus the close frame's reserve (a quarter of 1 s here);
    # the exit comes within the grace plus the documented margin
    assert 0.75 <= exit_s < 1.0 + 1.0 + 0.6, exit_s
    assert "grace period over: 1 conversion(s) abandoned" in out, out[-3000:]
    totals = summary_totals(out)
    requests, replies, redelivered, dropped = (int(totals[name]) for name in (
        "requests", "replies", "redelivered", "dropped"))
    assert (requests, dropped) == (1, 1)
    assert up.wait_for_reply(rid, 0) is None
    print(f"\nFIGURES sigterm past grace: exit 0 after {exit_s:.2f} s (grace 1 s), 1 dropped")


def test_a_second_signal_exits_at_once(tmp_path):
    with FakeRateApi() as api, Upstream(heartbeat_interval_s=0.2) as up:
        service = running(tmp_path, up, api, EXRATE_SHUTDOWN_GRACE=30, EXRATE_HTTP_TIMEOUT=20)
        try:
            assert up.wait_for_connections(1, 15), service.output
            api.fail_next(5, "hang")
            up.send_request({"marketId": 1, "selectionId": 2, "odds": 2.0, "stake": 10,
                             "currency": "USD", "date": "2021-05-18T10:00:00.000Z"})
            gevent.sleep(0.5)
            service.proc.send_signal(signal.SIGTERM)
            gevent.sleep(0.5)
            assert service.proc.poll() is None  # waiting out its grace for the hung fetch
            service.proc.send_signal(signal.SIGINT)
            code, exit_s = service.wait(5)
        finally:
            service.kill()
    assert code == 128 + signal.SIGINT, service.output[-3000:]
    assert exit_s < 5.0, exit_s  # at once: not the 30 s grace, nor the hung fetch's 20 s
