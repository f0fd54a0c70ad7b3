"""The simulator's memory stays bounded however many requests it sends and judges."""

import datetime
import time

import gevent
import orjson
import pytest
import websocket

from exrate_green.simulator import Upstream
from exrate_green.simulator.ledger import Ledger
from exrate_green.simulator.samples import Reservoir

pytestmark = pytest.mark.timeout(60)


def test_the_ledger_forgets_answered_requests_and_keeps_counting():
    ledger = Ledger(window=64, max_pending=100)
    for _ in range(0, 10_000, 50):
        ids = ledger.allocate_many(50)
        ledger.register_many(ids, [None] * 50, 1, time.monotonic())
        for rid in ids:
            assert ledger.take(rid) is not None
    assert (ledger.sent, ledger.answered, ledger.unanswered) == (10_000, 10_000, 0)
    assert ledger.sizes() == {"pending": 0, "explicit": 0, "state_ring": 64, "conn_ring": 64}
    assert ledger.state(9_999) == Ledger.ANSWERED       # recent: a duplicate is told
    assert ledger.state(1) == Ledger.FORGOTTEN          # old: only "too old" is known
    assert ledger.state(10_001) == Ledger.NONE          # never sent
    assert ledger.sent_on(9_990) == 1 and ledger.sent_on(5) is None


def test_a_client_that_never_answers_cannot_grow_the_ledger():
    ledger = Ledger(window=64, max_pending=100)
    for _ in range(100):
        ids = ledger.allocate_many(50)
        ledger.register_many(ids, [None] * 50, 1, time.monotonic())
    for n in range(1_000):
        ledger.register(f"explicit-{n}", None, 1, time.monotonic(), auto=False)
    sizes = ledger.sizes()
    assert sizes["pending"] == 100 and sizes["explicit"] <= 64
    assert ledger.unanswered == 6_000 and ledger.given_up == 5_900
    assert ledger.state(1) == Ledger.FORGOTTEN


def test_a_reservoir_holds_a_fixed_sample_with_the_exact_count_and_maximum():
    reservoir = Reservoir(1_000, seed=1)
    for n in range(100_000):
        reservoir.add(float(n % 1000))
    reservoir.add(5_000.0)
    assert len(reservoir) == 1_000 and reservoir.count == 100_001 and reservoir.max == 5_000.0
    assert 400 <= reservoir.percentile(50) <= 600    # uniform over 0..999
    assert reservoir.percentile(99) >= 950


def test_sample_structures_stay_bounded_while_many_requests_are_answered():
    n = 6_000
    with Upstream(request_rate=6_000, heartbeat_interval_s=None, max_requests=n, seed=2,
                  keep_replies=100, latency_samples=500, ledger_window=1024) as up:
        ws = websocket.create_connection(up.url, timeout=5)
        answered = 0
        while answered < n:
            msg = orjson.loads(ws.recv())
            payload = msg["payload"]
            payload["currency"], payload["date"] = "EUR", now_z()
            ws.send(orjson.dumps(msg))
            ws.send('{"type":"heartbeat"}')
            answered += 1
            if answered % 50 == 0:
                gevent.sleep(0)   # this loop shares the hub with the simulator: let it run
        assert up.wait_until(lambda: up.unanswered == 0, 10) is True
        report = up.report()
        ws.close()
        assert (report["requests"], report["replies"], report["ok"], report["invalid"]) == (
            n, n, n, 0), report["problems"]
        assert report["client_heartbeats"] == n
        assert report["latency_samples"] == 500 and up.judge.latencies_ms.count == n
        assert len(up.judge.replies_by_id) == 100
        assert len(up.client_heartbeats()) == up.heartbeats.RECENT < n
        assert len(up.heartbeats.gaps) <= up.heartbeats.gaps.size
        assert up.ledger.sizes() == {"pending": 0, "explicit": 0, "state_ring": 1024,
                                     "conn_ring": 1024}


def now_z():
    now = datetime.datetime.now(datetime.UTC)
    return f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z"
