"""TableCache on real files in tmp_path: JSON only, off the hub, failures are misses."""

import datetime
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import diskcache
import gevent
import psutil
import pytest

from exrate_green.cache import JsonDisk, TableCache, run_cache_command
from exrate_green.config import Settings
from exrate_green.errors import CacheError
from exrate_green.rates.table import RateTable

from .support import LOCKER

ROOT = Path(__file__).resolve().parents[1]
DAY = datetime.date(2021, 5, 18)


def table(provider="ecb", day=DAY, fetched_at=None, **rates):
    rates = {code: Decimal(v) for code, v in (rates or {"USD": "1.2225"}).items()}
    rates["EUR"] = Decimal(1)
    return RateTable(provider, day, day, rates,
                     time.time() if fetched_at is None else fetched_at)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def cache(cache_dir):
    c = TableCache(cache_dir, ttl_s=3600)
    c.open()
    assert c.enabled
    yield c
    c.close()


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.WARNING, logger="exrate_green.cache")
    return caplog


def run_python(code, *args, **kwargs):
    """A separate, unpatched interpreter importing the project (no gevent monitor noise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEVENT_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Planted:
    """Unpickling this creates ``path``: the file appearing means pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- the basic contract -------------------------------------------------------------------

def test_round_trip_keeps_decimals_exact(cache):
    original = table(USD="1.22250", JPY="133.4500", BTC="0.000023456789012345678901")
    assert cache.put(original)
    found = cache.get("ecb", DAY)
    assert found == original
    assert {c: str(r) for c, r in found.rates.items()} == \
        {c: str(r) for c, r in original.rates.items()}
    assert cache.get("ecb", DAY + datetime.timedelta(days=1)) is None
    assert cache.get("frankfurter", DAY) is None
    assert (cache.hits, cache.misses, cache.errors) == (1, 2, 0)


def test_tables_expire_ttl_after_they_were_fetched(cache_dir):
    c = TableCache(cache_dir, ttl_s=0.3)
    c.open()
    try:
        assert c.put(table())
        assert c.get("ecb", DAY) is not None
        gevent.sleep(0.4)
        assert c.get("ecb", DAY) is None
        # fetched longer ago than the ttl: not worth writing
        assert c.put(table(fetched_at=time.time() - 1)) is False
        assert c.get("ecb", DAY) is None
        assert c.errors == 0
    finally:
        c.close()


def test_persists_across_instances(cache_dir):
    first = TableCache(cache_dir, ttl_s=3600)
    first.open()
    assert first.put(table())
    first.close()
    assert first.get("ecb", DAY) is None  # closed: a miss, not an exception

    second = TableCache(cache_dir, ttl_s=3600)
    second.open()
    try:
        assert second.get("ecb", DAY) == table(fetched_at=second.get("ecb", DAY).fetched_at)
        assert second.hits == 2
    finally:
        second.close()


def test_disk_refuses_to_store_anything_but_text(tmp_path):
    disk = JsonDisk(str(tmp_path))
    for value in (b"bytes", 42, {"a": 1}):
        with pytest.raises(TypeError):
            disk.store(value, False)
    with pytest.raises(TypeError):
        disk.put(("tuple", "key"))


# -- several processes --------------------------------------------------------------------

READER = """
    import datetime, sys
    from exrate_green.cache import TableCache
    c = TableCache(sys.argv[1], ttl_s=3600)
    c.open()
    t = c.get("ecb", datetime.date(2021, 5, 18))
    print(t.to_json() if t else "MISS")
    c.close()
"""

WRITER = """
    import datetime, sys, time
    from decimal import Decimal
    from exrate_green.cache import TableCache
    from exrate_green.rates.table import RateTable
    c = TableCache(sys.argv[1], ttl_s=3600)
    c.open()
    assert c.enabled
    for i in range(int(sys.argv[2])):
        day = datetime.date(2021, 1, 1) + datetime.timedelta(days=i)
        rates = {"USD": Decimal("1.1") + Decimal(i) / 1000, "EUR": Decimal(1)}
        assert c.put(RateTable("frankfurter", day, day, rates, time.time())), i
    c.close()
    print("wrote", c.errors)
"""


