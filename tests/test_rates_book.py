"""The rate book against the fake rate API on loopback: stale-if-error, the breaker, chains,
month fetches, and the budgets whatever the cache and the API do.

The book runs with a fake clock (epoch seconds, moved by hand) for freshness and
breakers; waiting and HTTP run on real time. The cache is the real disk cache in a
temporary directory, wrapped where a test needs it slow.
"""

import datetime
import time
from decimal import Decimal

import gevent
import pytest

from exrate_green.cache import TableCache, TieredCache
from exrate_green.config import Settings
from exrate_green.errors import RateUnavailable, UnsupportedCurrency
from exrate_green.rates.book import WAIT_MARGIN_S, RateBook
from exrate_green.rates.ecb_bundle import EcbBundle
from exrate_green.rates.http import HttpClient
from exrate_green.rates.providers import make_providers
from exrate_green.simulator import FakeRateApi

pytestmark = pytest.mark.timeout(60)

TTL_S = 7200.0
STALE_S = 604800.0
BUDGET_S = 1.0
KEY = "k3y"
MAY_18 = datetime.date(2021, 5, 18)


class FakeClock:
    """Epoch seconds that move only when told to."""

    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class SlowCache:
    """The real disk cache, with every read and/or write delayed (a slow disk or Redis)."""

    def __init__(self, cache, read_s=0.0, write_s=0.0):
        self.cache, self.read_s, self.write_s = cache, read_s, write_s
        self.written = []

    def flight(self, provider, key):
        return self.cache.flight(provider, key)

    def get(self, provider, day):
        gevent.sleep(self.read_s)
        return self.cache.get(provider, day)

    def put_many(self, tables):
        gevent.sleep(self.write_s)
        self.written.extend(table.day for table in tables)
        return self.cache.put_many(tables)


@pytest.fixture(scope="module")
def bundle():
    b = EcbBundle()
    b.load()
    return b


@pytest.fixture
def api(bundle):
    with FakeRateApi(bundle=bundle) as fake:
        yield fake


@pytest.fixture
def cache(tmp_path):
    c = TieredCache(TableCache(tmp_path / "cache", TTL_S, stale_s=STALE_S))
    c.open()
    yield c
    c.close()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def open_book(bundle, clock):
    books = []

    def open_(cache, provider="frankfurter", *, frankfurter=None, ehost=None, **settings):
        s = Settings(provider=provider, access_key=KEY, http_timeout_s=BUDGET_S,
                     frankfurter_url=frankfurter.frankfurter_url if frankfurter else
                     "http://127.0.0.1:9/v1",
                     exchangerate_host_url=ehost.exchangerate_host_url if ehost else
                     "http://127.0.0.1:9", **settings)
        s.validate()
        http = HttpClient(s)
        book = RateBook(make_providers(s, http, bundle=bundle), cache, ttl_s=TTL_S,
                        stale_s=STALE_S, http_timeout_s=BUDGET_S,
                        concurrency=s.fetch_concurrency, clock=clock)
        books.append((book, http))
        return book

    yield open_
    for book, http in books:
        book.close()
        http.close()


def timed(fn, *args):
    """(seconds ``fn(*args)`` took, its value or the RateUnavailable it raised)."""
    t0 = time.monotonic()
    try:
        value = fn(*args)   # called first: a tuple reads time.monotonic() before the call
    except RateUnavailable as e:
        value = e
    return time.monotonic() - t0, value


# --- stale if error ----------------------------------------------------------------------

def test_a_stale_table_answers_during_an_outage_and_a_fresh_one_after_it(
        api, cache, clock, open_book):
    book = open_book(cache, frankfurter=api)
    first = book.get(MAY_18)
    lane = book.lanes["frankfurter"]
    assert (lane.fetches, lane.stale_served) == (1, 0)

    clock.advance(TTL_S + 60)                       # past freshness, within the stale window
    api.fail_next(1000, "500")
    assert book.peek(MAY_18) is None                # a stale table is not served while fresh
    stale = book.get(MAY_18, "USD")                 # ones may still be fetched...
    assert stale == first and stale.rate("USD") == first.rate("USD")
    assert lane.stale_served == 1 and lane.failures == 1
    with pytest.raises(RateUnavailable) as caught:  # ...and a day nobody holds is an error
        book.get(datetime.date(2020, 2, 3))
    assert "HTTP 500" in caught.value.reason

    api.reset()                                     # the outage ends: a fresh table again
    fresh = book.get(MAY_18)
    assert fresh.fetched_at == clock.now and fresh.rates == first.rates
    assert book.peek(MAY_18) is fresh


