"""What the simulated upstream sends: realistic requests, their pacing, and garbage.

Requests follow the recorded shape and ranges (docs/design.md 1): ten fixed market/selection
pairs, odds 1.02-9.01, stakes 18.2-9983.6 with 0-5 decimals, weighted currencies and dates
in a window. Automatic requests cycle through pre-encoded ``Template`` payloads, so that
one costs a few string operations: the simulator must out-run the clients it measures.
"""

import datetime
import itertools
import random
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

__all__ = [
    "DEFAULT_CURRENCY_WEIGHTS",
    "GARBAGE",
    "HEARTBEAT",
    "KEPT_AS_IS",
    "MARKET_SELECTIONS",
    "Pacer",
    "RequestMaker",
    "Template",
    "encode_request",
]

# Relative frequency of each currency in generated requests (EUR frequent, as recorded).
DEFAULT_CURRENCY_WEIGHTS = {
    "EUR": 30, "USD": 18, "GBP": 12, "PLN": 10, "CZK": 8, "HRK": 6, "UAH": 6, "ZWL": 5, "BTC": 5,
}
_OTHER_CURRENCY_WEIGHT = 5
DEFAULT_CURRENCIES = tuple(DEFAULT_CURRENCY_WEIGHTS)
DEFAULT_DATES = (datetime.date(2021, 1, 1), datetime.date(2022, 6, 30))

# The ten fixed (marketId, selectionId) pairs requests are drawn from.
MARKET_SELECTIONS = (
    (123456, 987654), (123456, 987655), (123457, 876543), (123457, 876544), (234567, 765432),
    (234567, 765433), (345678, 654321), (345678, 654322), (456789, 543210), (456789, 543211),
)

HEARTBEAT = b'{"type":"heartbeat"}'
#: the payload fields a reply may change; every other one must come back as it was sent
KEPT_AS_IS = ("stake", "currency", "date")

#: the frames ``Upstream.send_garbage`` sends in turn: ("text" | "binary", frame) for frames
#: that carry no id, ("request", raw payload) for requests with an id and a bad payload.
#: Bad input, never a breach of RFC 6455 (invalid UTF-8 text is one: a client must fail
#: the connection with 1007; ``send_raw`` and ``send_wire`` send such frames).
GARBAGE = (
    ("text", b"not json"),
    ("request", b'{"stake":NaN,"currency":"USD","date":"2021-05-18T10:00:00.000Z"}'),
    ("text", b"{"),
    ("request", b'{"stake":"12","currency":"USD","date":"2021-05-18T10:00:00.000Z"}'),
    ("text", b'{"type":"unknown"}'),
    ("request", b'{"stake":12,"currency":"US","date":"2021-05-18T10:00:00.000Z"}'),
    ("binary", b"\x00\xff\x10 binary garbage"),
    ("request", b'{"stake":12,"currency":"USD","date":"2021-13-45"}'),
    ("text", "«ünïcødé» but not JSON".encode()),
    ("request", b'{"currency":"USD","date":"2021-05-18T10:00:00.000Z"}'),
    ("text", b"[" * 10_000 + b"]" * 10_000),
    ("request", b'{"stake":1e999,"currency":"USD","date":"2021-05-18T10:00:00.000Z"}'),
)