def test_another_process_reads_what_this_one_wrote(cache):
    written = table(USD="1.2225", GBP="0.86300")
    assert cache.put(written)
    child = run_python(READER, cache.directory)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert RateTable.from_json(out.strip()) == written


def test_reads_while_another_process_writes(cache):
    assert cache.put(table())
    count = 200
    first = datetime.date(2021, 1, 1)
    child = run_python(WRITER, cache.directory, count)
    reads, seen = 0, set()
    while child.poll() is None:
        assert cache.get("ecb", DAY) is not None
        day = first + datetime.timedelta(days=reads % count)
        if cache.get("frankfurter", day) is not None:
            seen.add(day)
        reads += 1
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.split() == ["wrote", "0"]
    assert seen  # reads ran while the other process wrote, and found its tables
    assert cache.errors == 0
    for i in range(count):
        day = first + datetime.timedelta(days=i)
        assert cache.get("frankfurter", day).rates["USD"] == Decimal("1.1") + Decimal(i) / 1000


# -- a cache in trouble is a miss with a warning -----------------------------------------

def test_corrupt_database_is_moved_aside_and_recreated(cache_dir, warnings_log):
    cache_dir.mkdir()
    garbage = b"this is not an SQLite database\x00\xff" * 200
    (cache_dir / "cache.db").write_bytes(garbage)
    (cache_dir / "cache.db-journal.txt").write_text("a user's file with a close name")
    (cache_dir / "photos").mkdir()

    c = TableCache(cache_dir, ttl_s=3600)
    c.open()
    try:
        assert c.enabled
        assert c.put(table()) and c.get("ecb", DAY) is not None
    finally:
        c.close()
    moved = list(cache_dir.glob("corrupt-*"))  # a subdirectory of ours, our files only
    assert len(moved) == 1 and not list(cache_dir.parent.glob("cache.corrupt-*"))
    assert (moved[0] / "cache.db").read_bytes() == garbage
    assert (cache_dir / "cache.db-journal.txt").exists() and (cache_dir / "photos").is_dir()
    assert sorted(p.name for p in moved[0].iterdir()) == ["cache.db"]
    assert any("corrupt" in r.getMessage() and str(moved[0]) in r.getMessage()
               for r in warnings_log.records)


def test_directory_that_cannot_be_created_runs_disabled(tmp_path, warnings_log):
    # Tests run as root, where chmod does not stop writes; a path under a regular FILE
    # makes mkdir fail for every user.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    c = TableCache(blocker / "cache", ttl_s=3600)
    c.open()
    try:
        assert not c.enabled
        assert c.put(table()) is False
        assert c.get("ecb", DAY) is None
        assert (c.misses, c.errors) == (1, 0)
        with pytest.raises(CacheError):
            c.entries()
    finally:
        c.close()
    assert any("cannot be opened" in r.getMessage() for r in warnings_log.records)
    assert run_cache_command(Settings(cache_dir=blocker / "cache"), "list",
                             out=io.StringIO()) == 1


