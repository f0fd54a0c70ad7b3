"""Hostile input, property-based (Hypothesis): protocol.py and the service's batch handler.

What is proved, for generated input (examples bounded so the module runs in seconds,
derandomized so CI sees the same examples every run):

* ``protocol.parse`` never raises anything but ``ProtocolError``, whatever the bytes;
* a message with a readable id (an integer of 64 bits or a string of at most 100
  characters) gets exactly one reply, a well-formed JSON object carrying that id; a
  heartbeat or a message without a readable id gets none (docs/design.md 2, "Bad input");
* ``Service.handle`` (the real one, with a real rate book over the bundled ECB history)
  keeps that promise too: one reply per request with an id, nothing raised;
* a currency or a date only ever leaves ``parse`` as ``^[A-Z]{3}$`` and a ``datetime.date``,
  the only forms the providers put in a URL (docs/design.md 3).
"""

import datetime
import json
import re
from decimal import Decimal
from pathlib import Path

import gevent
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exrate_green import protocol
from exrate_green.config import Settings
from exrate_green.errors import ProtocolError
from exrate_green.runtime import Runtime
from exrate_green.service import Service

TODAY = datetime.date(2026, 11, 24)
STAMP = "2026-11-24T10:11:12.345Z"
RATE = Decimal("1.2222")

PROPERTIES = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies ------------------------------------------------------------------------

# Python's json.dumps writes NaN/Infinity and lone surrogates ("\ud800"), which orjson
# refuses: those messages take the protocol's lenient path, the one most likely to let
# something unencodable through.
leaves = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "USD", "2021-05-18"]),
)
json_values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=6) | st.sampled_from(["\ud800", "stake", "date"]), inner, max_size=4),
    max_leaves=16)
ids = st.one_of(
    st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.sampled_from([0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, 2 ** 64, -2 ** 63 - 1]),
    st.text(max_size=110),
    st.sampled_from(["", "x" * 100, "x" * 101, "\ud800", "id-\udc00", "🙂"]),
    json_values,
)
stakes = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(min_value=0, max_value=1e13),
    json_values,
)
currencies = st.one_of(
    st.sampled_from(["USD", "usd", "GBP", "EUR", "ZWL", "XXX", "BTC", "US", "USDD", "../",
                     "U$D", "ＵＳＤ", "uß", "usı", "%55SD", "USD?access_key=x", "\ud800SD"]),
    st.text(max_size=5),
    json_values,
)
dates = st.one_of(
    st.dates(min_value=datetime.date(1990, 1, 1), max_value=datetime.date(2030, 1, 1))
    .map(datetime.date.isoformat),
    st.datetimes(min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 1, 1))
    .map(lambda d: d.isoformat() + "Z"),
    st.sampled_from(["2021-05-18T21:32:42.324Z", "2021-W20-2", "20210518", "yesterday",
                     "2021-13-45", "9999-12-31", "2021-05-18/../../x", "2021-05-18?x=1",
                     "2021-05-18T21:32:42.324+99:00", "\ud8002021-05-18",
                     "0001-01-01T00:00:00+01:00"]),
    st.text(max_size=45),
    json_values,
)
payloads = st.fixed_dictionaries({}, optional={
    "stake": stakes, "currency": currencies, "date": dates,
    "marketId": json_values, "odds": json_values, "extra": json_values})
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "message", "message", "heartbeat", "error"])
     | json_values},
    optional={"id": ids, "payload": payloads | json_values})


def encode(message):
    """Text as a careless (or hostile) producer writes it: NaN literals, lone surrogates."""
    return json.dumps(message, allow_nan=True).encode()


def readable_id(message):
    """The id a reply must carry, or None when the message must get no reply."""
    if type(message) is not dict or message.get("type") == "heartbeat":
        return None
    rid = message.get("id")
    if type(rid) is int and -2 ** 63 <= rid < 2 ** 64:
        return rid
    if type(rid) is str and len(rid) <= 100 and not re.search("[\ud800-\udfff]", rid):
        return rid
    return None


def respond(data):
    """The replies the protocol's contract gives for one frame (what ``Service.answer``
    does, with one fixed rate): a list of zero or one encoded frames."""
    try:
        request = protocol.parse(data, TODAY)
    except ProtocolError as e:
        return [] if e.request_id is None else [protocol.error_reply(e.request_id, e.reason)]
    if request is None:
        return []
    try:
        return [protocol.reply(request, protocol.convert(request.stake, RATE), STAMP)]
    except ProtocolError as e:
        return [protocol.error_reply(request.id, e.reason)]


def off_hub(prop):
    """Run a pure, CPU-bound property in a native thread. Hypothesis generates and shrinks
    for long stretches without yielding, which would hold this process's hub (conftest fails
    any test that blocks it); the test's greenlet waits for the thread cooperatively."""
    gevent.get_hub().threadpool.apply(prop)


def check_reply(frame, rid):
    decoded = orjson.loads(frame)  # a reply is always valid JSON (orjson is strict)
    assert decoded["id"] == rid and type(decoded["id"]) is type(rid)
    assert decoded["type"] in ("message", "error")
    if decoded["type"] == "error":
        assert decoded["message"].startswith(protocol.ERROR_PREFIX)
        assert len(decoded["message"]) < 300
    else:
        assert decoded["payload"]["currency"] == "EUR"
    return decoded


# -- protocol.parse and the replies ------------------------------------------------------

@PROPERTIES
@given(st.binary(max_size=300))
def prop_parse_of_any_bytes_raises_only_protocol_error(data):
    try:
        result = protocol.parse(data, TODAY)
    except ProtocolError as e:
        assert e.request_id is None or type(e.request_id) in (int, str)
    else:
        assert result is None or isinstance(result, protocol.Request)