def utc_ms(moment: datetime.datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ``, the protocol's date form."""
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


class Template:
    """A request payload, pre-encoded, with what every valid reply to it must hold:
    ``rest`` the other fields as sorted-key JSON (which tells 2 from 2.0 and 1 from true),
    ``eur_stake`` the stake a EUR request must keep (None for other currencies)."""

    __slots__ = ("encoded", "eur_stake", "payload", "rest")

    def __init__(self, payload: dict):
        self.payload = payload
        self.encoded = orjson.dumps(payload)
        self.rest = orjson.dumps({k: v for k, v in payload.items() if k not in KEPT_AS_IS},
                                 option=orjson.OPT_SORT_KEYS)
        stake = payload.get("stake")
        self.eur_stake = None
        if payload.get("currency") == "EUR" and type(stake) in (int, float):
            self.eur_stake = float(Decimal(repr(stake)).quantize(Decimal("0.00001")))

    @classmethod
    def of(cls, payload: Any) -> "Template | None":
        """A template for ``payload`` if it is a plain JSON object with string keys, else None."""
        if type(payload) is not dict:
            return None
        try:
            return cls(payload)
        except (TypeError, ValueError, InvalidOperation):   # orjson's errors are these
            return None


def encode_request(rid: Any, payload: Any) -> bytes:
    """The request frame's text: ``payload`` as JSON, or as is when str/bytes (raw JSON)."""
    if isinstance(payload, str):
        payload = payload.encode()
    if isinstance(payload, (bytes, bytearray)):
        return (b'{"type":"message","id":' + orjson.dumps(rid)
                + b',"payload":' + bytes(payload) + b"}")
    return orjson.dumps({"type": "message", "id": rid, "payload": payload})


def encode_auto_requests(ids: Iterable[int], templates: Iterable[Template]) -> list[bytes]:
    """Request frames' texts for automatic ids and their templates, in one pass."""
    return [b'{"type":"message","id":%d,"payload":%b}' % (rid, template.encoded)
            for rid, template in zip(ids, templates)]


class RequestMaker:
    """Realistic payloads from a seeded generator, and the template cycle built from them."""

    #: distinct payloads the automatic requests cycle through: each is drawn once from the
    #: recorded distribution and pre-encoded, so a request costs a few string operations
    TEMPLATES = 4096

    def __init__(self, seed: Any = None, currencies: Iterable[str] | dict = DEFAULT_CURRENCIES,
                 dates: tuple = DEFAULT_DATES):
        self._rng = random.Random(seed)
        if isinstance(currencies, dict):
            weights = dict(currencies)
        else:
            weights = {c: DEFAULT_CURRENCY_WEIGHTS.get(c, _OTHER_CURRENCY_WEIGHT)
                       for c in currencies}
        if not weights:
            raise ValueError("currencies must not be empty")
        self._currencies = list(weights)
        self._currency_cum = list(itertools.accumulate(weights.values()))
        self._date_first, self._date_span_ms = _date_window(dates)
        self._templates: list[Template] = []
        self._turn = 0

    def make_payload(self) -> dict:
        """A realistic request payload (the recorded shape and ranges)."""
        rng = self._rng
        market_id, selection_id = rng.choice(MARKET_SELECTIONS)
        odds = rng.randint(2, 9) if rng.random() < 0.15 else round(rng.uniform(1.02, 9.01), 2)
        places = rng.choice((0, 1, 2, 2, 2, 3, 4, 5, 5))
        stake = round(rng.uniform(18.2, 9983.6), places)
        if places == 0 and rng.random() < 0.5:
            stake = int(stake)
        currency = rng.choices(self._currencies, cum_weights=self._currency_cum)[0]
        offset_ms = rng.randint(0, self._date_span_ms)
        when = self._date_first + datetime.timedelta(milliseconds=offset_ms)
        return {"marketId": market_id, "selectionId": selection_id, "odds": odds,
                "stake": stake, "currency": currency, "date": utc_ms(when)}

    def prepare(self, slice_done: Callable[[], None] = lambda: None) -> None:
        """Draw every template now (~60 ms of CPU once) rather than during the first
        second, calling ``slice_done()`` after each slice of 256 (to let a hub turn)."""
        while len(self._templates) < self.TEMPLATES:
            self.next_templates(256)
            slice_done()
        self._turn = 0

    def next_templates(self, n: int) -> list[Template]:
        """``n`` request templates: fresh ones until ``TEMPLATES`` exist, then in turn."""
        pool, out = self._templates, list[Template]()
        while len(pool) < self.TEMPLATES and len(out) < n:
            pool.append(Template(self.make_payload()))
            out.append(pool[-1])
        turn = self._turn
        for _ in range(n - len(out)):
            out.append(pool[turn])
            turn = turn + 1 if turn + 1 < len(pool) else 0
        self._turn = turn
        return out


def _date_window(dates: tuple) -> tuple[datetime.datetime, int]:
    """(first moment, span in ms) of a (first, last) pair of dates or UTC datetimes; a
    last *date* includes its whole day."""
    utc = datetime.UTC
    first, last = (d if isinstance(d, datetime.datetime) else
                   datetime.datetime.combine(d, datetime.time()) for d in dates)
    first, last = (d.replace(tzinfo=utc) if d.tzinfo is None else d.astimezone(utc)
                   for d in (first, last))
    if not isinstance(dates[1], datetime.datetime):
        last += datetime.timedelta(days=1, milliseconds=-1)
    if last < first:
        raise ValueError("dates window ends before it starts")
    return first, int((last - first) / datetime.timedelta(milliseconds=1))


class Pacer:
    """When requests are due: at fixed intervals of 1/rate seconds or, with ``poisson``,
    exponentially distributed ones. Owns no clock: the caller passes ``time.monotonic()``."""

    #: over this many seconds behind, the backlog is shed rather than sent in a burst
    SHED_AFTER_S = 1.0

    def __init__(self, rate: float, poisson: bool, rng: random.Random, now: float):
        self._rate = rate
        self._poisson = poisson
        self._rng = rng
        self.due = now + self._gap()

    def _gap(self) -> float:
        return self._rng.expovariate(self._rate) if self._poisson else 1.0 / self._rate

    def take(self, now: float, most: int) -> int:
        """How many requests are due at ``now`` (at most ``most``); advances the schedule."""
        n = 0
        while self.due <= now and n < most:
            n += 1
            self.due += self._gap()
        if now - self.due > self.SHED_AFTER_S:
            self.due = now
        return n