def test_read_only_directory_runs_disabled(cache_dir, warnings_log):
    c = TableCache(cache_dir, ttl_s=3600)
    c.open()
    c.put(table())
    c.close()
    modes = {p: p.stat().st_mode for p in [cache_dir, *cache_dir.iterdir()]}
    for path in modes:
        path.chmod(0o500 if path.is_dir() else 0o400)
    try:
        try:
            (cache_dir / "probe").write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: chmod does not stop writes (the unwritable "
                        "case is covered by test_directory_that_cannot_be_created)")
        c = TableCache(cache_dir, ttl_s=3600)
        c.open()
        try:
            assert c.put(table()) is False
            assert c.get("ecb", DAY) is None
        finally:
            c.close()
        assert warnings_log.records
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_locked_by_another_process_is_a_quick_miss_and_never_blocks_the_hub(
        cache, warnings_log):
    assert cache.put(table(day=DAY - datetime.timedelta(days=1)))
    locker = run_python(LOCKER, cache.directory / "cache.db", 3)
    assert locker.stdout.readline().strip() == "locked"

    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(time.monotonic()) or gevent.sleep(0.01)
                                   for _ in iter(int, 1)])

    def timed(fn, *args):
        start = time.monotonic()
        return fn(*args), time.monotonic() - start

    def open_fresh():
        fresh = TableCache(cache.directory, ttl_s=3600, timeout_s=0.3)
        fresh.open()
        fresh.close()
        return fresh.enabled

    got, fresh = gevent.spawn(timed, cache.get, "ecb", DAY), gevent.spawn(timed, open_fresh)
    gevent.joinall([got, fresh], timeout=10)
    (value, get_s), (fresh_enabled, open_s) = got.value, fresh.value
    assert value is None and get_s < 2.0, get_s        # timeout_s=1.0, then a miss
    assert cache.errors == 1
    assert fresh_enabled is False and open_s < 2.5, open_s  # bounded, not diskcache's 60 s
    put, put_s = timed(cache.put, table())
    assert put is False and put_s < 0.5  # right after a lock timeout the disk is skipped

    locker.communicate(timeout=10)
    ticker.kill()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # The ticker (every 10 ms) kept turning all along: a lock wait on the hub would stop
    # it for a whole timeout (the get's 1 s, the open's 3 x 0.3 s), so half a second still
    # catches one; a busy 2-core machine delays a tick by tens of ms (0.15 s flaked).
    assert len(ticks) > 50 and max(gaps) < 0.5, max(gaps)
    assert any("locked" in r.getMessage() for r in warnings_log.records)

    deadline = time.monotonic() + 5
    while not cache.put(table()):  # the lock is gone: back to normal once the pause ends
        assert time.monotonic() < deadline
        gevent.sleep(0.2)
    assert cache.get("ecb", DAY) is not None


def test_pickled_rows_are_refused_never_unpickled(cache, tmp_path, warnings_log):
    marker = tmp_path / "pwned"
    foreign = diskcache.Cache(str(cache.directory))  # plain diskcache: pickles freely
    try:
        foreign.set("ecb/2021-05-18", Planted(marker))             # pickled value
        foreign.set(Planted(marker), "text under a pickled key")   # pickled key
        assert not marker.exists()

        assert cache.get("ecb", DAY) is None
        assert (cache.misses, cache.errors) == (1, 1)
        assert "ecb/2021-05-18" not in foreign  # the refused row was deleted

        assert cache.put(table(day=DAY + datetime.timedelta(days=1)))
        assert [e["day"] for e in cache.entries()] == ["2021-05-19"]
        assert len(cache.tables_for(DAY + datetime.timedelta(days=1))) == 1
        assert cache.clear() == 2  # clear removes the pickled-key row without reading it
    finally:
        foreign.close()
    assert not marker.exists()
    assert any("refused" in r.getMessage() for r in warnings_log.records)
    assert any("pickled keys" in r.getMessage() for r in warnings_log.records)


def test_malformed_rows_are_misses_and_deleted(cache, warnings_log):
    foreign = diskcache.Cache(str(cache.directory))
    try:
        foreign.set("ecb/2021-05-18", "{not json")
        foreign.set("ecb/2021-05-19", table().to_json())  # the 18th's table under the 19th
        foreign.set("ecb/2021-05-20", 12345)              # a number, not text
        for day in (18, 19, 20):
            assert cache.get("ecb", datetime.date(2021, 5, day)) is None
        assert (cache.misses, cache.errors) == (3, 3)
        assert len(foreign) == 0
    finally:
        foreign.close()
    assert len(warnings_log.records) == 1  # rate-limited: one line a minute, with the count
    assert cache.bad_rows.count == 3


