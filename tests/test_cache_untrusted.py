"""Cache rows are untrusted input, and reads never depend on writes.

Anything may sit under our keys, on disk or in a real ``redis-server``: each kind of
garbage is a miss, deleted, with one warning and no traceback, and ``cache list/show/stats``
show it as bad and exit 0. A Redis that refuses writes (a read-only replica, OOM with
``noeviction``) still serves what it holds.
"""

import datetime
import io
import json
import logging
import time
from decimal import Decimal

import diskcache
import pytest
import redis

from exrate_green.cache import RedisTier, TableCache, TieredCache, run_cache_command
from exrate_green.config import Settings
from exrate_green.rates.book import RateBook
from exrate_green.rates.ecb_bundle import EcbBundle
from exrate_green.rates.http import HttpClient
from exrate_green.rates.providers import make_providers
from exrate_green.rates.table import RateTable
from exrate_green.simulator import FakeRateApi

from .redis_server import RedisServer
from .support import wait_until

pytestmark = pytest.mark.timeout(60)

DEC_15 = datetime.date(2010, 12, 15)
KEY = "frankfurter/2010-12-15"
RKEY = "exrate-green:table:" + KEY


def row(**changes):
    """A well-formed row's fields (as ``to_json`` writes them), with ``changes``."""
    fields = json.loads(RateTable("frankfurter", DEC_15, DEC_15,
                                  {"USD": Decimal("1.336"), "EUR": Decimal(1)},
                                  time.time()).to_json())
    fields.update(changes)
    return json.dumps(fields)


GARBAGE = {
    "deep-json": "[" * 30_000 + "]" * 30_000,
    "deeper-than-any-row": "[" * 100_000 + "]" * 100_000,
    "not-json": "{not json",
    "a-list": "[1, 2, 3]",
    "rate-1e-999999": row(rates={"USD": "1e-999999", "EUR": "1"}),
    "rate-zero": row(rates={"USD": "0", "EUR": "1"}),
    "rate-a-number-not-text": row(rates={"USD": 1.3, "EUR": "1"}),
    "lying-publication": row(published="2000-01-03"),
    "fetched-in-the-future": row(fetched_at=time.time() + 10 * 365 * 86400),
    "another-days-table": row(day="2010-12-16", published="2010-12-16"),
    "extra-field": row(extra=1),
    "huge-but-well-shaped": row(rates={f"X{a}{b}": "1.5" for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                       for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"} | {"EUR": "1"},
                                padding="x" * 70_000),
}


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.WARNING)
    return caplog


def bad_row_warnings(log):
    return [r for r in log.records if "is not a rate table" in r.getMessage()]


def settings_for(tmp_path, url=None, **changes):
    return Settings(cache_dir=tmp_path / "cache", redis_url=url, provider="frankfurter",
                    **changes)


# --- Redis ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(GARBAGE))
def test_a_garbage_redis_row_is_a_miss_deleted_with_one_warning(tmp_path, warnings_log, name):
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.set(RKEY, GARBAGE[name])
        tier = RedisTier(server.url, 3600, stale_s=86400)
        try:
            assert tier.get("frankfurter", DEC_15) is None
            assert wait_until(lambda: client.exists(RKEY) == 0, 5)   # deleted, beside
            assert tier.get("frankfurter", DEC_15) is None   # a plain miss now
            assert tier.enabled   # a bad row says nothing of Redis's health
        finally:
            tier.close()
    assert len(bad_row_warnings(warnings_log)) == 1
    assert not any(r.exc_info for r in warnings_log.records)


def test_a_32_mb_redis_row_is_refused_without_crossing_the_wire(tmp_path, warnings_log):
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.setrange(RKEY, 32 * 2**20, b"}")   # 32 MB of zero bytes and a brace
        tier = RedisTier(server.url, 3600)
        try:
            assert tier.get("frankfurter", DEC_15) is None
            assert wait_until(lambda: client.exists(RKEY) == 0, 5)
        finally:
            tier.close()
    assert "larger than any rate table" in bad_row_warnings(warnings_log)[0].getMessage()


def test_a_redis_key_of_another_type_is_a_miss_and_deleted(tmp_path, warnings_log):
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.hset(RKEY, "a", "b")
        tier = RedisTier(server.url, 3600)
        try:
            assert tier.get("frankfurter", DEC_15) is None
            assert wait_until(lambda: client.exists(RKEY) == 0, 5) and tier.enabled
        finally:
            tier.close()
    assert "not a string key" in bad_row_warnings(warnings_log)[0].getMessage()


def test_a_bad_redis_row_is_replaced_by_a_fetched_table_and_the_reply_is_right(tmp_path):
    bundle = EcbBundle()
    with RedisServer(tmp_path) as server, FakeRateApi(bundle=bundle) as api:
        client = redis.Redis.from_url(server.url)
        client.set(RKEY, GARBAGE["deep-json"])
        settings = settings_for(tmp_path, server.url, frankfurter_url=api.url + "/v1")
        disk = TableCache(settings.cache_dir, 3600, stale_s=86400)
        cache = TieredCache(disk, RedisTier(server.url, 3600, stale_s=86400))
        cache.open()
        http = HttpClient(settings)
        book = RateBook(make_providers(settings, http), cache, ttl_s=3600, stale_s=86400)
        try:
            assert book.get(DEC_15, "USD").rates["USD"] == bundle.table(DEC_15).rates["USD"]
            good = wait_until(lambda: client.get(RKEY), 5)
            assert RateTable.from_json(good).day == DEC_15   # overwritten by the fetch
        finally:
            book.close()
            cache.close()
            http.close()


