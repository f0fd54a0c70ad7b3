"""The smaller congestion items: redelivery order, the stall watchdog's reads, the ECB
bundle's lock from pool threads, RFC 3339 leap seconds and lowercase letters."""

import datetime
import socket
import struct
import time
from pathlib import Path

import gevent
import gevent.threadpool
import pytest
from gevent import monkey

from exrate_green import protocol
from exrate_green.config import Settings
from exrate_green.rates.ecb_bundle import EcbBundle
from exrate_green.runtime import Runtime
from exrate_green.service import Service
from exrate_green.stall import Progress

pytestmark = pytest.mark.timeout(60)
TODAY = datetime.date(2026, 11, 26)


@pytest.mark.parametrize("text, day", [
    ("2021-05-18T23:59:60Z", datetime.date(2021, 5, 18)),
    ("2021-05-18T23:59:60.999Z", datetime.date(2021, 5, 18)),
    ("2021-05-19T01:59:60+02:00", datetime.date(2021, 5, 18)),  # 23:59:60 UTC
    ("2021-05-18t21:32:42.324z", datetime.date(2021, 5, 18)),
    ("2021-05-18T21:32:42.324z", datetime.date(2021, 5, 18)),
    ("2021-05-18t21:32:42Z", datetime.date(2021, 5, 18)),
])
def test_rfc3339_leap_seconds_and_lowercase_letters_are_accepted(text, day):
    assert protocol.read_day(text, TODAY) == day


@pytest.mark.parametrize("text", ["2021-05-18T23:59:61Z", "2021-05-18T23:60:00Z",
                                  "2021-05-18T23:59:600Z", "2021-05-18T23:59:60 UTC"])
def test_what_rfc3339_does_not_allow_is_still_refused(text):
    with pytest.raises(protocol.ProtocolError, match="invalid date"):
        protocol.read_day(text, TODAY)


def test_the_ecb_bundle_lock_is_native_and_serves_pool_threads():
    bundle = EcbBundle()
    assert type(bundle._lock) is type(monkey.get_original("_thread", "allocate_lock")())
    # Held on the hub while eight pool threads wait for it: the hub keeps turning (a
    # gevent lock waited on from a native thread would not be a real wait), and every
    # thread loads once it is released.
    pool = gevent.threadpool.ThreadPool(8)
    bundle._lock.acquire()
    try:
        results = [pool.spawn(bundle.table, datetime.date(2021, 5, 18)) for _ in range(8)]
        ticks = 0
        for _ in range(10):
            gevent.sleep(0.01)
            ticks += 1
        assert ticks == 10 and not any(r.ready() for r in results)
    finally:
        bundle._lock.release()
    tables = [r.get(timeout=10) for r in results]
    assert {t.published for t in tables} == {datetime.date(2021, 5, 18)}
    pool.kill()


def test_the_stall_watchdog_reads_progress_while_sessions_come_and_go():
    """The watchdog thread reads plain attributes: greenlets starting and ending sessions
    meanwhile can neither break its reading nor make it see a stall.

    The two sides run until each has done enough rounds, however the GIL shares the turns
    (a count, not a time window: a fixed window flaked on a busy 2-core machine)."""
    progress = Progress()
    errors: list[str] = []
    checks = [0]
    start_new_thread = monkey.get_original("_thread", "start_new_thread")
    native_sleep = monkey.get_original("time", "sleep")
    done: list[bool] = []
    finished: list[bool] = []

    def watch():
        try:
            while not done:
                if progress.stalled(progress.clock(), 5.0) is not None:
                    errors.append("stall seen")
                checks[0] += 1
                native_sleep(0.0001)
        except Exception as e:
            errors.append(repr(e))
        finally:
            finished.append(True)

    start_new_thread(watch, ())
    rounds, wanted = 0, 200
    deadline = time.monotonic() + 30.0  # a bound for a wedged thread, never reached
    while (checks[0] < wanted or rounds < wanted) and time.monotonic() < deadline:
        progress.session_started()
        progress.reader_turned()
        progress.heartbeat_turned()
        progress.hub_at = progress.clock()
        gevent.sleep(0)
        native_sleep(0)  # hands the GIL to the watcher mid-session (a switch otherwise
        progress.session_ended()  # waits for the interpreter's 5 ms switch interval)
        native_sleep(0)
        rounds += 1
    done.append(True)
    while not finished and time.monotonic() < deadline + 5.0:
        native_sleep(0.001)
    assert finished and errors == []
    assert checks[0] >= wanted and rounds >= wanted  # both sides ran, interleaved