def test_while_the_breaker_is_open_a_stale_table_answers_without_a_call_or_a_disk_read(
        api, cache, clock, open_book):
    book = open_book(cache, frankfurter=api)
    book.get(MAY_18)
    clock.advance(TTL_S + 1)
    api.fail_next(10_000, "500")
    for month in range(1, 6):                       # five failed fetches open the breaker
        with pytest.raises(RateUnavailable):
            book.get(datetime.date(2019, month, 7))
    lane = book.lanes["frankfurter"]
    assert lane.breaker.state == "open"
    calls, reads = api.calls, cache.hits + cache.misses
    assert book.peek(MAY_18).fetched_at < clock.now - TTL_S   # the reader answers stale too
    answers = [timed(book.get, MAY_18) for _ in range(99)]
    assert all(table.day == MAY_18 for _, table in answers)
    # From memory: no API call, no disk read (the counts prove it; a time bound measured
    # the machine), and no wait either: a breaker that held the reader for its probe
    # would make the answers wait seconds, not stay far below one.
    assert (api.calls, cache.hits + cache.misses) == (calls, reads)
    assert max(dt for dt, _ in answers) < 1.0
    assert lane.stale_served == 100


def test_a_table_past_the_stale_window_is_not_served(api, cache, clock, open_book):
    book = open_book(cache, frankfurter=api)
    book.get(MAY_18)
    clock.advance(TTL_S + STALE_S + 1)
    api.fail_next(1000, "500")
    with pytest.raises(RateUnavailable):
        book.get(MAY_18)
    assert book.lanes["frankfurter"].stale_served == 0


# --- the breaker -------------------------------------------------------------------------

def test_five_failed_fetches_open_the_breaker_a_failed_probe_doubles_a_good_one_closes(
        api, cache, clock, open_book):
    book = open_book(cache, frankfurter=api)
    lane = book.lanes["frankfurter"]
    api.fail_next(10_000, "500")
    months = [datetime.date(2020, m, 10) for m in range(1, 6)]
    for day in months:
        with pytest.raises(RateUnavailable):
            book.get(day)
    assert lane.breaker.state == "open" and lane.failures == 5
    # the first fetch retried; once a fetch has failed, the others make one attempt each
    calls = api.calls
    assert lane.attempts == calls and calls <= 4 + 4, calls

    elapsed, error = timed(book.get, datetime.date(2020, 7, 1))
    # no call (the count), and an answer without waiting out the 30 s cool-down or an
    # HTTP budget (a bound a loaded machine keeps: the answer takes milliseconds)
    assert api.calls == calls and lane.attempts == calls, (api.calls, calls)
    assert elapsed < 1.0, elapsed
    assert error.reason == ("exchange rate service unavailable: frankfurter is down, "
                            "retrying in 30 s")

    clock.advance(30)               # one probe, which fails, however many requests wait
    probes = [gevent.spawn(timed, book.get, datetime.date(2020, m, 1)) for m in range(7, 12)]
    gevent.joinall(probes, timeout=5)
    assert all(isinstance(g.value[1], RateUnavailable) for g in probes)
    assert api.calls == calls + 1
    assert "retrying in 60 s" in timed(book.get, datetime.date(2020, 8, 3))[1].reason

    clock.advance(60)
    api.reset()                                          # the probe succeeds: closed
    assert book.get(datetime.date(2020, 8, 3)).day == datetime.date(2020, 8, 3)
    assert lane.breaker.state == "closed"
    assert book.get(datetime.date(2020, 9, 3)).published == datetime.date(2020, 9, 3)


def test_a_quota_error_opens_the_breaker_for_an_hour(api, cache, clock, open_book):
    book = open_book(cache, "exchangerate.host", ehost=api)
    api.fail_next(1, "api_error")                        # code 104, usage_limit_reached
    error = timed(book.get, MAY_18)[1]
    assert error.reason.startswith("exchange rate service unavailable: "
                                   "exchangerate.host error 104")
    assert api.calls == 1
    down = ("exchange rate service unavailable: exchangerate.host is down (monthly request "
            "quota exhausted), retrying in 3600 s")
    assert timed(book.get, MAY_18)[1].reason == down
    clock.advance(3599)
    assert "retrying in 1 s" in timed(book.get, MAY_18)[1].reason
    assert api.calls == 1
    clock.advance(1)
    assert book.get(MAY_18).provider == "exchangerate.host"
    assert api.calls == 2


# --- chains --------------------------------------------------------------------------------

