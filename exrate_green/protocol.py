"""The currency-assignment wire protocol: parse requests, build replies. Pure, no I/O.

Incoming text is parsed with orjson (which also validates UTF-8, so nothing decodes the
frame twice). Only when orjson refuses a message does the standard library look at it
again, to recover the id of a request carrying NaN/Infinity so it still gets an error reply.

Amounts are ``decimal.Decimal``: a request's stake becomes ``Decimal(repr(float))``, which
is the exact text the upstream sent for any number of up to 15 significant digits (and for
every number a JavaScript or Python producer prints, as both print the shortest repr).
"""

import dataclasses
import datetime
import json
import re
from decimal import ROUND_HALF_UP, Context, Decimal, DecimalException
from typing import Any, TypeGuard

import orjson

from .errors import ProtocolError

HEARTBEAT = b'{"type":"heartbeat"}'
ERROR_PREFIX = "Unable to convert stake. Error: "
CURRENCY_RE = re.compile(r"[A-Z]{3}")
MAX_STAKE = Decimal("1e12")
FIVE_PLACES = Decimal("0.00001")
MAX_FUTURE = datetime.timedelta(days=1)  # clock skew between us and the upstream
_UTC = datetime.UTC
#: hh:mm:60 in a timestamp (an RFC 3339 leap second), read as hh:mm:59
_LEAP_SECOND = re.compile(r"(?<=^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ])([0-9]{2}:[0-9]{2}):60(?![0-9])")
#: what a quoted value must not carry raw into a log line
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
#: orjson reads nesting 1024 deep but writes only 254, and the lenient parser lets through
#: NaN deep in the payload, lone surrogates and integers beyond 64 bits
UNECHOABLE = ("payload cannot be echoed as JSON: nested too deeply, or holding NaN/Infinity, "
              "a lone surrogate or an integer beyond 64 bits")
# Enough digits for MAX_STAKE divided by the smallest rate, quantized to 5 places.
_CONTEXT = Context(prec=40, rounding=ROUND_HALF_UP)


@dataclasses.dataclass(slots=True)  # not frozen: a frozen __init__ costs 3x as much
class Request:
    """A conversion request: ``payload`` is the request's own dict, echoed in the reply."""

    id: object
    payload: dict
    stake: Decimal
    currency: str
    day: datetime.date


def parse(data: bytes | str, today: datetime.date) -> Request | None:
    """A ``Request``, or ``None`` for a heartbeat; ``ProtocolError`` for anything else.

    ``data`` is the frame's text (bytes or str); ``today`` is the current UTC date, so
    far-future dates are refused without this function reading a clock.
    """
    lenient = False
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        message, lenient = _lenient_loads(data), True
    if type(message) is not dict:
        raise ProtocolError("message is not a JSON object")
    kind = message.get("type")
    if kind == "heartbeat":
        return None
    request_id = message.get("id")
    if type(request_id) not in (int, str) or (type(request_id) is str and len(request_id) > 100):
        request_id = None
    elif lenient and not _echoable(request_id):  # a lone surrogate, an int beyond 64 bits
        request_id = None
    if kind != "message":
        raise ProtocolError(f"unknown message type {_show(kind)}", request_id)
    payload = message.get("payload")
    if type(payload) is not dict:
        reason = "missing field 'payload'" if payload is None else "payload must be an object"
        raise ProtocolError(reason, request_id)
    try:
        stake, currency, day = read_payload(payload, today)
        if lenient:
            _refuse_non_finite(payload)
    except ProtocolError as e:
        e.request_id = request_id
        raise
    if request_id is None:
        raise ProtocolError("missing or invalid field 'id'")
    return Request(request_id, payload, stake, currency, day)


def read_payload(payload: dict, today: datetime.date) -> tuple[Decimal, str, datetime.date]:
    """(stake, currency, day) from a request payload, each validated."""
    return (read_stake(_field(payload, "stake")),
            read_currency(_field(payload, "currency")),
            read_day(_field(payload, "date"), today))


def read_stake(value: Any) -> Decimal:
    kind = type(value)
    if kind is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ProtocolError("stake must be a finite number")
        stake = Decimal(repr(value))
    elif kind is int:
        stake = Decimal(value)
    elif kind is Decimal:  # from the lenient parser or the command line
        if not value.is_finite():
            raise ProtocolError("stake must be a finite number")
        stake = value
    else:
        raise ProtocolError(f"stake must be a number, got {_show(value)}")
    if stake < 0:
        raise ProtocolError("stake must not be negative")
    if stake > MAX_STAKE:
        raise ProtocolError(f"stake must not exceed {MAX_STAKE:f}")
    return stake


def is_currency_code(value: object) -> TypeGuard[str]:
    """True for exactly three ASCII capital letters: the one currency-code check, for
    requests and rate providers alike (``fullmatch``: "USD\n" is not one)."""
    return type(value) is str and CURRENCY_RE.fullmatch(value) is not None


def read_currency(value: object) -> str:
    """The request's currency code, upper-cased ("usd" is USD); ProtocolError otherwise."""
    if type(value) is not str:
        raise ProtocolError(f"currency must be a string, got {_show(value)}")
    code = value.upper()
    if not is_currency_code(code):
        raise ProtocolError(f"invalid currency {_show(value)}")
    return code


