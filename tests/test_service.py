"""The service end to end, in-process, against the simulator on 127.0.0.1 port 0."""

import datetime
import json
import time

import gevent
import pytest

from exrate_green import ws
from exrate_green.simulator import FakeRateApi, Upstream

from .support import FAST_BEATS, running_service, wait_until

pytestmark = pytest.mark.timeout(60)

USD_20210518 = {"marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 253.67,
                "currency": "USD", "date": "2021-05-18T21:32:42.324Z"}


def payload(**changes):
    return {**USD_20210518, **changes}


def test_converts_at_the_ecb_rate_and_keeps_every_field(tmp_path):
    with Upstream() as up, running_service(up.url, tmp_path) as service:
        assert up.wait_for_connections(1, 5)
        rid = up.send_request(payload())
        reply = up.wait_for_reply(rid, 5)
        assert reply["type"] == "message" and reply["id"] == rid
        assert reply["payload"] == {**USD_20210518, "stake": 207.55196, "currency": "EUR",
                                    "date": reply["payload"]["date"]}
        made = datetime.datetime.strptime(reply["payload"]["date"], "%Y-%m-%dT%H:%M:%S.%fZ")
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        assert abs(made - now) < datetime.timedelta(seconds=5)
        assert service.stats.replies == 1
        assert up.report()["invalid"] == 0, up.problems()


def test_eur_stakes_get_a_fresh_reply(tmp_path):
    with Upstream() as up, running_service(up.url, tmp_path):
        up.wait_for_connections(1, 5)
        rid = up.send_request(payload(currency="EUR", stake=18.2))
        reply = up.wait_for_reply(rid, 5)
        assert reply["payload"]["stake"] == 18.2
        assert reply["payload"]["date"] != USD_20210518["date"]


@pytest.mark.parametrize("changes, reason", [
    ({"currency": "ZWL"}, "unsupported currency 'ZWL'"),
    ({"currency": "usdollar"}, "invalid currency 'usdollar'"),
    ({"date": "yesterday"}, "invalid date 'yesterday'"),
    ({"date": "1998-12-31T10:00:00.000Z"}, "no exchange rate before 1999-01-04"),
    ({"stake": None}, "missing field 'stake'"),
])
def test_error_replies(tmp_path, changes, reason):
    with Upstream() as up, running_service(up.url, tmp_path):
        up.wait_for_connections(1, 5)
        body = {k: v for k, v in payload(**changes).items() if v is not None}
        rid = up.send_request(body)
        reply = up.wait_for_reply(rid, 5)
        assert reply == {"type": "error", "id": rid,
                         "message": f"Unable to convert stake. Error: {reason}"}


def test_heartbeats_every_second_from_the_open(tmp_path):
    with Upstream() as up, running_service(up.url, tmp_path):
        up.wait_for_connections(1, 5)
        opened = time.monotonic()
        assert wait_until(lambda: len(up.client_heartbeats()) >= 5, 10)
        beats = up.client_heartbeats()[:5]
        # The first beat comes with the open, not an interval later (typically ~5 ms; the
        # bound is what a loaded machine keeps and still below the 1 s a late start costs).
        assert beats[0] - opened < 0.9, beats[0] - opened
        # None doubled (a second beat in the same tick: a gap near 0) and none missing (a
        # skipped tick: a gap of 2 s or more); scheduling on a busy machine moves a beat
        # by tens of ms, not by half an interval.
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert all(0.5 < gap < 1.9 for gap in gaps), gaps
        # The cadence is one second: over four gaps a beat's lateness is shared out, so
        # a 0.8 s or 1.25 s interval fails while a late last beat does not.
        assert 0.9 < (beats[-1] - beats[0]) / len(gaps) < 1.2, gaps


def test_watchdog_abandons_a_silent_connection_and_reconnects(tmp_path):
    with Upstream() as up, running_service(up.url, tmp_path) as service:
        up.wait_for_connections(1, 5)
        assert wait_until(lambda: service.session and service.session.heartbeats_received, 3)
        silent = service.session
        up.pause_heartbeats()  # the socket stays open: only the heartbeats stop
        assert wait_until(lambda: service.session is not silent, 5, interval_s=0.005)
        abandoned_after = time.monotonic() - silent.last_heartbeat_at
        # Not before the 2 s timeout; and within one heartbeat interval after it (a
        # watchdog that waited for a second timeout would take 4 s).
        assert 2.0 <= abandoned_after <= 3.0, abandoned_after
        up.resume_heartbeats()
        assert up.wait_for_connections(2, 3)
        assert wait_until(lambda: service.session and service.session.heartbeats_received, 3)
        rid = up.send_request(payload())
        assert up.wait_for_reply(rid, 5)["payload"]["stake"] == 207.55196