def test_parse_of_any_bytes_raises_only_protocol_error():
    off_hub(prop_parse_of_any_bytes_raises_only_protocol_error)


@PROPERTIES
@given(st.text(alphabet='{}[]:,"\\ 0123456789.eE+-NaInfityrulsdmgp_', max_size=120))
def prop_parse_of_json_like_text_raises_only_protocol_error(text):
    for data in (text, text.encode()):
        try:
            protocol.parse(data, TODAY)
        except ProtocolError:
            pass


def test_parse_of_json_like_text_raises_only_protocol_error():
    off_hub(prop_parse_of_json_like_text_raises_only_protocol_error)


@PROPERTIES
@given(messages)
def prop_every_message_with_an_id_gets_exactly_one_well_formed_reply(message):
    replies = respond(encode(message))
    rid = readable_id(message)
    if rid is None:
        assert replies == []
    else:
        assert len(replies) == 1
        check_reply(replies[0], rid)


def test_every_message_with_an_id_gets_exactly_one_well_formed_reply():
    off_hub(prop_every_message_with_an_id_gets_exactly_one_well_formed_reply)


@PROPERTIES
@given(depth=st.integers(min_value=1, max_value=1100), container=st.sampled_from("[{"),
       where=st.sampled_from(["extra", "stake", "currency"]))
def prop_deep_nesting_gets_one_reply_or_is_skipped_never_a_crash(depth, container, where):
    inner = '{"k":' * depth + "1" + "}" * depth if container == "{" else "[" * depth + "]" * depth
    fields = {"stake": "12", "currency": '"USD"', "date": '"2021-05-18"', "extra": "0"}
    fields[where] = inner
    body = ",".join(f'"{k}":{v}' for k, v in fields.items())
    data = ('{"type":"message","id":77,"payload":{' + body + "}}").encode()
    replies = respond(data)
    # Python's own parser (the lenient path) gives up near its recursion limit: then no id
    # can be read and the message is skipped; below it, the request is answered.
    assert len(replies) <= 1
    if depth < 900:
        assert len(replies) == 1
    if replies:
        check_reply(replies[0], 77)


def test_deep_nesting_gets_one_reply_or_is_skipped_never_a_crash():
    off_hub(prop_deep_nesting_gets_one_reply_or_is_skipped_never_a_crash)


@PROPERTIES
@given(currency=currencies, date=dates)
def prop_only_validated_currency_and_date_leave_parse(currency, date):
    data = encode({"type": "message", "id": 1,
                   "payload": {"stake": 1, "currency": currency, "date": date}})
    try:
        request = protocol.parse(data, TODAY)
    except ProtocolError:
        return
    assert re.fullmatch(r"[A-Z]{3}", request.currency)
    assert type(request.day) is datetime.date
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", request.day.isoformat())
    assert request.day <= TODAY + protocol.MAX_FUTURE


def test_only_validated_currency_and_date_leave_parse():
    off_hub(prop_only_validated_currency_and_date_leave_parse)


# -- the service's batch handler, for real -----------------------------------------------

class _Reader:
    """What the session's reader does with a batch: ``dispatch.take`` (hot replies to
    delivery), the heartbeats counted, then ``dispatch.hold`` (waiting for room first).
    With no connection every reply lands in ``service.delivery.kept``."""

    heartbeats = 0

    def handle(self, service, frames):
        step = service.dispatch.take(frames)
        self.heartbeats += step.heartbeats
        service.dispatch.hold(step.waiting, step.started)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    # Days after the bundled history would go to Frankfurter: a closed local port answers
    # at once (connection refused), so those requests get an error reply, never a hang.
    settings = Settings(url="ws://127.0.0.1:9", provider="ecb",
                        frankfurter_url="http://127.0.0.1:9/v1", http_timeout_s=0.3,
                        cache_dir=Path(tmp_path_factory.mktemp("cache")))
    runtime = Runtime(settings)
    try:
        yield Service(settings, runtime.book)
    finally:
        runtime.close()


@settings(PROPERTIES, max_examples=150,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(messages, min_size=1, max_size=6))
def test_service_handle_answers_each_message_with_an_id_exactly_once(service, batch):
    # On the hub (the service is gevent code): each example yields at least once, so
    # Hypothesis's own work between examples never holds the hub for long.
    gevent.sleep(0)
    service.delivery.kept.clear()
    frames = [("text", encode(message)) for message in batch]
    _Reader().handle(service, frames)
    assert service.dispatch.waiting.join(timeout=5)
    got = [orjson.loads(reply) for _, reply, _ in service.delivery.kept]
    service.delivery.kept.clear()
    expected = [readable_id(m) for m in batch if readable_id(m) is not None]
    assert sorted(map(repr, (g["id"] for g in got))) == sorted(map(repr, expected))
    for reply in got:
        assert reply["type"] in ("message", "error")


def test_service_handle_survives_binary_and_oversize_events(service):
    service.delivery.kept.clear()
    request = (b'{"type":"message","id":5,"payload":'
               b'{"stake":1,"currency":"USD","date":"2021-05-18"}}')
    _Reader().handle(service, [("binary", request), ("binary", b"\xff\x00"),
                               ("oversize", 3 << 20), ("text", b"\xff\xfe"), ("text", request)])
    assert service.dispatch.waiting.join(timeout=5)
    got = [orjson.loads(reply) for _, reply, _ in service.delivery.kept]
    service.delivery.kept.clear()
    assert [(g["id"], g["type"]) for g in got] == [(5, "error"), (5, "message")]
    gevent.sleep(0)
