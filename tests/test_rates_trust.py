"""A rate API's answer is checked against the question before it is used or cached.

Each case runs the rate book (real disk cache in a temporary directory) against a raw
loopback socket that sends the exact bytes of a lying, broken or redirecting API, and
asserts the reply, the log line, and what is (not) cached afterwards.
"""

import datetime
import logging
import ssl
import time
import urllib.parse
import zlib

import pytest
import trustme

from exrate_green.cache import TableCache, TieredCache
from exrate_green.config import Settings
from exrate_green.errors import RateUnavailable
from exrate_green.rates.book import RateBook
from exrate_green.rates.ecb_bundle import EcbBundle
from exrate_green.rates.http import HttpClient, utc_today
from exrate_green.rates.providers import make_providers

from .raw_api import RawApi, redirect, response
from .support import wait_until

pytestmark = pytest.mark.timeout(60)

TTL_S = 7200.0
STALE_S = 604800.0
KEY = "k3y-that-must-not-travel"
DEC_15 = datetime.date(2010, 12, 15)   # a Wednesday; its month is asked as 2010-11-24..2010-12-31


@pytest.fixture(scope="module")
def bundle():
    b = EcbBundle()
    b.load()
    return b


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


@pytest.fixture
def open_book(tmp_path):
    """``open_book(url, provider=...)`` -> (book, cache, clock), closed after the test."""
    opened = []

    def open_(url, provider="frankfurter", **changes):
        settings = Settings(provider=provider, access_key=KEY, frankfurter_url=url + "/v1",
                            exchangerate_host_url=url, http_timeout_s=3.0,
                            **changes)
        disk = TableCache(tmp_path / "cache", TTL_S, stale_s=STALE_S)
        cache = TieredCache(disk)
        cache.open()
        http = HttpClient(settings)
        clock = Clock()
        book = RateBook(make_providers(settings, http), cache, ttl_s=TTL_S, stale_s=STALE_S,
                        http_timeout_s=settings.http_timeout_s, concurrency=2, clock=clock)
        opened.append((book, cache, http))
        return book, cache, clock

    yield open_
    for book, cache, http in opened:
        book.close()
        cache.close()
        http.close()


# --- honest answers, built from the bundled ECB history --------------------------------

def frankfurter_answer(bundle, target):
    """What a correct Frankfurter answers to ``target`` (a day or a range)."""
    path = urllib.parse.urlsplit(target).path.rsplit("/", 1)[-1]
    if ".." in path:
        start, end = (datetime.date.fromisoformat(p) for p in path.split(".."))
        rates = {day.isoformat(): _plain(bundle.table(day).rates)
                 for day in bundle.publications(start, end)}
        return {"amount": 1.0, "base": "EUR", "start_date": start.isoformat(),
                "end_date": end.isoformat(), "rates": rates}
    day = utc_today() if path == "latest" else datetime.date.fromisoformat(path)
    table = bundle.table(min(day, bundle.last_day))
    return {"amount": 1.0, "base": "EUR", "date": table.published.isoformat(),
            "rates": _plain(table.rates)}


def exchangerate_host_answer(bundle, day):
    rates = bundle.table(day).rates
    usd = rates["USD"]
    return {"success": True, "historical": True, "date": day.isoformat(), "source": "USD",
            "quotes": {f"USD{code}": float(rate / usd) for code, rate in rates.items()}}


def _plain(rates):
    return {code: float(rate) for code, rate in rates.items() if code != "EUR"}


def usd(bundle, day):
    return bundle.table(day).rates["USD"]


def failures(caplog, key):
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and f"fetching {key} failed" in r.getMessage()]


# --- publication dates -----------------------------------------------------------------

def test_a_month_answer_dated_a_decade_early_is_refused_named_and_never_cached(
        open_book, bundle, caplog):
    lie = {"amount": 1.0, "base": "EUR", "start_date": "2000-01-03", "end_date": "2000-01-03",
           "rates": {"2000-01-03": _plain(bundle.table(datetime.date(2000, 1, 3)).rates)}}
    with RawApi(lambda target: response(lie)) as api:
        book, cache, _ = open_book(api.origin)
        with pytest.raises(RateUnavailable) as caught:
            book.get(DEC_15, "USD")
    assert "frankfurter answered a publication of 2000-01-03 for 2010-11-24..2010-12-31" \
        in str(caught.value)
    assert len(failures(caplog, "2010-12")) == 1
    assert cache.get("frankfurter", DEC_15) is None