def test_a_chain_falls_back_per_day_while_the_first_provider_refuses(
        api, cache, clock, open_book):
    book = open_book(cache, "exchangerate.host,ecb", ehost=api)
    api.fail_next(1, "api_error")
    table = book.get(MAY_18, "USD")
    assert table.provider == "ecb" and table.published == MAY_18   # the bundled history
    other = book.get(datetime.date(2021, 5, 19), "GBP")
    assert other.provider == "ecb" and api.calls == 1              # the breaker spares it
    # while exchangerate.host is down, the reader answers from ecb's table in memory
    assert book.peek(MAY_18, "USD") is table
    assert book.peek(MAY_18, "UAH") is None   # get() may find a stale one in the cache
    uah = timed(book.get, MAY_18, "UAH")[1]    # ecb has no UAH, exchangerate.host is down:
    assert "exchangerate.host is down (monthly request quota exhausted)" in uah.reason
    assert book.lanes["exchangerate.host"].breaker.state == "open"


def test_a_currency_missing_from_the_first_table_comes_from_the_next_provider(
        api, cache, clock, open_book):
    book = open_book(cache, "frankfurter,exchangerate.host", frankfurter=api, ehost=api)
    assert book.get(MAY_18, "USD").provider == "frankfurter"
    assert api.calls_by_endpoint == {"frankfurter.range": 1}
    uah = book.get(MAY_18, "UAH")
    assert uah.provider == "exchangerate.host" and uah.rate("UAH") > 30
    assert api.calls_by_endpoint["exchangerate.host.historical"] == 1
    assert book.peek(MAY_18, "UAH") is uah
    assert book.peek(MAY_18, "USD").provider == "frankfurter"
    with pytest.raises(UnsupportedCurrency):      # nobody quotes it: the first table says so
        book.get(MAY_18, "XYZ").rate("XYZ")


# --- month fetches -------------------------------------------------------------------------

def test_concurrent_misses_in_a_month_share_one_range_call_weekends_map_back(
        api, cache, clock, open_book):
    book = open_book(cache, frankfurter=api)
    may = [datetime.date(2021, 5, d) for d in range(1, 32)]
    waiters = [gevent.spawn(book.get, day) for day in may for _ in range(3)]
    gevent.joinall(waiters, timeout=10, raise_error=True)
    assert api.calls_by_endpoint == {"frankfurter.range": 1}
    tables = {g.value.day: g.value for g in waiters}
    assert sorted(tables) == may
    # Saturday 1 and Sunday 2 May take Friday 30 April's publication, from the same call
    assert tables[may[0]].published == tables[may[1]].published == datetime.date(2021, 4, 30)
    assert tables[may[2]].published == datetime.date(2021, 5, 3)
    assert tables[datetime.date(2021, 5, 9)].published == datetime.date(2021, 5, 7)
    assert tables[MAY_18].rate("USD") == Decimal("1.2222")
    # every day of the month is now in memory: no more calls
    assert all(book.peek(day) is not None for day in may)


def test_today_still_uses_the_single_day_endpoint(api, cache, clock, open_book):
    book = open_book(cache, frankfurter=api)
    today = datetime.datetime.now(datetime.UTC).date()
    book.get(today)
    assert api.calls_by_endpoint == {"frankfurter.latest": 1}


def test_ecb_fetches_a_month_after_its_bundle_ends(api, cache, clock, open_book, bundle):
    day = bundle.last_day + datetime.timedelta(days=3)
    if day >= datetime.datetime.now(datetime.UTC).date():
        pytest.skip("the bundled history reaches today: no day after it in the past")
    book = open_book(cache, "ecb", frankfurter=api)
    assert book.get(bundle.last_day).provider == "ecb" and api.calls == 0   # offline
    table = book.get(day)
    weekday = day - datetime.timedelta(days=max(day.weekday() - 4, 0))  # the fake's dating
    assert (table.provider, table.published) == ("ecb", max(weekday, bundle.last_day))
    assert api.calls_by_endpoint == {"frankfurter.range": 1}


# --- the fetch path ------------------------------------------------------------------------

def test_fetch_concurrency_bounds_the_calls_a_provider_gets(api, cache, clock, open_book):
    api.latency_s = 0.1
    book = open_book(cache, "exchangerate.host", ehost=api, fetch_concurrency=3)
    days = [MAY_18 + datetime.timedelta(days=n) for n in range(12)]
    waiters = [gevent.spawn(book.get, day) for day in days for _ in range(5)]
    gevent.joinall(waiters, timeout=10, raise_error=True)
    assert api.calls == 12 and api.max_concurrent == 3
    assert book.lanes["exchangerate.host"].attempts == 12


