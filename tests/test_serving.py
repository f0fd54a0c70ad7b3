"""The pure step (``serving.step``): a batch of frames in, what to do about it out.

No socket, no clock, no hub: the day, the reply timestamp and the rate book's ``peek``
are passed in. One test at the end drives the real ``Service.handle`` over a slow rate
API (the simulator's) to check how the service acts on a step under back-pressure.
"""

import datetime
from decimal import Decimal

import gevent
import orjson

from exrate_green import protocol, serving
from exrate_green.config import Settings
from exrate_green.rates.table import RateTable
from exrate_green.runtime import Runtime
from exrate_green.service import Service
from exrate_green.simulator import FakeRateApi
from tests.support import wait_until

TODAY = datetime.date(2026, 11, 24)
STAMP = "2001-02-03T04:05:06.789Z"  # far from any real clock: a reply must carry this one
HOT_DAY = datetime.date(2021, 5, 18)
COLD_DAY = datetime.date(2021, 6, 15)  # another month: the range fetch of HOT_DAY misses it
OTHER_COLD_DAY = datetime.date(2021, 7, 15)
TABLE = RateTable("test", HOT_DAY, HOT_DAY, {"EUR": Decimal(1), "USD": Decimal("1.25")}, 0.0)
HEARTBEAT = ("text", b'{"type":"heartbeat"}')


def hot_only(day, currency):
    """A rate book holding only HOT_DAY's table in memory."""
    return TABLE if day == HOT_DAY else None


def request(request_id, day=HOT_DAY, currency="USD", stake=10):
    return ("text", orjson.dumps({"type": "message", "id": request_id, "payload": {
        "marketId": 7, "stake": stake, "currency": currency, "date": day.isoformat()}}))


def run(*events, peek=hot_only):
    return serving.step(list(events), today=TODAY, stamp=STAMP, peek=peek)


def loads(replies):
    return [orjson.loads(reply) for reply in replies]


def test_a_request_with_a_hot_rate_is_answered_in_the_step_with_the_stamp_passed_in():
    result = run(request(1, stake=10))
    [reply] = loads(result.replies)
    assert reply == {"type": "message", "id": 1, "payload": {
        "marketId": 7, "stake": 8.0, "currency": "EUR", "date": STAMP}}
    assert result.requests == 1 and result.waiting == [] and result.errors == []


def test_a_request_whose_table_is_not_in_memory_waits_and_gets_no_reply_yet():
    result = run(request(2, day=COLD_DAY))
    assert result.replies == []
    assert [(r.id, r.day, r.currency) for r in result.waiting] == [(2, COLD_DAY, "USD")]
    assert result.requests == 1


def test_a_waiting_request_does_not_hold_back_the_hot_replies_after_it():
    result = run(request(1), request(2, day=COLD_DAY), request(3), request(4, day=COLD_DAY))
    assert [reply["id"] for reply in loads(result.replies)] == [1, 3]
    assert [r.id for r in result.waiting] == [2, 4]
    assert result.requests == 4


def test_heartbeats_are_counted_and_never_answered_nor_counted_as_requests():
    result = run(HEARTBEAT, request(1), HEARTBEAT)
    assert result.heartbeats == 2
    assert result.requests == 1 and len(result.replies) == 1


def test_a_bad_request_with_an_id_gets_an_error_reply_counted_by_kind():
    result = run(request(9, currency="DOLLAR"))
    [reply] = loads(result.replies)
    assert reply["type"] == "error" and reply["id"] == 9
    assert reply["message"].startswith(protocol.ERROR_PREFIX + "invalid currency")
    assert result.errors == ["invalid_request"] and result.requests == 1


def test_an_unsupported_currency_is_an_error_reply_of_its_own_kind():
    result = run(request(5, currency="XYZ"))
    [reply] = loads(result.replies)
    assert reply == {"type": "error", "id": 5,
                     "message": protocol.ERROR_PREFIX + "unsupported currency 'XYZ'"}
    assert result.errors == ["unsupported_currency"]


def test_a_date_after_the_day_passed_in_is_refused_whatever_the_real_clock_says():
    far_future = TODAY + datetime.timedelta(days=30)
    result = serving.step([request(6, day=far_future)], today=TODAY, stamp=STAMP,
                          peek=hot_only)
    assert loads(result.replies)[0]["message"].endswith("is in the future")
    past_today = serving.step([request(6, day=far_future)], today=far_future, stamp=STAMP,
                              peek=hot_only)
    assert past_today.replies == [] and [r.id for r in past_today.waiting] == [6]


