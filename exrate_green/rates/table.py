"""The unit of fetching and caching: one provider's whole rate table for one day."""

import dataclasses
import datetime
import json
import math
import re
import time
from decimal import Decimal
from typing import Any, Self

import orjson

from ..errors import DateOutOfRange, RateUnavailable, UnsupportedCurrency
from ..protocol import is_currency_code
from .checks import MAX_CURRENCIES, check_publication, plausible_rate

#: The first ECB publication; no provider has a rate before it.
FIRST_DAY = datetime.date(1999, 1, 4)


def check_not_before_first_day(day: datetime.date) -> None:
    """Raise ``DateOutOfRange`` for a day before any publication (the one place this is
    decided: the book asks before any provider is bothered; providers used alone ask too)."""
    if day < FIRST_DAY:
        raise DateOutOfRange(f"no exchange rate before {FIRST_DAY.isoformat()}")

#: A cache row larger than this is refused unread: a real table is 0.5 KB (ECB) to about
#: 6 KB (exchangerate.host, ~170 currencies), so this is ten times the largest.
MAX_ROW_BYTES = 64 * 1024
#: a row fetched further than this in the future (s) is refused: it would stay fresh for ever
MAX_CLOCK_SKEW_S = 300.0
#: the fields of a row, exactly
ROW_FIELDS = frozenset({"provider", "day", "published", "fetched_at", "rates"})
_PROVIDER = re.compile(r"[a-z][a-z0-9.-]{0,31}")


@dataclasses.dataclass(frozen=True)
class RateTable:
    """Rates of one day: ``rates[code]`` is units of ``code`` per 1 EUR (ECB convention).

    ``day`` is the UTC day asked for; ``published`` the day of the publication that is valid
    on it (the same or the latest earlier business day). ``fetched_at`` is epoch seconds.
    """

    provider: str
    day: datetime.date
    published: datetime.date
    rates: dict  # str -> Decimal, always with "EUR": Decimal(1)
    fetched_at: float

    def rate(self, currency: str) -> Decimal:
        """Units of ``currency`` per EUR, or ``UnsupportedCurrency``."""
        try:
            return self.rates[currency]
        except KeyError:
            raise UnsupportedCurrency(currency) from None

    def to_json(self) -> str:
        """JSON text (never a pickle): rates as decimal strings so nothing is rounded."""
        return json.dumps({
            "provider": self.provider,
            "day": self.day.isoformat(),
            "published": self.published.isoformat(),
            "fetched_at": self.fetched_at,
            "rates": {code: str(rate) for code, rate in sorted(self.rates.items())},
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Inverse of ``to_json`` for a row of untrusted origin; ``ValueError`` (saying
        why, briefly) for anything that is not a table this service could have written.

        Bounded work whatever the row: its size is checked before decoding, orjson
        decodes without recursion (it refuses nesting past 1024 levels) and every field
        is checked: the rates as plausible, the publication as for a provider's answer.
        """
        if len(text) > MAX_ROW_BYTES:
            raise ValueError(f"{len(text)} bytes, larger than any rate table")
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"not JSON ({str(e)[:60]})") from None
        if not isinstance(data, dict) or data.keys() != ROW_FIELDS:
            raise ValueError("not a rate table object")
        provider = data["provider"]
        if not isinstance(provider, str) or not _PROVIDER.fullmatch(provider):
            raise ValueError("no valid provider")
        day, published = _row_day(data["day"]), _row_day(data["published"])
        try:
            check_publication(provider, published, day)
        except RateUnavailable as e:
            raise ValueError(e.why) from None
        return cls(provider=provider, day=day, published=published,
                   rates=_row_rates(data["rates"]), fetched_at=_row_time(data["fetched_at"]))


def _row_day(value: Any) -> datetime.date:
    if not isinstance(value, str) or len(value) != 10:
        raise ValueError("a day is not YYYY-MM-DD")
    return datetime.date.fromisoformat(value)


def _row_time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("fetched_at is not a number")
    fetched_at = float(value)
    if not math.isfinite(fetched_at) or not 0 < fetched_at <= time.time() + MAX_CLOCK_SKEW_S:
        raise ValueError("fetched_at is not a past moment")
    return fetched_at


def _row_rates(value: Any) -> dict[str, Decimal]:
    if not isinstance(value, dict) or not 0 < len(value) <= MAX_CURRENCIES:
        raise ValueError("rates is not a table of currencies")
    rates = {}
    for code, text in value.items():
        rate = plausible_rate(text) if isinstance(text, str) else None
        if rate is None or not is_currency_code(code):
            raise ValueError(f"implausible rate {code[:8]!r}")
        rates[code] = rate
    rates["EUR"] = Decimal(1)
    return rates