def test_thousand_concurrent_greenlets_share_one_connection(cache_dir):
    c = TableCache(cache_dir, ttl_s=3600, wait_s=30)
    c.open()
    process = psutil.Process()
    try:
        assert c.put(table()) and c.get("ecb", DAY)  # connection, -wal and -shm are open
        baseline = process.num_fds()
        peak = [baseline]

        def sample():
            while True:
                peak[0] = max(peak[0], process.num_fds())
                gevent.sleep(0.005)

        def work(i):
            day = DAY - datetime.timedelta(days=i // 2)
            return c.put(table(day=day)) if i % 2 == 0 else c.get("ecb", day)

        sampler = gevent.spawn(sample)
        workers = [gevent.spawn(work, i) for i in range(1000)]
        gevent.joinall(workers, timeout=60, raise_error=True)
        sampler.kill()
        assert all(w.ready() for w in workers)
        assert c.errors == 0
        assert all(w.value is True for w in workers[::2])
        assert peak[0] < baseline + 10, (baseline, peak[0])
        assert len(c.entries()) == 500
    finally:
        c.close()


# -- exrate-service cache ... -------------------------------------------------------------

@pytest.fixture
def settings(cache_dir):
    fetched = time.time() - 60  # fresh for 1h 59m with the default ttl of 7200 s
    c = TableCache(cache_dir, ttl_s=7200, stale_s=604800)
    c.open()
    c.put(table("ecb", DAY, fetched, USD="1.2225", GBP="0.86300"))
    c.put(table("frankfurter", DAY, fetched, USD="1.2226"))
    c.put(table("ecb", DAY - datetime.timedelta(days=1), fetched, USD="1.2201"))
    c.close()
    return Settings(cache_dir=cache_dir, cache_ttl_s=7200)


def command(settings, *args, **kwargs):
    out = io.StringIO()
    assert run_cache_command(settings, *args, out=out, **kwargs) == 0
    return out.getvalue()


def test_cli_list(settings):
    lines = command(settings, "list").splitlines()
    assert lines[0].split() == ["TIER", "PROVIDER", "DAY", "PUBLISHED", "CURRENCIES", "FETCHED",
                                "AT", "(UTC)", "FRESHNESS", "DROPPED", "IN"]
    assert len(lines) == 5  # header, three tables, the note on the bundled ECB history
    assert lines[1].split()[:5] == ["disk", "ecb", "2021-05-17", "2021-05-17", "2"]
    assert lines[2].split()[:5] == ["disk", "ecb", "2021-05-18", "2021-05-18", "3"]
    assert lines[3].split()[:3] == ["disk", "frankfurter", "2021-05-18"]
    # fresh for the ttl, then kept as stale for stale_if_error_s (7 days by default)
    assert all(line.endswith("fresh for 1h 59m  7d 2h") for line in lines[1:4]), lines
    # aligned: every column starts where its header starts
    for header in ("DAY", "PUBLISHED", "FETCHED AT", "FRESHNESS"):
        column = lines[0].index(header)
        assert all(line[column - 2:column] == "  " and line[column] != " "
                   for line in lines[1:4])
    fetched = lines[1].split()[5]
    assert datetime.datetime.strptime(fetched, "%Y-%m-%dT%H:%M:%SZ")
    assert "bundled" in lines[4] and "without the cache" in lines[4]

    rows = json.loads(command(settings, "list", as_json=True))
    assert [(r["tier"], r["provider"], r["day"], r["currencies"]) for r in rows] == [
        ("disk", "ecb", "2021-05-17", 2), ("disk", "ecb", "2021-05-18", 3),
        ("disk", "frankfurter", "2021-05-18", 2)]
    assert all(7000 + 604800 < r["expires_in_s"] <= 7140 + 604800 for r in rows)
    assert all(7000 < r["fresh_for_s"] <= 7140 and r["stale_for_s"] == 0 for r in rows)
    assert all(r["fetched_at"].endswith("Z") for r in rows)


def test_cli_list_says_a_table_is_stale_and_for_how_long(cache_dir):
    c = TableCache(cache_dir, ttl_s=3600, stale_s=86400)
    c.open()
    assert c.put(table("frankfurter", DAY, time.time() - 3600 - 600))  # stale for 10 min
    c.close()
    settings = Settings(cache_dir=cache_dir, cache_ttl_s=3600, stale_if_error_s=86400,
                        provider="frankfurter")
    lines = command(settings, "list").splitlines()
    assert len(lines) == 2  # no note: frankfurter tables are all cached
    assert lines[1].endswith("stale for 10m 0s  23h 50m"), lines[1]
    row, = json.loads(command(settings, "list", as_json=True))
    assert row["fresh_for_s"] == 0 and 599 < row["stale_for_s"] < 605


def test_cli_list_of_an_empty_cache_explains_the_bundled_ecb_history(cache_dir):
    settings = Settings(cache_dir=cache_dir, provider="ecb")
    lines = command(settings, "list").splitlines()
    assert lines[0] == "no cached tables"
    assert lines[1].startswith("note: the ecb provider reads the ECB history bundled")
    assert "only later days are cached" in lines[1]
    assert command(settings.replace(provider="frankfurter"), "list") == "no cached tables\n"


def test_cli_show(settings, capsys):
    text = command(settings, "show", day="2021-05-18")
    blocks = text.split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].splitlines()[0].startswith("ecb 2021-05-18 (published 2021-05-18")
    assert blocks[0].splitlines()[0].endswith(", in disk)")
    assert blocks[0].splitlines()[1:] == ["EUR  1", "GBP  0.86300", "USD  1.2225"]
    assert blocks[1].splitlines()[1:] == ["EUR  1", "USD  1.2226"]

    tables = json.loads(command(settings, "show", day="2021-05-18", as_json=True))
    assert [t["provider"] for t in tables] == ["ecb", "frankfurter"]
    assert tables[0]["tiers"] == ["disk"]
    assert tables[0]["rates"] == {"EUR": "1", "GBP": "0.86300", "USD": "1.2225"}

    assert command(settings, "show", day="2020-01-01") == "no cached tables for 2020-01-01\n"
    assert json.loads(command(settings, "show", day="2020-01-01", as_json=True)) == []

    for bad in ("2021-13-01", "yesterday", None):
        out = io.StringIO()
        assert run_cache_command(settings, "show", day=bad, out=out) == 2
        assert out.getvalue() == ""
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "expected YYYY-MM-DD" in err


