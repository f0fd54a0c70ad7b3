"""Single-flight across processes: lock files on one machine, a Redis lock across a fleet.

The other holder is a real second process (``python -c``); it dies by SIGKILL where the
test needs a holder that crashed. Nothing here ever waits for a lock.
"""

import contextlib
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gevent
import pytest
import redis

from exrate_green.cache import Flights, RedisTier, TableCache, TieredCache
from exrate_green.cache.flight import flight_name

from .redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port, killed at the end of the test."""
    with RedisServer(tmp_path) as server:
        yield server

ROOT = Path(__file__).resolve().parents[1]

#: holds the flight ARGV[2]/ARGV[3] in cache dir ARGV[1] (Redis at ARGV[4] unless "-"),
#: prints what it got, then holds it until its stdin closes
HOLDER = """
    from gevent import monkey; monkey.patch_all()
    import sys
    from exrate_green.cache import Flights, RedisTier
    directory, provider, key, url = sys.argv[1:5]
    tier = None if url == "-" else RedisTier(url, 3600)
    flights = Flights(directory, tier, ttl_s=float(sys.argv[5]))
    with flights.flight(provider, key) as mine:
        print("held" if mine else "refused", flush=True)
        sys.stdin.read()
    print("released", flush=True)
"""


@contextlib.contextmanager
def holder(directory, key="2021-05", url="-", ttl_s=15.0):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEVENT_")}
    env["PYTHONPATH"] = str(ROOT)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(directory), "frankfurter", key,
         url, str(ttl_s)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert child.stdout.readline().strip() == "held", child.stderr.read()
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=10)


def end(child):
    """Let the holder leave its flight block normally, and wait for it."""
    out, err = child.communicate("", timeout=10)
    assert out.strip() == "released", err


def flight(flights, key="2021-05"):
    with flights.flight("frankfurter", key) as mine:
        return mine


def test_one_holder_per_key_within_a_process_and_free_again_after(tmp_path):
    flights = Flights(tmp_path)
    with flights.flight("frankfurter", "2021-05") as first:
        assert first is True
        assert flight(flights) is False
        assert flight(flights, "2021-06") is True       # another month: its own flight
        assert flight(flights, "2021-05-18") is True    # a day is not its month
    assert flight(flights) is True
    assert (flights.led, flights.followed) == (4, 1)
    assert sorted(p.name for p in (tmp_path / "flights").iterdir()) == [
        "frankfurter_2021-05-18.lock", "frankfurter_2021-05.lock", "frankfurter_2021-06.lock"]


def test_flight_names_cannot_leave_the_flight_directory(tmp_path):
    assert flight_name("exchangerate.host", "2021-05-18") == "exchangerate.host/2021-05-18"
    for provider, key in (("../etc", "x"), ("ecb", "../../passwd"), ("ecb", ""), ("", "x"),
                          ("ecb", "a/b")):
        with pytest.raises(ValueError), Flights(tmp_path).flight(provider, key):
            pass


def test_processes_sharing_a_cache_directory_fly_once_and_a_dead_holder_frees_it(tmp_path):
    flights = Flights(tmp_path)
    with holder(tmp_path) as child:
        assert flight(flights) is False
        assert flight(flights, "2021-06") is True
        end(child)
    assert flight(flights) is True  # released by the holder

    with holder(tmp_path) as child:
        assert flight(flights) is False
        child.kill()  # a crash: no cleanup ran, the kernel drops the flock
        child.wait(timeout=10)
        assert flight(flights) is True


def test_a_fleet_on_separate_disks_flies_once_through_redis(tmp_path, redis_server):
    tier = RedisTier(redis_server.url, 3600)
    flights = Flights(tmp_path / "dyno-1", tier, ttl_s=1.0)
    try:
        with holder(tmp_path / "dyno-2", url=redis_server.url, ttl_s=15) as child:
            assert flight(flights) is False
            end(child)
        assert flight(flights) is True  # released by compare-and-delete

        # a holder that dies keeps the Redis lock until it expires (ttl_s), no longer
        with holder(tmp_path / "dyno-2", url=redis_server.url, ttl_s=1.0) as child:
            child.kill()
            child.wait(timeout=10)
            assert flight(flights) is False
            gevent.sleep(1.2)
            assert flight(flights) is True
        assert redis.Redis.from_url(redis_server.url).keys("exrate-green:flight:*") == []
    finally:
        tier.close()


def test_a_holder_whose_lock_expired_never_releases_the_next_holders_lock(
        tmp_path, redis_server):
    tier = RedisTier(redis_server.url, 3600)
    slow = Flights(tmp_path / "dyno-1", tier, ttl_s=0.3).flight("frankfurter", "2021-05")
    other = Flights(tmp_path / "dyno-2", tier, ttl_s=15).flight("frankfurter", "2021-05")
    third = Flights(tmp_path / "dyno-3", tier, ttl_s=15)
    try:
        assert slow.__enter__() is True
        gevent.sleep(0.5)  # the slow holder's fetch outlived its lock
        assert other.__enter__() is True
        slow.__exit__(None, None, None)  # leaving late: compare-and-delete spares the lock
        assert flight(third) is False
        other.__exit__(None, None, None)
        assert flight(third) is True
    finally:
        tier.close()


def test_without_redis_or_lock_files_the_flight_is_granted_at_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="exrate_green.cache")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with contextlib.closing(socket_that_never_answers()) as listener:
        port = listener.getsockname()[1]
        tier = RedisTier(f"redis://127.0.0.1:{port}/0", 3600, deadline_s=0.3)
        flights = Flights(blocker / "cache", tier)
        start = time.monotonic()
        assert flight(flights) is True  # fail open: a second fetch beats no fetch
        assert time.monotonic() - start < 1.0
        tier.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("lock files" in m for m in messages)
    assert any("Redis" in m for m in messages)


def socket_that_never_answers():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_the_tiered_cache_offers_the_flight_of_its_disk_and_redis(tmp_path, redis_server):
    caches = [TieredCache(TableCache(tmp_path / f"dyno-{n}", 3600),
                          RedisTier(redis_server.url, 3600)) for n in (1, 2)]
    for cache in caches:
        cache.open()
    try:
        with caches[0].flight("frankfurter", "2021-05-18") as mine, \
                caches[1].flight("frankfurter", "2021-05-18") as theirs:
            assert (mine, theirs) == (True, False)
    finally:
        for cache in caches:
            cache.close()