def test_an_empty_month_answer_cannot_stretch_one_days_table_over_the_month(
        open_book, bundle):
    def answer(target):
        if ".." in target:   # the month: no publication at all
            return response({"amount": 1.0, "base": "EUR", "start_date": "2010-11-24",
                             "end_date": "2010-12-31", "rates": {}})
        return response(frankfurter_answer(bundle, target))   # honest single days

    with RawApi(answer) as api:
        book, cache, _ = open_book(api.origin)
        with pytest.raises(RateUnavailable, match="frankfurter answered a publication of "
                                                  "2010-12-01 for 2010-12-09"):
            book.get(DEC_15, "USD")
    assert cache.get("frankfurter", datetime.date(2010, 12, 1)) is None


def test_a_single_day_answer_for_a_publication_after_the_day_asked_is_refused(
        open_book, bundle):
    today = utc_today()
    future = {"amount": 1.0, "base": "EUR", "date": "2030-01-01",
              "rates": _plain(bundle.table(DEC_15).rates)}
    with RawApi(lambda target: response(future)) as api:
        book, cache, _ = open_book(api.origin)
        with pytest.raises(RateUnavailable) as caught:
            book.get(today, "USD")
    assert f"frankfurter answered a publication of 2030-01-01 for {today}" in str(caught.value)
    assert cache.get("frankfurter", today) is None


@pytest.mark.parametrize("published", ["2030-01-01", "2000-01-03"])
def test_a_latest_answer_dated_far_from_today_is_refused(open_book, bundle, published):
    today = utc_today()
    answer = {"amount": 1.0, "base": "EUR", "date": published,
              "rates": _plain(bundle.table(DEC_15).rates)}
    with RawApi(lambda target: response(answer)) as api:
        book, cache, _ = open_book(api.origin)
        with pytest.raises(RateUnavailable, match=f"publication of {published} for {today}"):
            book.get(today, "USD")
        assert "/v1/latest" in api.requests[0]
    assert cache.get("frankfurter", today) is None


def test_an_exchangerate_host_answer_for_another_day_is_refused(open_book, bundle, caplog):
    answer = exchangerate_host_answer(bundle, datetime.date(2010, 12, 14))
    with RawApi(lambda target: response(answer)) as api:
        book, cache, _ = open_book(api.origin, provider="exchangerate.host")
        with pytest.raises(RateUnavailable,
                           match="exchangerate.host answered a publication of 2010-12-14 "
                                 "for 2010-12-15"):
            book.get(DEC_15, "USD")
    assert len(failures(caplog, "2010-12-15")) == 1
    assert cache.get("exchangerate.host", DEC_15) is None


@pytest.mark.parametrize("days_off", [3650, -30], ids=["ten-years-ahead", "a-month-old"])
def test_an_exchangerate_host_live_answer_stamped_far_from_today_is_refused(
        open_book, bundle, days_off):
    today = utc_today()
    stamp = datetime.datetime.combine(today + datetime.timedelta(days=days_off),
                                      datetime.time(12), datetime.UTC)
    answer = exchangerate_host_answer(bundle, DEC_15)
    del answer["date"], answer["historical"]
    answer["timestamp"] = int(stamp.timestamp())
    with RawApi(lambda target: response(answer)) as api:
        book, cache, _ = open_book(api.origin, provider="exchangerate.host")
        with pytest.raises(RateUnavailable, match=f"answered a publication of "
                                                  f"{stamp.date()} for {today}"):
            book.get(today, "USD")
        assert "/live?" in api.requests[0]
    assert cache.get("exchangerate.host", today) is None


# --- bad values --------------------------------------------------------------------------

BAD_VALUES = [b"0", b"-1.2", b"null", b'{"a":1}', b"true", b'"1.3"x', b"1e-999999",
              b"1e999", b"[]", b"0.0"]


