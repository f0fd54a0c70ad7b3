"""Rate providers over real HTTP: FakeRateApi on 127.0.0.1, faults injected at run time.

Nothing here mocks a socket or an HTTP exchange; the only stand-in is the API itself.
"""

import contextlib
import datetime
import io
import logging
import time
from decimal import Decimal

import pytest
import requests
from gevent.pywsgi import WSGIServer

from exrate_green import Settings
from exrate_green.errors import ConfigError, DateOutOfRange, RateUnavailable
from exrate_green.rates import (
    EcbProvider,
    ExchangerateHostProvider,
    FrankfurterProvider,
    HttpClient,
    HttpError,
    cross_rates,
    make_provider,
)
from exrate_green.rates.ecb_bundle import EcbBundle
from exrate_green.rates.http import utc_today
from exrate_green.redact import RedactingFormatter, redact
from exrate_green.simulator.fake_rates import FakeRateApi

pytestmark = pytest.mark.timeout(10)

KEY = "s3cret-access-key-0123456789abcdef"
MAY_18 = datetime.date(2021, 5, 18)       # a Tuesday
SUNDAY = datetime.date(2021, 5, 16)       # its Friday publication is 2021-05-14


@pytest.fixture(scope="module")
def bundle():
    return EcbBundle()


@pytest.fixture
def api(bundle):
    with FakeRateApi(access_key=KEY, bundle=bundle) as fake:
        yield fake


def settings_for(api, **changes):
    values = {"provider": "exchangerate.host", "access_key": KEY, "http_timeout_s": 5.0,
              "frankfurter_url": api.url + "/v1", "exchangerate_host_url": api.url}
    values.update(changes)
    return Settings(**values)


@pytest.fixture
def open_provider(api):
    """``open_provider(**settings)``: a provider against ``api``, closed after the test."""
    providers = []

    def open_(**changes):
        provider = make_provider(settings_for(api, **changes))
        providers.append(provider)
        return provider

    yield open_
    for provider in providers:
        provider.close()


@contextlib.contextmanager
def elapsed():
    took = [None]
    start = time.monotonic()
    try:
        yield took
    finally:
        took[0] = time.monotonic() - start


# --- exchangerate.host: cross rates --------------------------------------------------

def test_cross_rates_put_every_quote_per_euro_exactly():
    quotes = {"USDEUR": Decimal("0.82"), "USDGBP": Decimal("0.71"), "USDUAH": Decimal("27.5"),
              "USDBTC": Decimal("0.000017"), "USDUSD": 1}
    rates = cross_rates("USD", quotes)
    assert rates == {
        "EUR": Decimal("1"),
        "GBP": Decimal("0.8658536585365853658536585366"),      # 0.71 / 0.82
        "UAH": Decimal("33.53658536585365853658536585"),       # 27.5 / 0.82
        "BTC": Decimal("0.00002073170731707317073170731707"),  # 0.000017 / 0.82
        "USD": Decimal("1.219512195121951219512195122"),       # 1 / 0.82
    }
    assert all(isinstance(rate, Decimal) for rate in rates.values())


def test_cross_rates_need_the_source_to_euro_quote():
    with pytest.raises(RateUnavailable, match="no USDEUR quote"):
        cross_rates("USD", {"USDGBP": Decimal("0.71")})


def test_exchangerate_host_table_is_crossed_from_the_served_quotes(api, open_provider):
    raw = requests.get(f"{api.url}/historical", params={"access_key": KEY, "date": "2021-05-18"},
                       timeout=5).json(parse_float=Decimal)
    # ECB 2021-05-18: USD 1.2222, GBP 0.85998 per EUR, quoted from USD to 7 digits
    assert raw["quotes"]["USDEUR"] == Decimal("0.8181967")
    assert raw["quotes"]["USDGBP"] == Decimal("0.7036328")
    api.reset()

    table = open_provider().fetch(MAY_18)

    assert (table.provider, table.day, table.published) == ("exchangerate.host", MAY_18, MAY_18)
    assert table.rates["GBP"] == Decimal("0.8599800023637347840684275554")
    assert table.rates["USD"] == Decimal("1.222199991762372055521612346")
    assert table.rates["EUR"] == 1
    assert {"UAH", "BTC", "ZWL"} <= set(table.rates)  # not ECB currencies
    assert api.calls_by_day == {MAY_18: 1}


def test_exchangerate_host_asks_live_for_today(api, open_provider):
    today = utc_today()
    table = open_provider().fetch(today)
    assert table.day == today and table.published <= today
    assert api.calls_by_day == {today: 1}


def test_exchangerate_host_error_reply_becomes_rate_unavailable(api, open_provider):
    api.fail_next(1, "api_error")
    with pytest.raises(RateUnavailable) as caught:
        open_provider().fetch(MAY_18)
    assert caught.value.why.startswith("exchangerate.host error 104 (usage_limit_reached): ")
    assert api.calls == 1  # an API's refusal is not retried


# --- Frankfurter ---------------------------------------------------------------------

