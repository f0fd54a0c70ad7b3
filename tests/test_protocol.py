"""The pure protocol functions: parsing, validation, conversion figures, reply shapes."""

import datetime
import json
import re
from decimal import Decimal

import pytest

from exrate_green import protocol
from exrate_green.errors import ProtocolError
from exrate_green.rates.ecb_bundle import EcbBundle

TODAY = datetime.date(2026, 11, 24)
STAMP = "2026-11-24T10:11:12.345Z"


def request(**payload):
    body = {"marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 253.67,
            "currency": "USD", "date": "2021-05-18T21:32:42.324Z"}
    body.update(payload)
    return json.dumps({"type": "message", "id": 456, "payload": body}).encode()


def reason_of(data):
    with pytest.raises(ProtocolError) as caught:
        protocol.parse(data, TODAY)
    return caught.value.request_id, caught.value.reason


@pytest.fixture(scope="module")
def ecb():
    return EcbBundle()


def test_parses_the_documented_request():
    parsed = protocol.parse(request(), TODAY)
    assert parsed.id == 456
    assert parsed.stake == Decimal("253.67")
    assert parsed.currency == "USD"
    assert parsed.day == datetime.date(2021, 5, 18)


def test_heartbeat_is_none():
    assert protocol.parse(b'{"type":"heartbeat"}', TODAY) is None


@pytest.mark.parametrize("day, currency, stake, expected", [
    # 2021-05-18: USD 1.2222, GBP 0.85998 (ECB reference rates); figures by hand
    ("2021-05-18T21:32:42.324Z", "USD", 253.67, "207.55196"),  # 207.551955... rounds up
    ("2021-05-18T00:00:00.000Z", "USD", 100, "81.81967"),
    ("2021-05-18T12:00:00.000Z", "GBP", 1000, "1162.81774"),
    # Saturday and Sunday take Friday 2021-05-14's USD 1.2123
    ("2021-05-15T10:00:00.000Z", "USD", 1212.3, "1000.00000"),
    ("2021-05-16T23:59:59.999Z", "USD", 121.23, "100.00000"),
    # Christmas Day 2020 takes 2020-12-24 (USD 1.2193)
    ("2020-12-25T08:00:00.000Z", "USD", 12.193, "10.00000"),
    ("2021-05-18T21:32:42.324Z", "EUR", 18.2, "18.20000"),
])
def test_conversion_figures_against_ecb(ecb, day, currency, stake, expected):
    parsed = protocol.parse(request(date=day, currency=currency, stake=stake), TODAY)
    table = ecb.table(parsed.day)
    assert protocol.convert(parsed.stake, table.rate(parsed.currency)) == Decimal(expected)


def test_rounding_is_half_up_at_the_fifth_decimal(ecb):
    # 266.18066545 JPY / 133.09 = 2.000005 exactly: HALF_UP gives 2.00001, HALF_EVEN 2.00000
    table = ecb.table(datetime.date(2021, 5, 18))
    assert table.rate("JPY") == Decimal("133.09")
    parsed = protocol.parse(request(currency="JPY", stake=266.18066545), TODAY)
    assert protocol.convert(parsed.stake, table.rate("JPY")) == Decimal("2.00001")
    assert protocol.convert(Decimal("1.000005"), Decimal(1)) == Decimal("1.00001")
    assert protocol.convert(Decimal("1.0000049999"), Decimal(1)) == Decimal("1.00000")


def test_timezone_offsets_count_in_utc():
    parsed = protocol.parse(request(date="2021-05-18T23:30:00+02:00"), TODAY)
    assert parsed.day == datetime.date(2021, 5, 18)
    parsed = protocol.parse(request(date="2021-05-18T23:30:00-02:00"), TODAY)
    assert parsed.day == datetime.date(2021, 5, 19)


def test_reply_keeps_every_payload_field():
    parsed = protocol.parse(request(extra={"nested": [1, 2]}), TODAY)
    reply = json.loads(protocol.reply(parsed, Decimal("207.55196"), STAMP))
    assert reply == {"type": "message", "id": 456, "payload": {
        "marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 207.55196,
        "currency": "EUR", "date": STAMP, "extra": {"nested": [1, 2]}}}
    raw = protocol.reply(parsed, Decimal("18.20000"), STAMP)
    assert b'"stake":18.20000,' in raw  # a JSON number, never a string


