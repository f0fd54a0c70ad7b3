"""exchangerate.host (apilayer): more currencies than the ECB (UAH, BTC, ...), needs a key.

``GET {base}/historical?access_key=K&date=YYYY-MM-DD`` (past days) and
``GET {base}/live?access_key=K`` (today) answer
``{"success":true,"source":"USD","quotes":{"USDEUR":0.82,"USDGBP":0.71,...}}`` with
``quotes[SRC + X]`` = units of X per 1 SRC. Free plans cannot choose SRC, so the table's
convention (units of X per 1 EUR) is a cross rate: ``quotes[SRC + X] / quotes[SRC + EUR]``.
Errors come back as HTTP 200 with ``{"success":false,"error":{"code":..,"type":..,"info":..}}``
and ``info`` may repeat the request URL, access key included.
"""

import datetime
import time
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

from ..errors import RateUnavailable
from ..redact import redact
from .breaker import ProviderRefused
from .checks import ImplausibleAnswer, check_publication, checked_rates, plausible_rate
from .http import HttpClient, as_day, is_currency_code, parse_day, utc_today
from .table import RateTable, check_not_before_first_day

#: Cross rates are computed in this context, not the thread's (which any code may change):
#: 28 significant digits, far beyond the 5 decimals a reply keeps.
CROSS_RATE_CONTEXT = Context(prec=28, rounding=ROUND_HALF_EVEN)

#: longest excerpt of the API's error text kept in a ``why``
MAX_INFO_CHARS = 200

#: apilayer error codes that retrying within the hour cannot fix: the breaker opens for an
#: hour with these words as its reason
REFUSALS = {
    101: "access key missing or invalid",
    104: "monthly request quota exhausted",
    105: "the subscription plan does not allow this request",
}


class ExchangerateHostProvider:
    """Fetches ``RateTable``s from exchangerate.host at ``base_url`` with ``access_key``.

    ``http`` is an ``HttpClient`` (the provider owns it; ``close()`` closes it); ``today``
    returns the current UTC day (a clock for tests).
    """

    def __init__(self, http: HttpClient, base_url: str, access_key: str,
                 name: str = "exchangerate.host", *,
                 today: Callable[[], datetime.date] = utc_today) -> None:
        if not access_key:
            raise ValueError("exchangerate.host needs an access key")
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.name = name
        self._access_key = access_key
        self._today = today

    def __repr__(self):
        return f"<{type(self).__name__} {self.base_url} access_key=***>"

    def needs_cache(self, day: datetime.date) -> bool:
        """Always: every answer costs a network call (and the plan's quota)."""
        return True

    def fetch_key(self, day: datetime.date) -> str:
        """One call per day: the API has no range endpoint on the free plan."""
        return as_day(day).isoformat()

    def fetch_tables(self, key: str, **http: Any) -> list[RateTable]:
        return [self.fetch(datetime.date.fromisoformat(key), **http)]

    def fetch(self, day: datetime.date, **http: Any) -> RateTable:
        """The table valid on ``day`` (a ``datetime.date``, UTC).

        Raises ``DateOutOfRange`` before 1999-01-04 and ``RateUnavailable`` for any failure
        of the API or its answer, with the access key masked.
        """
        day = as_day(day)
        check_not_before_first_day(day)
        live = day >= self._today()
        if live:
            answer = self.http.get_json(f"{self.base_url}/live",
                                        {"access_key": self._access_key}, **http)
        else:
            answer = self.http.get_json(f"{self.base_url}/historical",
                                        {"access_key": self._access_key,
                                         "date": day.isoformat()}, **http)
        return self._table(day, answer, live)

    def close(self) -> None:
        self.http.close()

    def _table(self, day, answer, live):
        if not isinstance(answer, dict):
            raise RateUnavailable("unexpected answer from exchangerate.host: not an object")
        if answer.get("success") is not True:
            error = answer.get("error")
            why = self._api_error(error)
            code = error.get("code") if isinstance(error, dict) else None
            if code in REFUSALS:
                raise ProviderRefused(why, REFUSALS[code])
            raise RateUnavailable(why)
        source, quotes = answer.get("source"), answer.get("quotes")
        if not is_currency_code(source) or not isinstance(quotes, dict):
            raise RateUnavailable(
                "unexpected answer from exchangerate.host: no 'source' and 'quotes'")
        published = self._published(answer, day, live)
        rates = checked_rates(cross_rates(source, quotes, day), self.name, day)
        return RateTable(provider=self.name, day=day, published=published, rates=rates,
                         fetched_at=time.time())

    def _published(self, answer, day, live):
        """The publication an answer shows: a historical one must carry ``date`` equal to
        the day asked; a live one's ``timestamp`` (UTC day) must be today or at most a
        week before. ``ImplausibleAnswer`` otherwise, naming both dates."""
        if not live:
            published = parse_day(answer.get("date"))
            if published != day:
                shown = published.isoformat() if published else repr(answer.get("date"))[:24]
                raise ImplausibleAnswer(
                    f"{self.name} answered a publication of {shown} for {day.isoformat()}")
            return day
        today = min(day, self._today())
        published = _timestamp_day(answer.get("timestamp"))
        if published is None:
            return today  # live answers carry a timestamp; without one it is "now"
        check_publication(self.name, published, today)
        return published

    def _api_error(self, error):
        """``why`` from the API's error object, e.g. ``exchangerate.host error 101
        (invalid_access_key): You have not supplied a valid API Access Key...``."""
        if not isinstance(error, dict):
            return "exchangerate.host answered success=false without an error"
        code, kind = error.get("code", "?"), error.get("type")
        info = " ".join(str(error.get("info") or "").split())
        if len(info) > MAX_INFO_CHARS:
            info = info[:MAX_INFO_CHARS - 3] + "..."
        why = (f"exchangerate.host error {code}" + (f" ({kind})" if kind else "")
               + (f": {info}" if info else ""))
        return redact(why, (self._access_key,))