def test_a_waiter_queued_behind_slow_fetches_gets_its_table_not_an_error(
        api, cache, clock, open_book):
    # Concurrency 1, 0.8 s a fetch: the fourth day's fetch starts about 2.4 s after the
    # call, past the 2 s a request may wait for ITS fetch: queueing is not failure.
    api.latency_s = 0.8
    book = open_book(cache, "exchangerate.host", ehost=api, fetch_concurrency=1)
    days = [MAY_18 + datetime.timedelta(days=n) for n in range(4)]
    waits = [gevent.spawn(timed, book.get, day) for day in days]
    gevent.joinall(waits, timeout=15)
    assert [g.value[1].day for g in waits] == days
    assert api.calls == 4


def test_a_waiter_holding_a_stale_table_does_not_queue_past_its_budget(
        api, cache, clock, open_book):
    book = open_book(cache, "exchangerate.host", ehost=api, fetch_concurrency=1)
    assert book.get(MAY_18).day == MAY_18
    clock.advance(TTL_S + 60)                      # stale now
    api.latency_s = 0.8                            # four other days queue ahead: ~3.2 s
    others = [gevent.spawn(book.get, MAY_18 + datetime.timedelta(days=n)) for n in range(1, 5)]
    gevent.sleep(0.05)
    table = book.get(MAY_18)                       # its refetch is fifth in the queue
    assert table.day == MAY_18 and book.stale_served == 1
    gevent.joinall(others, timeout=15)
    assert all(g.value is not None and g.value.day for g in others)


def test_a_waiter_whose_own_fetch_overruns_the_budget_is_told_so_and_its_table_still_lands(
        api, cache, clock, open_book):
    api.latency_s = 0.8   # within the HTTP budget (1 s), past what a request waits (0.4 s)
    book = open_book(cache, "exchangerate.host", ehost=api, fetch_concurrency=1)
    book.wait_s = 0.4
    _, error = timed(book.get, MAY_18)
    assert "exchangerate.host did not answer for 2021-05-18 within" in error.reason
    assert wait_for(lambda: book.peek(MAY_18), 5)   # nothing thrown away
    assert api.calls == 1


# --- budgets -------------------------------------------------------------------------------

def test_waiters_are_released_before_a_slow_cache_write(api, cache, clock, open_book):
    slow = SlowCache(cache, write_s=3.0)
    book = open_book(slow, frankfurter=api)
    elapsed, table = timed(book.get, MAY_18)
    # answered before the 3 s write finished (nothing written yet: an order, not a time),
    # and without waiting for most of it either
    assert table.day == MAY_18 and slow.written == []
    assert elapsed < 2.0, elapsed
    assert book.peek(datetime.date(2021, 5, 20)) is not None   # the whole month, in memory
    assert wait_for(lambda: cache.get("frankfurter", MAY_18) is not None, 10)


@pytest.mark.parametrize("read_s", [0.0, 5.0], ids=["fast-read", "slow-read"])
@pytest.mark.parametrize("write_s", [0.0, 5.0], ids=["fast-write", "slow-write"])
@pytest.mark.parametrize("latency_s", [0.0, 10.0], ids=["fast-api", "slow-api"])
def test_a_request_never_waits_past_the_budget_whatever_the_tiers_and_the_api_do(
        api, cache, clock, open_book, read_s, write_s, latency_s):
    api.latency_s = latency_s
    book = open_book(SlowCache(cache, read_s=read_s, write_s=write_s), frankfurter=api)
    waits = [gevent.spawn(timed, book.get, MAY_18 + datetime.timedelta(days=n))
             for n in range(0, 40, 4)]
    gevent.joinall(waits, timeout=15)
    results = [g.value for g in waits]
    assert max(dt for dt, _ in results) < BUDGET_S + WAIT_MARGIN_S + 0.3, results
    outcomes = {type(value) for _, value in results}
    if latency_s == 0:
        assert all(value.day for _, value in results), results   # a slow cache costs nothing
    else:
        assert outcomes == {RateUnavailable}
        assert all("did not answer" in value.reason or "timed out" in value.reason
                   for _, value in results), results


def wait_for(predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(0.05)
    return False


def test_closing_the_book_releases_waiters_still_queued(api, cache, clock, open_book):
    api.latency_s = 0.5
    book = open_book(cache, "exchangerate.host", ehost=api, fetch_concurrency=1)
    waits = [gevent.spawn(timed, book.get, MAY_18 + datetime.timedelta(days=n))
             for n in range(4)]
    assert wait_for(lambda: api.calls == 1, 5)     # one fetching, three queued
    book.close()
    gevent.joinall(waits, timeout=5)
    assert all(g.ready() for g in waits)
    assert any("shutting down" in str(g.value[1]) for g in waits)