def test_error_reply_shape():
    assert json.loads(protocol.error_reply(7, "unsupported currency 'ZWL'")) == {
        "type": "error", "id": 7,
        "message": "Unable to convert stake. Error: unsupported currency 'ZWL'"}


def test_timestamp_format():
    moment = datetime.datetime(2021, 5, 18, 21, 32, 42, 412999, tzinfo=datetime.UTC)
    assert protocol.timestamp(moment) == "2021-05-18T21:32:42.412Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", protocol.timestamp(
        datetime.datetime.now(datetime.UTC)))


@pytest.mark.parametrize("data, reason", [
    (request(stake=None), "missing field 'stake'"),
    (request(currency=None), "missing field 'currency'"),
    (request(date=None), "missing field 'date'"),
    (request(stake="253.67"), "stake must be a number, got '253.67'"),
    (request(stake=True), "stake must be a number, got 'true'"),
    (request(stake=-1), "stake must not be negative"),
    (request(stake=1e300), "stake must not exceed 1000000000000"),
    (request(currency="US"), "invalid currency 'US'"),
    (request(currency="EURO"), "invalid currency 'EURO'"),
    (request(currency="U$D"), "invalid currency 'U$D'"),
    (request(currency=840), "currency must be a string, got '840'"),
    (request(date="x"), "invalid date 'x'"),
    (request(date="2021-02-30T00:00:00Z"), "invalid date '2021-02-30T00:00:00Z'"),
    (request(date=20210518), "date must be a string, got '20210518'"),
    (request(date="2999-01-01T00:00:00Z"), "date '2999-01-01T00:00:00Z' is in the future"),
    (request().replace(b'"stake": 253.67', b'"stake": NaN'), "stake must be a finite number"),
    (request().replace(b'"stake": 253.67', b'"stake": -Infinity'), "stake must be a finite number"),
    (request().replace(b'"stake": 253.67', b'"stake": 1e999'),
     "stake must not exceed 1000000000000"),
    (request().replace(b'"odds": 2.2', b'"odds": NaN'), "odds must be a finite number"),
    (b'{"type":"message","id":456}', "missing field 'payload'"),
    (b'{"type":"message","id":456,"payload":[1]}', "payload must be an object"),
    (b'{"type":"bet","id":456}', "unknown message type 'bet'"),
])
def test_every_error_reason_reaches_the_request_id(data, reason):
    assert reason_of(data) == (456, reason)


@pytest.mark.parametrize("data", [
    b"not json", b"\xff\xfe", b"[]", b"42", b'"text"', b"{}",
    b'{"type":"message","payload":{"stake":1,"currency":"USD","date":"2021-01-01"}}',
    b'{"type":"message","id":{"a":1},"payload":{"stake":1,"currency":"USD","date":"2021-01-01"}}',
    b'{"type":"message","id":true,"payload":{}}',
    b"[" * 100_000,
])
def test_messages_without_a_usable_id_are_refused_without_one(data):
    request_id, reason = reason_of(data)
    assert request_id is None and reason


def test_error_reasons_are_truncated():
    _, reason = reason_of(request(currency="X" * 10_000))
    assert len(reason) < 100


def test_far_future_allows_one_day_of_clock_skew():
    tomorrow = TODAY + datetime.timedelta(1)
    assert protocol.parse(request(date="2026-11-25T23:00:00Z"), TODAY).day == tomorrow


def test_a_currency_code_with_a_trailing_newline_is_refused_by_requests_and_providers():
    from exrate_green.rates import http
    from exrate_green.rates.checks import ImplausibleAnswer, checked_rates

    with pytest.raises(ProtocolError, match="invalid currency"):
        protocol.read_currency("USD\n")
    assert protocol.read_currency("usd") == "USD"
    for bad in ("USD\n", "US", "USDX", "ßSD", " USD", None):
        assert not protocol.is_currency_code(bad), bad
        with pytest.raises(ProtocolError):
            protocol.read_currency(bad)
    assert http.is_currency_code is protocol.is_currency_code   # one validator
    day = datetime.date(2021, 5, 18)
    assert checked_rates({"GBP": 0.9}, "test", day) == {"GBP": Decimal("0.9"), "EUR": Decimal(1)}
    with pytest.raises(ImplausibleAnswer, match="implausible rate"):
        checked_rates({"USD\n": 1.2, "GBP": 0.9}, "test", day)