def test_frankfurter_gives_fridays_publication_on_a_sunday(api, open_provider, bundle):
    table = open_provider(provider="frankfurter").fetch(SUNDAY)
    assert (table.provider, table.day, table.published) == (
        "frankfurter", SUNDAY, datetime.date(2021, 5, 14))
    assert table.rates == bundle.table(datetime.date(2021, 5, 14)).rates
    assert table.rates["GBP"] == Decimal("0.86083")  # the ECB's own figure, not a float
    assert api.calls_by_day == {SUNDAY: 1}


def test_frankfurter_asks_latest_for_today(api, open_provider, bundle):
    today = utc_today()
    table = open_provider(provider="frankfurter").fetch(today)
    assert today - datetime.timedelta(days=7) <= table.published <= today
    assert api.calls_by_day == {today: 1}


def test_frankfurter_refuses_days_before_the_first_publication_without_asking(
        api, open_provider):
    with pytest.raises(DateOutOfRange):
        open_provider(provider="frankfurter").fetch(datetime.date(1998, 12, 31))
    assert api.calls == 0


def test_frankfurter_http_error_names_status_and_host(api):
    with HttpClient(settings_for(api)) as http:
        provider = FrankfurterProvider(http, api.url + "/not-frankfurter")
        with pytest.raises(HttpError) as caught:
            provider.fetch(MAY_18)
    assert caught.value.status == 404
    assert caught.value.why == f"HTTP 404 from 127.0.0.1:{api.url.rsplit(':', 1)[1]}: not found"


@contextlib.contextmanager
def canned_api(body):
    """A one-answer HTTP server for shapes FakeRateApi never serves."""
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.stop(timeout=0.5)


@pytest.mark.parametrize("body, why", [
    (b'{"amount":1.0,"base":"USD","date":"2021-05-18","rates":{"EUR":0.8}}',
     "Frankfurter answered with base 'USD', not 'EUR'"),
    (b'{"amount":1.0,"base":"EUR","date":"2021-05-18"}',
     "unexpected answer from Frankfurter: no 'rates' object"),
    (b'[1, 2, 3]', "unexpected answer from Frankfurter: no 'rates' object"),
    (b'{"amount":1.0,"base":"EUR","date":"2021-05-19","rates":{"USD":1.2}}',
     "frankfurter answered a publication of 2021-05-19 for 2021-05-18"),
    (b'{"amount":1.0,"base":"EUR","date":"2021-05-18","rates":{"USD":NaN}}',
     "invalid JSON from 127.0.0.1"),
])
def test_frankfurter_refuses_wrong_shapes(api, body, why):
    with canned_api(body) as url, HttpClient(settings_for(api)) as http:
        with pytest.raises(RateUnavailable) as caught:
            FrankfurterProvider(http, url).fetch(MAY_18)
    assert caught.value.why.startswith(why)


# --- HTTP faults and the budget --------------------------------------------------------

def test_a_500_is_retried(api, open_provider):
    api.fail_next(1, "500")
    table = open_provider().fetch(MAY_18)
    assert table.rates["EUR"] == 1
    assert api.calls == 2


def test_a_429_waits_its_retry_after(api, open_provider):
    api.fail_next(1, "429")
    with elapsed() as took:
        open_provider(provider="frankfurter").fetch(MAY_18)
    assert 0.95 <= took[0] < 2.0  # Retry-After: 1, then one quick answer
    assert api.calls == 2


def test_a_hang_ends_within_the_budget(api, open_provider):
    api.fail_next(1, "hang")
    with elapsed() as took, pytest.raises(RateUnavailable) as caught:
        open_provider(http_timeout_s=1.0).fetch(MAY_18)
    assert took[0] < 1.5
    assert caught.value.why.startswith("timed out after 1.0 s waiting for 127.0.0.1:")


def test_a_slow_api_is_bounded_by_the_same_budget(api, open_provider):
    api.latency_s = 3.0  # changed at run time, on every request
    with elapsed() as took, pytest.raises(RateUnavailable, match="timed out after 0.5 s"):
        open_provider(http_timeout_s=0.5).fetch(MAY_18)
    assert took[0] < 1.0
    api.latency_s = 0.0
    assert open_provider().fetch(MAY_18).rates["EUR"] == 1


def test_bad_json_is_not_retried(api, open_provider):
    api.fail_next(1, "bad_json")
    with pytest.raises(RateUnavailable) as caught:
        open_provider().fetch(MAY_18)
    assert caught.value.why.startswith("invalid JSON from 127.0.0.1:")
    assert api.calls == 1


def test_no_retry_when_retry_after_would_pass_the_budget(api, open_provider):
    api.fail_next(5, "429")
    with elapsed() as took, pytest.raises(RateUnavailable) as caught:
        open_provider(http_timeout_s=1.5).fetch(MAY_18)
    # 429, wait 1 s, 429 again with 0.5 s left: giving up beats sleeping past the deadline
    assert api.calls == 2
    assert took[0] < 1.4
    assert caught.value.why.startswith("HTTP 429 from 127.0.0.1:")
    assert "gave up after 2 attempts" in caught.value.why


