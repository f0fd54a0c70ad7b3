"""A fleet on one Redis: two service processes ("dynos") with separate cache directories.

Each dyno is a real ``bin/exrate-service`` subprocess with its own upstream simulator and
its own, empty, cache directory (a Heroku dyno's disk); they share one real redis-server
(``REDIS_URL``) and one fake rate API that counts calls. Both are asked for the same cold
days at the same moment: the fleet makes one API call per table between them (the
cross-process flight), not one per dyno. Restarted with empty disks, they answer the same
days from Redis without any call.
"""

import contextlib
import datetime
import signal

import gevent
import pytest

from exrate_green.simulator import FakeRateApi, Upstream

from .redis_server import RedisServer
from .support import service_env, start_service

pytestmark = pytest.mark.timeout(120)

BEAT_S = 0.2
DAYS = [datetime.date(2021, 5, 3) + datetime.timedelta(days=i) for i in range(10)]


def request(day, currency="USD"):
    return {"marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 253.67,
            "currency": currency, "date": f"{day.isoformat()}T12:00:00.000Z"}


@contextlib.contextmanager
def dyno(tmp_path, name, api, redis_url=None, cache_dir=None):
    """One service process with its own upstream and (by default) its own empty cache
    directory; with ``redis_url``, a Redis tier."""
    with Upstream(heartbeat_interval_s=BEAT_S) as up:
        extra = {"REDIS_URL": redis_url} if redis_url else {}
        env = service_env(tmp_path / name, EXRATE_URL=up.url, EXRATE_PROVIDER="frankfurter",
                          FRANKFURTER_URL=api.frankfurter_url,
                          EXRATE_CACHE_DIR=cache_dir or tmp_path / name / "cache",
                          EXRATE_HEARTBEAT_INTERVAL=BEAT_S, EXRATE_HEARTBEAT_TIMEOUT=1.0,
                          EXRATE_SUMMARY_INTERVAL=3600, **extra)
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        process = start_service([], env)
        try:
            assert up.wait_for_connections(1, 20), "the dyno never connected"
            yield up
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                out, _ = process.communicate(timeout=20)
            except Exception:
                process.kill()
                raise
            log = out.decode(errors="replace")
            assert process.returncode == 0, log
            assert "Traceback" not in log, log


def converts_everything(ups, days):
    """Every day asked of every dyno at once; every reply a conversion."""
    sent = [(up, up.send_request(request(day))) for day in days for up in ups]
    replies = [up.wait_for_reply(rid, 20) for up, rid in sent]
    assert all(r is not None and r["type"] == "message" for r in replies), replies


def fetched_more_than_once(api):
    counters = [api.calls_by_day, getattr(api, "calls_by_range", {})]
    return {key: n for counter in counters for key, n in counter.items() if n > 1}


def test_two_dynos_on_one_redis_make_one_call_per_table_and_none_after_a_restart(tmp_path):
    with RedisServer(tmp_path) as server, FakeRateApi(latency_s=0.2) as api:
        with dyno(tmp_path, "dyno-1", api, server.url) as one, \
                dyno(tmp_path, "dyno-2", api, server.url) as two:
            gevent.sleep(0.5)  # both connected and idle: the test starts them cold together
            converts_everything([one, two], DAYS)
        cold_calls = api.calls
        assert 1 <= cold_calls <= len(DAYS), cold_calls  # a day or a month per call
        assert fetched_more_than_once(api) == {}

        api.reset()
        with dyno(tmp_path, "dyno-1-restarted", api, server.url) as one, \
                dyno(tmp_path, "dyno-2-restarted", api, server.url) as two:
            converts_everything([one, two], DAYS)
        assert api.calls == 0, (api.calls_by_day, getattr(api, "calls_by_range", None))
    print(f"\nFIGURES fleet: 2 dynos, {len(DAYS)} cold days: {cold_calls} API calls; "
          f"after a restart with empty disks: 0")


def test_two_processes_on_one_cache_directory_make_one_call_per_table(tmp_path):
    shared = tmp_path / "shared-cache"
    with FakeRateApi(latency_s=0.2) as api:
        with dyno(tmp_path, "one", api, cache_dir=shared) as one, \
                dyno(tmp_path, "two", api, cache_dir=shared) as two:
            gevent.sleep(0.5)
            converts_everything([one, two], DAYS)
        assert 1 <= api.calls <= len(DAYS), api.calls
        assert fetched_more_than_once(api) == {}
    assert any((shared / "flights").iterdir())  # the lock files of the flights taken
