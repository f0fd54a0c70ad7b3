"""What a rate table must show before it is used or cached: an answer checked against the
question, by the same rules whether it came from a rate API or from a cache row.

* **Its publication.** On or before the day asked, and at most ``MAX_LOOKBACK_DAYS``
  before it: the ECB never went more than 5 days between publications in 1999-2026 (the
  bundled history), so an older publication is a lie or a stale mirror, not a holiday.
* **Its rates.** Each a finite, positive ``Decimal`` between ``MIN_RATE`` and
  ``MAX_RATE`` units per EUR. The ECB history spans 0.3883 (MTL, 2000-10-25) to
  1,912,400 (TRL, 2004-12-09); the bounds leave room for exchangerate.host's extra
  currencies (BTC is about 1e-5 per EUR, hyperinflated currencies run to 1e6 and beyond)
  and still refuse 0, 1e-999999, 1e308 and the like.

The policy for a bad value (docs/rates.md): the whole answer is a failed fetch. Nothing of
it is cached, so no currency is ever left out of a cached table (which would read as
"unsupported" for hours); stale-if-error and the next provider of the chain apply as for
any failure, and the next request after the API is right again gets a correct table.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import RateUnavailable
from ..protocol import is_currency_code

#: a publication older than this many days before the day asked is refused (ECB: max gap 5)
MAX_LOOKBACK_DAYS = 7
#: plausible units of a currency per 1 EUR (see the module docstring for the data)
MIN_RATE = Decimal("1e-8")
MAX_RATE = Decimal("1e10")
#: a table quoting more currencies than this is not a rate table (ECB 36, apilayer ~170)
MAX_CURRENCIES = 1000


class ImplausibleAnswer(RateUnavailable):
    """An answer that does not show what was asked: wrong publication, bad rate."""


def check_publication(source: str, published: datetime.date, day: datetime.date) -> None:
    """``ImplausibleAnswer`` unless ``published`` is on ``day`` or at most
    ``MAX_LOOKBACK_DAYS`` before it; the reason names both dates."""
    if not day - datetime.timedelta(days=MAX_LOOKBACK_DAYS) <= published <= day:
        raise ImplausibleAnswer(
            f"{source} answered a publication of {published.isoformat()} for {day.isoformat()}")


def plausible_rate(value: object) -> Decimal | None:
    """``value`` (a JSON number or decimal text) as a plausible rate, or ``None``.

    Booleans, strings that are not numbers, NaN, infinities and anything outside
    ``MIN_RATE``..``MAX_RATE`` are ``None``; so are exponents that could not be normalised
    (``1e-999999`` is a number, and not a rate).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        return None
    if isinstance(value, str) and len(value) > 64:
        return None  # a rate is a few digits; never parse a megabyte of them
    try:
        rate = value if isinstance(value, Decimal) else Decimal(str(value))
        if not rate.is_finite() or not MIN_RATE <= rate <= MAX_RATE:
            return None
    except (InvalidOperation, ValueError, OverflowError):
        return None
    return rate


def checked_rates(raw: Mapping[Any, object], source: str,
                  day: datetime.date) -> dict[str, Decimal]:
    """``{code: Decimal}`` plus ``"EUR": 1`` from a ``rates`` object, every entry checked.

    Raises ``ImplausibleAnswer`` at the first entry that is not a currency code with a
    plausible rate, naming it (the whole answer fails: see the module docstring), and for
    an answer with no rates or too many.
    """
    if not raw:
        raise ImplausibleAnswer(f"{source} answered with no rates for {day.isoformat()}")
    if len(raw) > MAX_CURRENCIES:
        raise ImplausibleAnswer(f"{source} answered {len(raw)} rates for {day.isoformat()}, "
                                f"more than any real table")
    rates = {}
    for code, value in raw.items():
        rate = plausible_rate(value)
        if not is_currency_code(code) or rate is None:
            raise ImplausibleAnswer(
                f"{source} answered an implausible rate for {day.isoformat()}: "
                f"{_excerpt(code)}={_excerpt(value)}")
        # One string object per code across every table held: a month fetch holds ~7,000
        # publications x 36 codes, and json gives each its own copy (~13 MB of them).
        rates[sys.intern(code)] = rate
    rates["EUR"] = Decimal(1)
    return rates


def _excerpt(value: object) -> str:
    """A short, printable excerpt of hostile input for a log line."""
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 24 else text[:21] + "..."