def read_day(value: object, today: datetime.date) -> datetime.date:
    """The UTC calendar day of an ISO 8601 / RFC 3339 date or timestamp (naive means UTC).

    RFC 3339 allows a lowercase ``t`` and ``z`` and a leap second (``23:59:60Z``); Python's
    parser takes neither the ``z`` nor second 60, so a leap second is read as second 59 of
    the same minute: the same day, which is all a rate lookup needs.
    """
    if type(value) is not str:
        raise ProtocolError(f"date must be a string, got {_show(value)}")
    try:
        if len(value) > 40:
            raise ValueError
        text = value[:-1] + "Z" if value.endswith("z") else value
        if ":60" in text:  # the regex only when a leap second may be there: hot path
            text = _LEAP_SECOND.sub(r"\1:59", text, count=1)
        moment = datetime.datetime.fromisoformat(text)
        if moment.tzinfo is not None:
            moment = moment.astimezone(_UTC)
        day = moment.date()
    except (ValueError, OverflowError):
        raise ProtocolError(f"invalid date {_show(value)}") from None
    if day > today + MAX_FUTURE:
        raise ProtocolError(f"date {_show(value)} is in the future")
    return day


def convert(stake: Decimal, rate: Decimal) -> Decimal:
    """EUR for ``stake`` at ``rate`` (units per EUR), ROUND_HALF_UP to 5 decimal places."""
    try:
        return _CONTEXT.quantize(_CONTEXT.divide(stake, rate), FIVE_PLACES)
    except DecimalException as e:  # a rate of zero or absurd magnitude from a provider
        raise ProtocolError(f"cannot convert {stake} at rate {rate}") from e


def reply(request: Request, stake_eur: Decimal, timestamp: str) -> bytes:
    """The success reply: the payload unchanged but for stake, currency and date."""
    payload = dict(request.payload)
    payload["stake"] = orjson.Fragment(str(stake_eur).encode())
    payload["currency"] = "EUR"
    payload["date"] = timestamp
    try:
        return _exact(orjson.dumps({"type": "message", "id": request.id, "payload": payload},
                                   default=_number_fragment))
    except orjson.JSONEncodeError:  # only what the lenient parser or deep nesting lets in
        raise ProtocolError(UNECHOABLE) from None


def error_reply(request_id: object, reason: str) -> bytes:
    message = ERROR_PREFIX + reason
    try:
        return _exact(orjson.dumps({"type": "error", "id": request_id, "message": message}))
    except orjson.JSONEncodeError:  # a reason quoting a lone surrogate from the request
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return _exact(orjson.dumps({"type": "error", "id": request_id, "message": message}))


def _exact(data):
    """``data`` in a bytes object of its own size. orjson's output keeps the 4 KiB buffer
    it was written into: a reply held for a while (queued for the writer, kept until the
    peer acknowledges it, kept for the next connection) would cost 4 KiB, not 200 bytes,
    and tens of thousands of them are in flight in a burst."""
    return bytes(memoryview(data))


def timestamp(moment: datetime.datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` for an aware or naive-UTC datetime."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(_UTC)
    # isoformat, not strftime: strftime goes through the C library and costs three times
    # as much, and this runs for every batch of replies
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def excerpt(data: bytes | bytearray | memoryview | str, limit: int = 200) -> str:
    """A loggable, truncated view of a frame that could not be served."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        text = bytes(data[:limit]).decode("utf-8", "replace")
    else:
        text = data[:limit]
    more = len(data) - limit
    return repr(text) + (f"... (+{more} bytes)" if more > 0 else "")


def shown(data: bytes | bytearray | str, limit: int = 4096) -> str:
    """A frame for ``--show-messages``: its JSON text as received when that is one printable
    line (what the upstream sends), else the escaped ``excerpt`` (no forged log lines)."""
    if len(data) <= limit:
        text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
        if text.isprintable():
            return text
    return excerpt(data, limit)


def _echoable(value):
    """True if orjson can write ``value`` back (Python's parser accepts more than that)."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def _refuse_non_finite(payload):
    """NaN/Infinity elsewhere in the payload: it could not be echoed as valid JSON."""
    for name, value in payload.items():
        if type(value) is Decimal and not value.is_finite():
            raise ProtocolError(f"{name} must be a finite number")


def _field(payload, name):
    value = payload.get(name)
    if value is None:
        raise ProtocolError(f"missing field {name!r}")
    return value


def _show(value, limit=24):
    """A value quoted for an error reason, truncated so a reply never echoes a flood.

    Control characters, line separators and lone surrogates are escaped: a reason is also
    logged (for a message without an id), and a raw line break there would let the
    upstream forge log lines.
    """
    text = value if isinstance(value, str) else json.dumps(value, default=repr)[:limit * 2]
    text = text if len(text) <= limit else text[:limit] + "..."
    text = text.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + _UNPRINTABLE.sub(_escape_char, text) + "'"


def _escape_char(match):
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _number_fragment(value):
    """orjson hook: Decimals from the lenient parser are echoed as the numbers they were."""
    if type(value) is Decimal and value.is_finite():
        return orjson.Fragment(str(value).encode())
    raise TypeError(f"cannot echo {type(value).__name__}")


def _lenient_loads(data):
    """The standard library's reading of what orjson refused, or ``ProtocolError``.

    It accepts NaN and Infinity, so a request with a non-finite stake still has an id to
    answer; numbers stay exact as Decimal.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text, parse_float=Decimal, parse_constant=Decimal)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"invalid JSON: {str(e)[:80]}") from None