def test_reconnects_at_once_after_an_abrupt_drop(tmp_path):
    with Upstream() as up, running_service(up.url, tmp_path):
        up.wait_for_connections(1, 5)
        gevent.sleep(0.2)
        dropped = time.monotonic()
        assert up.drop() == 1
        assert up.wait_for_connections(2, 1.0)
        assert time.monotonic() - dropped < 1.0
        rid = up.send_request(payload())
        assert up.wait_for_reply(rid, 5)["type"] == "message"


@pytest.mark.parametrize("code", [1000, 1001, 1011])
def test_reconnects_after_a_close_frame(tmp_path, code):
    with Upstream() as up, running_service(up.url, tmp_path) as service:
        up.wait_for_connections(1, 5)
        up.close(code, "bye")
        assert up.wait_for_connections(2, 2)
        assert (code, "") in up.client_closes() or any(c == code for c, _ in up.client_closes())
        assert service.stats.reconnects == 1


def test_keeps_retrying_while_the_upstream_refuses_then_resets_backoff(tmp_path):
    with Upstream(heartbeat_interval_s=0.2) as up, \
            running_service(up.url, tmp_path, **FAST_BEATS) as service:
        up.wait_for_connections(1, 5)
        failures = service.stats.connect_failures
        up.refuse_connections()
        up.drop()
        # It keeps retrying while refused: three failed attempts (backoff steps 0,
        # 0.125-0.25, 0.25-0.5 s), counted, instead of a 2 s sleep and hoping.
        assert wait_until(lambda: service.stats.connect_failures >= failures + 3, 5), \
            service.stats.connect_failures
        up.accept_connections()
        assert up.wait_for_connections(2, 4)  # the backoff is capped and jittered
        assert wait_until(lambda: service.session and service.session.heartbeats_received, 2)
        rid = up.send_request(payload())
        assert up.wait_for_reply(rid, 5)["type"] == "message"


def test_a_reply_caught_by_a_drop_is_redelivered_on_the_next_connection(tmp_path):
    with FakeRateApi(latency_s=0.6) as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="frankfurter",
            frankfurter_url=api.frankfurter_url) as service:
        up.wait_for_connections(1, 5)
        rid = up.send_request(payload())  # the rate takes 0.6 s: no connection then
        gevent.sleep(0.1)
        up.refuse_connections()
        up.drop()
        assert wait_until(lambda: service.delivery.kept, 3)
        up.accept_connections()
        reply = up.wait_for_reply(rid, 5)
        assert reply["payload"]["currency"] == "EUR"
        assert up.sent_on(rid) == 1 and up.report()["redelivered"] == 1
        assert service.stats.redelivered == 1 and service.stats.dropped == 0


def test_replies_older_than_the_window_are_dropped_and_counted(tmp_path):
    with FakeRateApi(latency_s=0.3) as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="frankfurter", frankfurter_url=api.frankfurter_url,
            redelivery_window_s=0.5) as service:
        up.wait_for_connections(1, 5)
        rid = up.send_request(payload())
        up.refuse_connections()
        up.drop()
        assert wait_until(lambda: service.delivery.kept, 3)
        gevent.sleep(0.8)
        up.accept_connections()
        assert up.wait_for_connections(2, 12)
        assert wait_until(lambda: service.stats.dropped == 1, 3)
        assert up.wait_for_reply(rid, 0.5) is None


BAD_FRAMES = [
    "not json", "", "{", "[1,2]", "null", '"heartbeat"', '{"type":"heartbeat"',
    '{"type":"message"}', '{"type":"unknown","id":9001}', '{"id":9002}',
    '{"type":"message","id":9003,"payload":{"stake":NaN,"currency":"USD","date":"2021-05-18"}}',
    '{"type":"message","id":9004,"payload":{"stake":1e999,"currency":"USD","date":"2021-05-18"}}',
    '{"type":"message","id":9005,"payload":{"stake":"12","currency":"USD","date":"2021-05-18"}}',
    '{"type":"message","id":9006,"payload":{"stake":12,"currency":"US","date":"2021-05-18"}}',
    '{"type":"message","id":9007,"payload":{"stake":12,"currency":"USD","date":"2021-13-45"}}',
    '{"type":"message","id":9008,"payload":{"stake":12,"currency":"USD","date":"9999-01-01"}}',
    '{"type":"message","id":9009,"payload":"oops"}',
    "[" * 50_000 + "]" * 50_000,
    "\u0000\u0001\u0002",
    '{"type":"message","id":9010,"payload":{"stake":12,"currency":"USD","date":"2021-05-18",'
    '"x":' + "9" * 5000 + "}}",
]