def cross_rates(source: str, quotes: dict, day: datetime.date | None = None) -> dict[str, Decimal]:
    """Units of each currency per 1 EUR from ``quotes[source + X]`` = units of X per 1 source.

    X per EUR = ``quotes[source+X] / quotes[source+EUR]``; the source itself is
    ``1 / quotes[source+EUR]``; EUR is exactly 1. Decimal throughout (28 digits). Every
    quote must be ``source`` + a three-letter code with a plausible number: any other
    fails the whole answer (``ImplausibleAnswer``), as does a missing ``source + "EUR"``.
    ``day`` (the day asked) only goes into the reason.
    """
    asked = f" for {day.isoformat()}" if day else ""
    per_source = {}
    for pair, value in quotes.items():
        rate = plausible_rate(value)
        if not (isinstance(pair, str) and len(pair) == 6 and pair.startswith(source)
                and is_currency_code(pair[3:]) and rate is not None):
            shown = repr(value) if isinstance(value, (int, float, str, Decimal)) else "?"
            raise ImplausibleAnswer(f"exchangerate.host answered an implausible quote"
                                    f"{asked}: {str(pair)[:12]!r}={shown[:24]}")
        per_source[pair[3:]] = rate
    # A paid plan may quote from EUR itself, where EUR per EUR goes without saying.
    eur = per_source.get("EUR", Decimal(1) if source == "EUR" else None)
    if eur is None:
        raise RateUnavailable(f"exchangerate.host gave no {source}EUR quote to cross through")
    per_source[source] = Decimal(1)
    rates = {code: CROSS_RATE_CONTEXT.divide(rate, eur) for code, rate in per_source.items()}
    rates["EUR"] = Decimal(1)
    return rates


def _timestamp_day(timestamp: object) -> datetime.date | None:
    """The UTC day of an epoch-seconds ``timestamp``, or ``None`` if it is not one."""
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        return None
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).date()
    except (OverflowError, OSError, ValueError):
        return None
