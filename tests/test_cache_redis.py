"""The Redis tier against a real redis-server: shared tables, JSON only, failures are misses.

Every server here is a real ``redis-server`` on loopback started by the test
(``tests/redis_server.py``); a Redis that never answers is a real TCP listener that never
accepts. The hub is never blocked (conftest) whatever Redis does.
"""

import contextlib
import datetime
import io
import itertools
import json
import logging
import pickle
import socket
import time
from decimal import Decimal
from pathlib import Path

import gevent
import pytest
import redis

from exrate_green.cache import (
    RedisTier,
    TableCache,
    TieredCache,
    check_redis_url,
    redacted_url,
    run_cache_command,
)
from exrate_green.config import Settings
from exrate_green.errors import ConfigError
from exrate_green.rates.table import RateTable

from .redis_server import RedisServer
from .support import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port, killed at the end of the test."""
    with RedisServer(tmp_path) as server:
        yield server

DAY = datetime.date(2021, 5, 18)
PASSWORD = "s3cret-Pa55word"


def table(provider="frankfurter", day=DAY, fetched_at=None, **rates):
    rates = {code: Decimal(v) for code, v in (rates or {"USD": "1.2225"}).items()}
    rates["EUR"] = Decimal(1)
    return RateTable(provider, day, day, rates, time.time() if fetched_at is None else fetched_at)


def month(provider="frankfurter", first=datetime.date(2021, 5, 1), days=31):
    return [table(provider, first + datetime.timedelta(days=i), USD=f"1.2{i:02d}")
            for i in range(days)]


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.INFO, logger="exrate_green.cache")
    return caplog


@contextlib.contextmanager
def tiered(directory, url, *, ttl_s=3600, stale_s=86400, **redis_options):
    cache = TieredCache(TableCache(directory, ttl_s, stale_s=stale_s),
                        RedisTier(url, ttl_s, stale_s=stale_s, **redis_options))
    cache.open()
    try:
        yield cache
    finally:
        cache.close()


def raw(server):
    return redis.Redis.from_url(server.url, socket_timeout=5)


def warnings_about_redis(log):
    return [r for r in log.records
            if r.levelno == logging.WARNING and "Redis" in r.getMessage()]


# -- tables shared through Redis ----------------------------------------------------------

def test_a_table_written_by_one_process_is_found_by_another_with_a_cold_disk_and_copied_up(
        tmp_path, redis_server):
    written = table(USD="1.22250", GBP="0.86300")
    with tiered(tmp_path / "dyno-1", redis_server.url) as one:
        assert one.put(written)
    with tiered(tmp_path / "dyno-2", redis_server.url) as two:
        assert two.disk.get("frankfurter", DAY) is None
        found = two.get("frankfurter", DAY)
        assert found == written
        assert {c: str(r) for c, r in found.rates.items()} == \
            {c: str(r) for c, r in written.rates.items()}  # decimals kept exactly
        assert two.tier_counts()["redis"][0] == 1
        # copied up into the disk tier, without the lookup waiting for that write
        assert wait_until(lambda: two.disk.get("frankfurter", DAY) == written, 5)
        assert two.get("frankfurter", DAY) == written
        assert two.tier_counts()["redis"][0] == 1  # the second lookup stopped at disk


def test_a_month_is_written_in_one_call_per_tier_and_kept_ttl_plus_stale(
        tmp_path, redis_server):
    tables = month()
    with tiered(tmp_path / "c", redis_server.url, ttl_s=3600, stale_s=86400) as cache:
        assert cache.put_many(tables) == 31
        assert len(cache.disk.entries()) == 31
    client = raw(redis_server)
    keys = sorted(k.decode() for k in client.keys("exrate-green:table:*"))
    assert keys == [f"exrate-green:table:frankfurter/2021-05-{d:02d}" for d in range(1, 32)]
    ttl_ms = client.pttl(keys[0])
    assert (3600 + 86400 - 5) * 1000 < ttl_ms <= (3600 + 86400) * 1000
    # an old table is kept for what remains of its ttl + stale, a too old one not at all
    with tiered(tmp_path / "c", redis_server.url, ttl_s=3600, stale_s=86400) as cache:
        old = table(day=DAY + datetime.timedelta(days=30), fetched_at=time.time() - 86000)
        assert cache.put(old)
        assert client.pttl("exrate-green:table:frankfurter/2021-06-17") < 5000 * 1000
        assert cache.put(table(day=DAY + datetime.timedelta(days=31),
                               fetched_at=time.time() - 3600 - 86400 - 1)) is False


def test_redis_holds_json_text_and_never_unpickles_what_it_finds(tmp_path, redis_server):
    written = table()
    with tiered(tmp_path / "c", redis_server.url) as cache:
        assert cache.put(written)
        client = raw(redis_server)
        text = client.get("exrate-green:table:frankfurter/2021-05-18").decode()
        assert json.loads(text) == json.loads(written.to_json())
        assert text == written.to_json()

        class Planted:
            def __reduce__(self):
                return (open, (str(tmp_path / "pwned"), "w"))

        client.set("exrate-green:table:frankfurter/2021-05-19", pickle.dumps(Planted()))
        assert cache.redis.get("frankfurter", DAY + datetime.timedelta(days=1)) is None
        assert not (tmp_path / "pwned").exists()
        assert wait_until(lambda: client.get("exrate-green:table:frankfurter/2021-05-19")
                          is None, 5)  # deleted, beside the lookup
        assert cache.redis.errors == 1


# -- the password is a secret -------------------------------------------------------------

def test_cache_commands_show_every_tier_and_never_the_redis_password(tmp_path, capsys):
    with RedisServer(tmp_path, password=PASSWORD) as server:
        settings = Settings(cache_dir=tmp_path / "c", provider="frankfurter",
                            redis_url=server.url, cache_ttl_s=3600)
        with tiered(tmp_path / "c", server.url) as cache:
            cache.put_many(month(days=3))
            other = table(day=datetime.date(2021, 4, 30))
            cache.redis.put(other)  # only in Redis
            may_2 = datetime.date(2021, 5, 2)
            assert cache.get("frankfurter", may_2) is not None  # a disk hit
            assert cache.redis.get("frankfurter", may_2) is not None  # a Redis hit

        outputs = []
        for action, kwargs in (("stats", {}), ("list", {}), ("show", {"day": "2021-05-02"})):
            for as_json in (False, True):
                out = io.StringIO()
                assert run_cache_command(settings, action, as_json=as_json, out=out,
                                         **kwargs) == 0
                outputs.append(out.getvalue())
        stats = json.loads(outputs[1])
        assert stats["redis"]["where"] == f"redis://:***@127.0.0.1:{server.port}/0"
        assert (stats["redis"]["entries"], stats["disk"]["entries"]) == (4, 3)
        assert stats["redis"]["bytes"] > 0 and stats["redis"]["hits"] >= 1
        assert "redis://:***@127.0.0.1" in outputs[0]
        rows = json.loads(outputs[3])
        assert sorted((r["tier"], r["day"]) for r in rows) == sorted(
            [("disk", f"2021-05-0{d}") for d in (1, 2, 3)]
            + [("redis", f"2021-05-0{d}") for d in (1, 2, 3)] + [("redis", "2021-04-30")])
        assert outputs[2].splitlines()[1].split()[:3] == ["redis", "frankfurter", "2021-04-30"]
        shown = json.loads(outputs[5])
        assert len(shown) == 1 and shown[0]["tiers"] == ["disk", "redis"]

        out = io.StringIO()
        assert run_cache_command(settings, "clear", out=out, yes=True) == 0
        assert out.getvalue() == "disk: removed 3 cached tables\nredis: removed 4 cached tables\n"
        assert raw(server).keys("exrate-green:*") == []
        outputs.append(out.getvalue())
    # the server is gone: the Redis tier fails, the disk tier is still listed
    out = io.StringIO()
    assert run_cache_command(settings, "stats", out=out) == 1
    outputs.append(out.getvalue())
    err = capsys.readouterr().err
    assert "redis: Redis at redis://:***@127.0.0.1" in err
    assert "disk" in outputs[-1]
    for text in outputs + [err]:
        assert PASSWORD not in text


def test_a_redis_failure_warning_never_holds_the_password(tmp_path, warnings_log):
    with RedisServer(tmp_path, password=PASSWORD) as server:
        wrong = server.url.replace(PASSWORD, "not-" + PASSWORD)
        tier = RedisTier(wrong, 3600)
        try:
            assert tier.get("frankfurter", DAY) is None
            assert tier.put(table()) is False
            assert tier.errors == 1  # the put came during the rest after the first failure
        finally:
            tier.close()
    warnings = warnings_about_redis(warnings_log)
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert f"redis://:***@127.0.0.1:{server.port}/0" in text
    assert PASSWORD not in text and "not-" not in text
    assert "invalid" in text.lower() or "auth" in text.lower()  # says why


def test_the_redis_url_is_shown_with_its_password_masked_and_a_bad_one_refused(capsys):
    assert redacted_url("rediss://h:p%40ss@ec2-1.compute.amazonaws.com:6380") == \
        "rediss://h:***@ec2-1.compute.amazonaws.com:6380"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redacted_url("redis://:pw@[::1]:6379") == "redis://:***@[::1]:6379"
    for bad in ("http://user:" + PASSWORD + "@example.com", f"redis://:{PASSWORD}@h:99999",
                f"redis://:{PASSWORD}@/0", "rediss://[::1", "unix://"):
        with pytest.raises(ConfigError) as refused:
            RedisTier(bad, 3600)
        assert "REDIS_URL" in str(refused.value) and PASSWORD not in str(refused.value)
    out = io.StringIO()
    settings = Settings(cache_dir=Path("/nonexistent/never-created"),
                        redis_url=f"http://:{PASSWORD}@example.com")
    assert run_cache_command(settings, "list", out=out) == 2
    assert out.getvalue() == ""
    err = capsys.readouterr().err
    assert err.startswith("exrate-service: configuration error: REDIS_URL must be")
    assert PASSWORD not in err and len(err.splitlines()) == 1
    check_redis_url("unix:///run/redis.sock")
    check_redis_url("rediss://:pw@[::1]:6380/2")


def test_rediss_with_a_self_signed_certificate_needs_verify_off(tmp_path, warnings_log):
    with RedisServer(tmp_path, tls=True, password=PASSWORD) as server:
        assert server.url.startswith("rediss://")
        with tiered(tmp_path / "c", server.url, verify=False) as cache:
            assert cache.redis.put(table())
            assert cache.redis.get("frankfurter", DAY) == table(
                fetched_at=cache.redis.get("frankfurter", DAY).fetched_at)
        assert not warnings_about_redis(warnings_log)
        with tiered(tmp_path / "c", server.url) as cache:  # verify=True: refused
            assert cache.redis.get("frankfurter", DAY) is None
            assert cache.redis.errors == 1
    (warning,) = warnings_about_redis(warnings_log)
    assert "certificate verify failed" in warning.getMessage()
    assert PASSWORD not in warning.getMessage()


# -- Redis down, restarted, slow: the cache keeps answering -------------------------------

def test_redis_killed_mid_run_costs_misses_with_one_warning_then_reconnects(
        tmp_path, redis_server, warnings_log):
    with tiered(tmp_path / "c", redis_server.url) as cache:
        assert cache.put_many(month(days=10)) == 10
        only_in_redis = table(day=datetime.date(2021, 4, 1))
        assert cache.redis.put(only_in_redis)
        redis_server.kill()

        start = time.monotonic()
        for n in range(200):  # ~2 s of lookups while Redis is gone
            day = datetime.date(2021, 5, 1 + n % 10)
            assert cache.get("frankfurter", day) is not None  # the disk answers
            assert cache.get("frankfurter", datetime.date(2021, 4, 1)) is None
            gevent.sleep(0.01)
        spent = time.monotonic() - start
        assert spent < 6, spent  # every failed Redis call is quick (refused, or resting)
        assert cache.redis.errors >= 1
        assert len(warnings_about_redis(warnings_log)) == 1  # at most once a minute

        redis_server.start()  # a new, empty redis-server on the same port
        fresh = table(day=datetime.date(2021, 6, 1))
        assert wait_until(lambda: cache.redis.put(fresh), 15, interval_s=0.2)
        assert raw(redis_server).get("exrate-green:table:frankfurter/2021-06-01") is not None
        assert cache.redis.enabled
    assert any("answers again" in r.getMessage() for r in warnings_log.records)
    assert len(warnings_about_redis(warnings_log)) == 1


def test_a_redis_that_stays_down_is_warned_about_once_a_minute_with_a_count(
        tmp_path, warnings_log):
    now = [1000.0]
    with RedisServer(tmp_path) as server:
        pass  # a port where nothing listens any more: every call is refused at once
    tier = RedisTier(server.url, 3600, clock=lambda: now[0])
    try:
        for _ in range(30):  # 30 s of lookups, one a second; each rest (<= 10 s) ends
            assert tier.get("frankfurter", DAY) is None
            now[0] += 1.0
        assert len(warnings_about_redis(warnings_log)) == 1
        failures = tier.errors
        assert 3 <= failures < 30  # rests spared Redis most calls
        now[0] += 31.0  # a minute after the first warning
        assert tier.get("frankfurter", DAY) is None
        second = warnings_about_redis(warnings_log)[1].getMessage()
        assert f"({failures - 1} more since the last line)" in second
        assert "retrying in 10 s" in second  # the rest grew to its cap
    finally:
        tier.close()


@contextlib.contextmanager
def silent_listener():
    """A TCP port that accepts connections (kernel backlog) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