def test_a_message_without_an_id_is_skipped_with_its_reason_and_no_reply():
    result = run(("text", b'{"type":"message","payload":{}}'), ("text", b"not json"))
    assert result.replies == [] and result.requests == 0
    assert len(result.skipped) == 2
    assert result.skipped[0].endswith(""": '{"type":"message","payload":{}}'""")
    assert result.skipped[1].startswith("invalid JSON")


def test_a_binary_frame_with_an_id_gets_an_error_reply_and_counts_as_a_request():
    _, data = request(7)
    result = run(("binary", data))
    assert loads(result.replies) == [{"type": "error", "id": 7,
                                      "message": protocol.ERROR_PREFIX + serving.BINARY_REFUSED}]
    assert result.requests == 1 and result.errors == ["invalid_request"]


def test_binary_frames_without_an_id_and_oversize_frames_are_skipped_with_their_size():
    result = run(("binary", b"\xff\x00"), ("oversize", 3 << 20))
    assert result.replies == [] and result.requests == 0
    assert result.skipped == ["binary frame of 2 bytes", f"oversize frame of {3 << 20} bytes"]


def test_a_bug_costs_one_message_and_the_rest_of_the_batch_is_served():
    def broken_for_cold_days(day, currency):
        if day == COLD_DAY:
            raise LookupError("a bug")
        return TABLE

    result = run(request(1, day=COLD_DAY), request(2), peek=broken_for_cold_days)
    assert [reply["id"] for reply in loads(result.replies)] == [2]
    [(data, error)] = result.failures
    assert orjson.loads(data)["id"] == 1 and isinstance(error, LookupError)
    assert result.requests == 2  # counted before the bug, as the service always did


def test_the_step_never_yields_to_the_hub():
    ran = []
    gevent.spawn(ran.append, "another greenlet")
    result = run(*[request(i) for i in range(200)], HEARTBEAT, request(999, day=COLD_DAY))
    assert ran == []  # it would have run at the first yield
    assert len(result.replies) == 200
    gevent.sleep(0)
    assert ran == ["another greenlet"]


def test_answer_records_an_error_kind_only_for_an_error_reply():
    errors: list[str] = []
    hot = protocol.parse(request(1)[1], TODAY)
    assert orjson.loads(serving.answer(hot, TABLE, STAMP, errors))["type"] == "message"
    assert errors == []
    empty = RateTable("test", HOT_DAY, HOT_DAY, {"EUR": Decimal(1)}, 0.0)
    assert orjson.loads(serving.answer(hot, empty, STAMP, errors))["type"] == "error"
    assert errors == ["unsupported_currency"]


# -- how the service acts on a step ------------------------------------------------------

class _Reader:
    """What the session's reader does with a batch: ``dispatch.take`` (hot replies to
    delivery), the heartbeats counted, then ``dispatch.hold`` (waiting for room first).
    With no connection every reply lands in ``service.delivery.kept``."""

    heartbeats = 0

    def handle(self, service, frames):
        step = service.dispatch.take(frames)
        self.heartbeats += step.heartbeats
        service.dispatch.hold(step.waiting, step.started)


def test_a_batch_posts_its_hot_replies_and_heartbeats_before_the_reader_waits_for_room(
        tmp_path):
    with FakeRateApi(latency_s=1.0) as api:
        settings = Settings(url="ws://127.0.0.1:9", provider="frankfurter",
                            frankfurter_url=api.frankfurter_url, http_timeout_s=5,
                            max_in_flight=1, cache_dir=tmp_path)
        runtime = Runtime(settings)
        try:
            service = Service(settings, runtime.book)
            api.latency_s = 0.0
            runtime.book.get(HOT_DAY, "USD")  # HOT_DAY's table in memory
            api.latency_s = 1.0
            session = _Reader()
            batch = [request(1, day=COLD_DAY), request(2, day=OTHER_COLD_DAY),
                     request(3), HEARTBEAT]
            reader = gevent.spawn(session.handle, service, batch)
            gevent.sleep(0.3)  # the first cold request is held; the second waits for room
            assert not reader.dead
            assert [orjson.loads(r)["id"] for _, r, _ in service.delivery.kept] == [3]
            assert session.heartbeats == 1
            assert service.stats.requests == 3 and service.stats.backpressure_waits == 1
            reader.join(timeout=5)
            assert reader.dead
            assert wait_until(lambda: len(service.delivery.kept) == 3, 5)
            got = [orjson.loads(r) for _, r, _ in service.delivery.kept]
            assert [(g["id"], g["type"]) for g in got] == [(3, "message"), (1, "message"),
                                                           (2, "message")]
        finally:
            runtime.close()