@pytest.mark.parametrize("value", BAD_VALUES, ids=lambda v: v.decode())
def test_one_bad_frankfurter_rate_fails_the_fetch_and_the_currency_recovers(
        open_book, bundle, caplog, value):
    honest = {"answer": False}

    def answer(target):
        text = response(frankfurter_answer(bundle, target))
        if not honest["answer"]:
            text = _fix_length(text.replace(b'"USD": ', b'"USD": ' + value + b', "XXX": '))
        return text

    with RawApi(answer) as api:
        book, cache, _ = open_book(api.origin)
        with pytest.raises(RateUnavailable) as caught:
            book.get(DEC_15, "USD")
        assert str(caught.value).startswith("exchange rate service unavailable: ")
        assert "unsupported" not in str(caught.value)
        assert len(failures(caplog, "2010-12")) == 1   # one warning for the fetch
        assert cache.get("frankfurter", DEC_15) is None
        honest["answer"] = True
        assert book.get(DEC_15, "USD").rates["USD"] == usd(bundle, DEC_15)


@pytest.mark.parametrize("value", BAD_VALUES, ids=lambda v: v.decode())
def test_one_bad_exchangerate_host_quote_fails_the_fetch_and_the_currency_recovers(
        open_book, bundle, caplog, value):
    honest = {"answer": False}

    def answer(target):
        text = response(exchangerate_host_answer(bundle, DEC_15))
        if not honest["answer"]:
            text = _fix_length(text.replace(b'"USDGBP": ', b'"USDGBP": ' + value
                                            + b', "USDXXX": '))
        return text

    with RawApi(answer) as api:
        book, cache, _ = open_book(api.origin, provider="exchangerate.host")
        with pytest.raises(RateUnavailable) as caught:
            book.get(DEC_15, "GBP")
        assert "unsupported" not in str(caught.value)
        assert len(failures(caplog, "2010-12-15")) == 1
        assert cache.get("exchangerate.host", DEC_15) is None
        honest["answer"] = True
        rates = book.get(DEC_15, "GBP").rates
        assert abs(rates["GBP"] - bundle.table(DEC_15).rates["GBP"]) < 1e-9


def _fix_length(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.startswith(b"Content-Length")]
    return b"\r\n".join(lines + [b"Content-Length: %d" % len(body)]) + b"\r\n\r\n" + body


def test_a_lying_answer_falls_back_to_the_stale_table_held(open_book, bundle):
    lying = {"on": False}

    def answer(target):
        if lying["on"]:
            return response({"amount": 1.0, "base": "EUR", "start_date": "2000-01-03",
                             "end_date": "2000-01-03", "rates": {"2000-01-03": {"USD": 1.0}}})
        return response(frankfurter_answer(bundle, target))

    with RawApi(answer) as api:
        book, cache, clock = open_book(api.origin)
        assert book.get(DEC_15, "USD").rates["USD"] == usd(bundle, DEC_15)
        clock.now += TTL_S + 60   # stale now
        lying["on"] = True
        table = book.get(DEC_15, "USD")
        assert table.rates["USD"] == usd(bundle, DEC_15)
        assert table.published == datetime.date(2010, 12, 15)
        assert book.stale_served == 1


def test_a_lying_answer_falls_back_to_the_next_provider_of_the_chain(open_book, bundle):
    lie = {"amount": 1.0, "base": "EUR", "date": "2000-01-03", "rates": {"USD": 1.0}}
    with RawApi(lambda target: response(lie)) as api:
        book, cache, _ = open_book(api.origin, provider="exchangerate.host,ecb")
        table = book.get(DEC_15, "USD")
    assert (table.provider, table.rates["USD"]) == ("ecb", usd(bundle, DEC_15))
    assert cache.get("exchangerate.host", DEC_15) is None


# --- redirects -----------------------------------------------------------------------------

def test_a_redirect_to_another_origin_is_not_followed_and_the_key_never_reaches_it(
        open_book, bundle, caplog):
    with RawApi(lambda t: response(exchangerate_host_answer(bundle, DEC_15))) as elsewhere:
        with RawApi(lambda t: redirect(elsewhere.origin + t)) as api:
            book, cache, _ = open_book(api.origin, provider="exchangerate.host")
            with pytest.raises(RateUnavailable,
                               match=r"redirected to another origin \(127.0.0.1:\d+\): "
                                     r"not followed"):
                book.get(DEC_15, "USD")
    assert elsewhere.connections == 0
    assert cache.get("exchangerate.host", DEC_15) is None
    assert KEY not in caplog.text