def test_a_wedged_reader_is_a_stall_but_a_waiting_one_is_not():
    now = 100.0
    progress = Progress(clock=lambda: now)
    progress.session_started()
    progress.reader_turned()  # working on a batch...
    progress.hub_at = progress.heartbeat_at = now + 10  # the hub and timers turn fine
    assert progress.stalled(now + 10, 5.0) == ("receive_loop", 10.0)
    progress.reader_waiting = True  # ...or waiting for room / parked: not a stall
    assert progress.stalled(now + 10, 5.0) is None


def _dead_connection():
    """A real TCP connection (its socket) whose peer resets it at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    listener.close()
    return client


def test_the_redelivery_queue_stays_in_time_order_after_a_failed_redelivery(tmp_path):
    settings = Settings(url="ws://127.0.0.1:9", provider="ecb", cache_dir=Path(tmp_path),
                        redelivery_window_s=30.0, summary_interval_s=3600.0)
    runtime = Runtime(settings)
    try:
        service = Service(settings, runtime.book)
        start = service.clock()
        service.delivery.kept.extend([(start - 20, b'"old-1"', False),
                                    (start - 10, b'"old-2"', True)])
        # A new connection takes the kept replies first, and dies under them.
        _, ended = service._serve(_dead_connection(), 0)
        service.delivery.post([b'"new"'])  # made after it died, before it was settled
        service._released(ended)
        kept = list(service.delivery.kept)
        assert [reply for _, reply, _ in kept] == [b'"old-1"', b'"old-2"', b'"new"']
        assert [when for when, _, _ in kept] == sorted(when for when, _, _ in kept)
        assert kept[1][2] is True  # written before: still known as such
        # Expiry takes from the front, the oldest: the first two, not the new one.
        service.delivery.kept[0] = (start - 40, *kept[0][1:])
        service.delivery.kept[1] = (start - 40, *kept[1][1:])
        service.delivery.expire()
        assert [reply for _, reply, _ in service.delivery.kept] == [b'"new"']
        assert service.stats.dropped == 1 and service.stats.possibly_lost == 1
    finally:
        runtime.close()


def test_a_lookup_that_finally_fails_is_a_warning_at_most_once_a_second(tmp_path, caplog):
    from exrate_green.simulator import FakeRateApi, Upstream

    from .support import running_service

    caplog.set_level("WARNING", logger="exrate_green.service")
    with FakeRateApi() as api, Upstream() as up, running_service(
            up.url, tmp_path, provider="frankfurter", frankfurter_url=api.frankfurter_url,
            http_timeout_s=0.5) as service:
        assert up.wait_for_connections(1, 5)
        api.fail_next(1000, "500")
        ids = [up.send_request({"marketId": 1, "selectionId": 2, "odds": 2.0, "stake": 10,
                                "currency": "USD", "date": f"2021-0{month}-10T10:00:00Z"})
               for month in range(1, 7)]
        replies = [up.wait_for_reply(rid, 10) for rid in ids]
        failed = service.dispatch.waiting.failed_lookups
    assert all(r is not None and r["type"] == "error" for r in replies), replies
    warnings = [r for r in caplog.records if "no rate table for" in r.getMessage()]
    assert failed == 6 and warnings and all(r.levelname == "WARNING" for r in warnings)
    assert len(warnings) < failed  # the failures came together: one line, with a count