def test_cli_stats(settings):
    command(settings, "show", day="2021-05-18")  # listing must not count as hits
    stats = json.loads(command(settings, "stats", as_json=True))
    assert list(stats) == ["disk"]  # no REDIS_URL: one tier
    disk = stats["disk"]
    assert disk["where"] == str(settings.cache_dir)
    assert disk["entries"] == 3
    assert disk["bytes"] > 0
    assert (disk["hits"], disk["misses"]) == (0, 0)

    lines = command(settings, "stats").splitlines()
    assert [line.split()[0] for line in lines] == [
        "disk", "where", "entries", "bad_rows", "bytes", "hits", "misses"]
    assert lines[2].split() == ["entries", "3"]


def test_cli_clear(settings):
    assert command(settings, "clear") == "disk: removed 3 cached tables\n"
    assert json.loads(command(settings, "clear", as_json=True)) == {
        "removed": 0, "by_tier": {"disk": 0}}
    assert command(settings, "list").startswith("no cached tables\n")
    assert json.loads(command(settings, "list", as_json=True)) == []
    assert json.loads(command(settings, "stats", as_json=True))["disk"]["entries"] == 0


def test_cli_unknown_action(settings, capsys):
    assert run_cache_command(settings, "drop", out=io.StringIO()) == 2
    assert "unknown cache action" in capsys.readouterr().err