def test_a_redis_that_never_answers_costs_a_miss_within_the_deadline(tmp_path, warnings_log):
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    beat = gevent.spawn(ticker)
    with silent_listener() as port, tiered(tmp_path / "c", f"redis://127.0.0.1:{port}/0",
                                           deadline_s=1.0) as cache:
        assert cache.disk.put(table())

        def timed(fn, *args):
            start = time.monotonic()
            return fn(*args), time.monotonic() - start

        # 20 lookups at once for a day only Redis could hold: one pays the deadline (the
        # pool, connect and read all under one bound), the rest skip Redis
        lookups = [gevent.spawn(timed, cache.get, "frankfurter", DAY + datetime.timedelta(days=1))
                   for _ in range(20)]
        gevent.joinall(lookups, timeout=10)
        results = [g.value for g in lookups]
        assert all(value is None for value, _ in results)
        # one deadline (1 s), never two: a second caller queued behind the probe would wait
        # for it and then pay its own
        assert max(spent for _, spent in results) < 1.9, results
        assert timed(cache.get, "frankfurter", DAY)[0] is not None  # the disk answers
        put, put_s = timed(cache.put, table(day=DAY + datetime.timedelta(days=2)))
        assert put is True and put_s < 0.5  # the disk kept it; Redis rested (no deadline)
        gevent.sleep(1.1)  # the rest is over: one probe pays the deadline again
        value, spent = timed(cache.get, "frankfurter", DAY + datetime.timedelta(days=3))
        assert value is None and 0.95 < spent < 1.9, spent
    beat.kill()
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    # The ticker (every 10 ms) kept turning: a call waiting on the hub would stop it for
    # the whole 1 s deadline; half a second catches that and leaves a busy 2-core machine
    # its scheduling delays (0.1 s with a 0.3 s deadline measured the machine).
    assert len(ticks) > 100 and max(gaps) < 0.5, max(gaps)
    (warning,) = warnings_about_redis(warnings_log)
    assert "no answer within 1 s" in warning.getMessage()