def test_bad_input_never_drops_the_connection(tmp_path):
    with Upstream() as up, running_service(up.url, tmp_path) as service:
        up.wait_for_connections(1, 5)
        for frame in BAD_FRAMES:
            up.send_raw(frame)
        up.send_raw(b"\x00\xff binary", binary=True)
        up.send_raw("x" * (1 << 20 + 1))  # 2 MiB: over the 1 MiB bound, skipped unread
        rid = up.send_request(payload())
        assert up.wait_for_reply(rid, 5)["payload"]["stake"] == 207.55196
        for error_id in range(9001, 9011):
            reply = up.wait_for_reply(error_id, 2)
            if error_id == 9010:  # an integer of 5,000 digits: not a number we can read
                assert reply is None
                continue
            assert reply["type"] == "error", (error_id, reply)
            assert reply["message"].startswith("Unable to convert stake. Error: ")
        assert up.connections == 1 and up.connected() == 1
        assert service.stats.skipped >= 10


def test_one_fetch_for_many_concurrent_requests_and_heartbeats_on_time(tmp_path):
    with FakeRateApi(latency_s=0.5) as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="frankfurter", frankfurter_url=api.frankfurter_url):
        up.wait_for_connections(1, 5)
        ids = [up.send_request(payload(stake=100 + i)) for i in range(300)]
        assert all(up.wait_for_reply(rid, 5) for rid in ids)
        assert api.calls == 1
        gevent.sleep(1.2)
        assert up.report()["client_heartbeat_max_gap_s"] < 1.3
        assert up.report()["invalid"] == 0, up.problems()


def test_back_pressure_bounds_waiting_conversions(tmp_path):
    peak = []
    with FakeRateApi(latency_s=0.2) as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="frankfurter", frankfurter_url=api.frankfurter_url,
            max_in_flight=5) as service:
        up.wait_for_connections(1, 5)
        waiting = service.dispatch.waiting
        watcher = gevent.spawn(lambda: [peak.append(len(waiting)) or gevent.sleep(0.01)
                                        for _ in range(300)])
        day = datetime.date(2021, 1, 4)
        ids = [up.send_request(payload(date=(day + datetime.timedelta(i)).isoformat()))
               for i in range(20)]
        assert all(up.wait_for_reply(rid, 10) for rid in ids)
        watcher.kill()
        assert max(peak) <= 5
        assert api.calls == 1  # the 20 days are in January 2021: one range call


def test_show_messages_logs_requests_and_replies_as_compact_json(tmp_path, caplog):
    caplog.set_level("INFO", logger="exrate_green.messages")
    with Upstream() as up, running_service(up.url, tmp_path, show_messages=True):
        up.wait_for_connections(1, 5)
        rid = up.send_request(payload())
        up.wait_for_reply(rid, 5)
        gevent.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "exrate_green.messages"]
    sent = [json.loads(line[5:]) for line in lines if line.startswith("send ")]
    assert any(m.get("id") == rid and m["type"] == "message" for m in sent)
    received = [json.loads(line[5:]) for line in lines
                if line.startswith("recv ") and "heartbeat" not in line]
    assert any(m.get("id") == rid and m["type"] == "message" for m in received)


def test_a_binary_request_with_an_id_gets_an_error_reply(tmp_path):
    with Upstream() as up, running_service(up.url, tmp_path):
        up.wait_for_connections(1, 5)
        up.send_raw(json.dumps({"type": "message", "id": 9100, "payload": payload()}).encode(),
                    binary=True)
        reply = up.wait_for_reply(9100, 5)
        assert reply["type"] == "error" and "binary frames are not supported" in reply["message"]
        assert up.connected() == 1



def _server_frame(message):
    """One unmasked text frame, as a server writes it."""
    return ws.build_frame(ws.OP_TEXT, json.dumps(message).encode(), mask=False)


def test_under_back_pressure_a_hot_reply_is_not_held_behind_a_cold_request(tmp_path):
    with FakeRateApi(latency_s=1.5) as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="frankfurter", frankfurter_url=api.frankfurter_url,
            max_in_flight=1) as service:
        up.wait_for_connections(1, 5)
        assert up.wait_for_reply(up.send_request(payload()), 5)  # 2021-05-18 now in memory
        cold = [{"type": "message", "id": rid, "payload": payload(date=day)}
                for rid, day in ((9201, "2021-01-04"), (9203, "2021-01-05"))]
        hot = {"type": "message", "id": 9202, "payload": payload()}
        # One read: cold (fills the pool), hot, cold (the reader blocks on the full pool).
        up.send_wire(_server_frame(cold[0]) + _server_frame(hot) + _server_frame(cold[1]))
        assert up.wait_for_reply(9202, 5)["payload"]["stake"] == 207.55196
        # It overtook the cold request read before it: that one is still waiting for its
        # 1.5 s fetch (an order, not a time: a reply held behind it would come after it).
        assert up.wait_for_reply(9201, 0) is None
        assert service.dispatch.waiting.full()
        assert up.wait_for_reply(9201, 6) and up.wait_for_reply(9203, 6)
        # The reader sat 1.5 s on a full pool while heartbeats queued unread: that is not
        # upstream silence, so the watchdog must not have dropped the link (nor request 9203).
        assert service.stats.reconnects == 0 and up.connections == 1