def test_a_frankfurter_redirect_to_another_origin_is_not_followed(open_book, bundle):
    with RawApi(lambda t: response(frankfurter_answer(bundle, t))) as elsewhere:
        with RawApi(lambda t: redirect(elsewhere.origin + t, "301 Moved Permanently")) as api:
            book, cache, _ = open_book(api.origin)
            with pytest.raises(RateUnavailable, match="not followed"):
                book.get(DEC_15, "USD")
    assert elsewhere.connections == 0
    assert cache.get("frankfurter", DEC_15) is None


def test_a_downgrade_from_https_to_http_is_not_followed(open_book, bundle, tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with RawApi(lambda t: response(exchangerate_host_answer(bundle, DEC_15))) as plain:
        plain_port = plain.server.server_port
        with RawApi(lambda t: redirect(f"http://127.0.0.1:{plain_port}" + t),
                    tls=server_context) as api:
            book, cache, _ = open_book(api.origin, provider="exchangerate.host",
                                       ca_file=str(ca_file))
            with pytest.raises(RateUnavailable, match="redirected to plain http, a downgrade "
                                                      "from https: not followed"):
                book.get(DEC_15, "USD")
            assert len(api.requests) >= 1
    assert plain.connections == 0
    assert cache.get("exchangerate.host", DEC_15) is None


def test_a_redirect_within_the_origin_is_followed(open_book, bundle):
    def answer(target):
        if target.startswith("/old"):
            return redirect(target[len("/old"):])
        return response(exchangerate_host_answer(bundle, DEC_15))

    with RawApi(answer) as api:
        book, cache, _ = open_book(api.origin + "/old", provider="exchangerate.host")
        assert abs(book.get(DEC_15, "USD").rates["USD"] - usd(bundle, DEC_15)) < 1e-9
    assert [r.split(" ")[1].split("?")[0] for r in api.requests] == ["/old/historical",
                                                                       "/historical"]


# --- bytes ---------------------------------------------------------------------------------

def test_a_gzipped_answer_is_read_like_a_plain_one(open_book, bundle):
    with RawApi(lambda t: response(frankfurter_answer(bundle, t), gzipped=True)) as api:
        book, cache, _ = open_book(api.origin)
        assert book.get(DEC_15, "USD").rates["USD"] == usd(bundle, DEC_15)
    assert wait_until(lambda: cache.get("frankfurter", DEC_15), 5) is not None


def test_a_deeply_nested_answer_is_a_failed_fetch_without_a_traceback(open_book, caplog):
    deep = b'{"amount":1.0,"base":"EUR","rates":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with RawApi(lambda t: response(deep)) as api:
        book, cache, _ = open_book(api.origin)
        with pytest.raises(RateUnavailable, match="invalid JSON"):
            book.get(DEC_15, "USD")
    assert not any(r.exc_info for r in caplog.records)
    assert cache.get("frankfurter", DEC_15) is None


def gzip_bomb(megabytes):
    """``{"rates":"000..."}`` of ``megabytes`` MB, gzipped to about a thousandth of that."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)   # gzip framing
    mb = b"0" * 2**20
    return (packer.compress(b'{"rates":"') + b"".join(packer.compress(mb)
                                                     for _ in range(megabytes))
            + packer.compress(b'"}') + packer.flush())


BOMB = gzip_bomb(64)   # built at import: compressing is CPU the hub monitor would flag


def test_a_gzip_bomb_is_refused_past_the_size_bound_without_inflating_it(open_book):
    bomb = BOMB
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(bomb))
    with RawApi(lambda t: head + bomb) as api:
        book, cache, _ = open_book(api.origin)
        with pytest.raises(RateUnavailable, match="larger than 1048576 bytes"):
            book.get(DEC_15, "USD")
    assert cache.get("frankfurter", DEC_15) is None