# --- disk ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(GARBAGE))
def test_a_garbage_disk_row_is_a_miss_deleted_with_one_warning(tmp_path, warnings_log, name):
    cache = TableCache(tmp_path / "cache", 3600, stale_s=86400)
    cache.open()
    foreign = diskcache.Cache(str(tmp_path / "cache"))
    try:
        foreign.set(KEY, GARBAGE[name])
        assert cache.get("frankfurter", DEC_15) is None
        assert KEY not in foreign
    finally:
        foreign.close()
        cache.close()
    assert len(bad_row_warnings(warnings_log)) == 1
    assert not any(r.exc_info for r in warnings_log.records)


# --- the CLI shows bad rows as bad -------------------------------------------------------

def test_cache_list_show_and_stats_show_bad_rows_as_bad_and_exit_0(tmp_path, capsys):
    with RedisServer(tmp_path) as server:
        settings = settings_for(tmp_path, server.url)
        redis.Redis.from_url(server.url).set(RKEY, GARBAGE["deeper-than-any-row"])
        cache = TableCache(settings.cache_dir, 3600)
        cache.open()
        cache.close()
        foreign = diskcache.Cache(str(settings.cache_dir))
        foreign.set(KEY, GARBAGE["rate-1e-999999"])
        foreign.close()

        out = io.StringIO()
        assert run_cache_command(settings, "list", out=out) == 0
        listed = out.getvalue()
        assert listed.count("BAD ROW") == 2 and "Traceback" not in listed

        out = io.StringIO()
        assert run_cache_command(settings, "show", day="2010-12-15", out=out) == 0
        assert out.getvalue().count("BAD ROW") == 2

        out = io.StringIO()
        assert run_cache_command(settings, "stats", as_json=True, out=out) == 0
        stats = json.loads(out.getvalue())
        assert stats["disk"]["bad_rows"] == 1 and stats["redis"]["bad_rows"] == 1
    assert "Traceback" not in capsys.readouterr().err


# --- reads never depend on writes --------------------------------------------------------

def good_table(day):
    return RateTable("frankfurter", day, day, {"USD": Decimal("1.3"), "EUR": Decimal(1)},
                     time.time())


def replicate_without_delay(primary):
    """The primary starts a replica's full sync at once, not after redis's default 5 s
    wait for more replicas (repl-diskless-sync-delay): 5 s per test spent waiting."""
    with redis.Redis.from_url(primary.url) as admin:
        admin.config_set("repl-diskless-sync-delay", 0)


def test_a_read_only_replica_serves_what_it_holds(tmp_path, warnings_log):
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    with RedisServer(tmp_path / "primary") as primary, \
            RedisServer(tmp_path / "replica") as replica:
        days = [DEC_15 + datetime.timedelta(days=n) for n in range(5)]
        writer = RedisTier(primary.url, 3600)
        assert writer.put_many([good_table(day) for day in days]) == 5
        writer.close()
        replicate_without_delay(primary)
        client = redis.Redis.from_url(replica.url)
        client.replicaof("127.0.0.1", primary.port)
        assert wait_until(lambda: client.dbsize() == 5, 10)

        tier = RedisTier(replica.url, 3600)
        try:
            assert tier.put(good_table(DEC_15 - datetime.timedelta(days=1))) is False
            for day in days:
                assert tier.get("frankfurter", day).day == day
            assert tier.enabled and tier.refusals >= 1
        finally:
            tier.close()
    refusals = [r for r in warnings_log.records if "refused a write" in r.getMessage()]
    assert len(refusals) == 1 and "read only replica" in refusals[0].getMessage()


def test_a_book_over_a_read_only_replica_makes_no_call_for_days_it_holds(tmp_path):
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    with RedisServer(tmp_path / "primary") as primary, \
            RedisServer(tmp_path / "replica") as replica, FakeRateApi() as api:
        days = [DEC_15 + datetime.timedelta(days=n) for n in range(8)]
        writer = RedisTier(primary.url, 3600)
        writer.put_many([good_table(day) for day in days])
        writer.close()
        replicate_without_delay(primary)
        client = redis.Redis.from_url(replica.url)
        client.replicaof("127.0.0.1", primary.port)
        assert wait_until(lambda: client.dbsize() == 8, 10)

        settings = settings_for(tmp_path, replica.url, frankfurter_url=api.url + "/v1")
        cache = TieredCache(TableCache(settings.cache_dir, 3600),
                            RedisTier(replica.url, 3600))
        cache.open()
        http = HttpClient(settings)
        book = RateBook(make_providers(settings, http), cache, ttl_s=3600)
        try:
            for day in days:
                assert book.get(day, "USD").rates["USD"] == Decimal("1.3")
        finally:
            book.close()
            cache.close()
            http.close()
        assert api.calls == 0


def test_a_redis_out_of_memory_with_noeviction_still_serves_reads(tmp_path, warnings_log):
    with RedisServer(tmp_path) as server:
        tier = RedisTier(server.url, 3600)
        try:
            assert tier.put(good_table(DEC_15))
            client = redis.Redis.from_url(server.url)
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", "1")
            assert tier.put(good_table(DEC_15 + datetime.timedelta(days=1))) is False
            for _ in range(3):
                assert tier.get("frankfurter", DEC_15).day == DEC_15
            assert tier.enabled
        finally:
            tier.close()
    assert any("maxmemory" in r.getMessage() for r in warnings_log.records)