def test_persistent_500s_stop_after_the_last_attempt(api, open_provider):
    api.fail_next(10, "500")
    with elapsed() as took, pytest.raises(RateUnavailable, match="HTTP 500 from 127.0.0.1"):
        open_provider().fetch(MAY_18)
    assert api.calls == 4        # MAX_ATTEMPTS, backoff ~0.25 + 0.5 + 1.0 s at most
    assert took[0] < 2.5


def test_an_unreachable_api_fails_within_the_budget(api):
    with socket_nobody_listens_on() as port:
        settings = settings_for(api, exchangerate_host_url=f"http://127.0.0.1:{port}",
                                http_timeout_s=1.0)
        provider = make_provider(settings)
        with elapsed() as took, pytest.raises(RateUnavailable) as caught:
            provider.fetch(MAY_18)
        provider.close()
    assert took[0] < 1.5
    assert caught.value.why.startswith(f"cannot reach 127.0.0.1:{port}: Connection refused")
    assert KEY not in str(caught.value)  # requests' own message repeats the URL


@contextlib.contextmanager
def socket_nobody_listens_on():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port


# --- secrets -------------------------------------------------------------------------

def test_redact_masks_secrets_and_any_access_key_parameter():
    text = ("GET /live?access_key=abc%2Fdefghi&date=2021-05-18 key abc/defghi, "
            "other ?ACCESS_KEY=zzz9 and x")
    assert redact(text, ["abc/defghi", "", None]) == (
        "GET /live?access_key=***&date=2021-05-18 key ***, other ?ACCESS_KEY=*** and x")
    assert redact("nothing to hide", []) == "nothing to hide"


def test_the_key_never_leaves_through_errors_or_debug_logs(bundle):
    echoed, plain = io.StringIO(), io.StringIO()
    redacting = logging.StreamHandler(echoed)
    redacting.setFormatter(RedactingFormatter("%(name)s %(levelname)s %(message)s",
                                              secrets=[KEY]))
    control = logging.StreamHandler(plain)
    root, urllib3_log = logging.getLogger(), logging.getLogger("urllib3")
    old_level = urllib3_log.level
    root.addHandler(redacting)
    root.addHandler(control)
    urllib3_log.setLevel(logging.DEBUG)
    try:
        # The fake expects another key and echoes the request URL, ours included.
        with FakeRateApi(access_key="the-right-one", bundle=bundle) as api:
            provider = make_provider(settings_for(api))
            try:
                with pytest.raises(RateUnavailable) as caught:
                    provider.fetch(MAY_18)
                logging.getLogger("exrate_green.test").error(
                    "fetch failed: %s", caught.value, exc_info=caught.value)
            finally:
                provider.close()
    finally:
        root.removeHandler(redacting)
        root.removeHandler(control)
        urllib3_log.setLevel(old_level)

    error = caught.value
    assert error.why.startswith("exchangerate.host error 101 (invalid_access_key)")
    assert "access_key=***" in error.why  # the echo is there, the key is not
    for text in (str(error), repr(error), error.why, echoed.getvalue()):
        assert KEY not in text
    assert "/historical?access_key=***&date=2021-05-18" in echoed.getvalue()  # urllib3 DEBUG
    assert KEY in plain.getvalue()  # the control: without the formatter it would leak


# --- ecb and the choice of provider -----------------------------------------------------

def test_ecb_serves_bundled_days_offline_and_later_days_from_the_api(api, open_provider, bundle):
    provider = open_provider(provider="ecb")
    for day in (datetime.date(2021, 1, 4), MAY_18, SUNDAY, datetime.date(2021, 12, 31)):
        assert provider.needs_cache(day) is False
        table = provider.fetch(day)
        assert table.provider == "ecb" and table.day == day
    assert api.calls == 0

    later = bundle.last_day + datetime.timedelta(days=3)
    assert provider.needs_cache(later) is True
    table = provider.fetch(later)
    weekday = later - datetime.timedelta(days=max(later.weekday() - 4, 0))  # the fake's dating
    assert (table.provider, table.day) == ("ecb", later)
    assert table.published == max(weekday, bundle.last_day)
    assert table.rates == bundle.table(bundle.last_day).rates
    assert api.calls == 1


def test_make_provider_follows_the_settings(api):
    chosen = {}
    for name in ("ecb", "frankfurter", "exchangerate.host"):
        provider = make_provider(settings_for(api, provider=name))
        chosen[name] = (type(provider), provider.name)
        provider.close()
    assert chosen == {
        "ecb": (EcbProvider, "ecb"),
        "frankfurter": (FrankfurterProvider, "frankfurter"),
        "exchangerate.host": (ExchangerateHostProvider, "exchangerate.host"),
    }
    keyed = make_provider(Settings.load(environ={"EXCHANGE_ACCESS_KEY": KEY}))
    keyless = make_provider(Settings.load(environ={}))
    assert (keyed.name, keyless.name) == ("exchangerate.host", "ecb")
    assert KEY not in repr(keyed)
    keyed.close()
    keyless.close()
    with pytest.raises(ConfigError, match="unknown provider"):
        make_provider(Settings(provider="oanda"))
    with pytest.raises(ConfigError, match="EXCHANGE_ACCESS_KEY"):
        make_provider(Settings(provider="exchangerate.host"))
