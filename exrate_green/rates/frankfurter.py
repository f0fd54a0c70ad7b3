"""Frankfurter (ECB reference rates as a keyless JSON API): one day's whole table per call.

``GET {base}/YYYY-MM-DD?base=EUR`` and ``GET {base}/latest?base=EUR`` answer
``{"amount":1.0,"base":"EUR","date":"YYYY-MM-DD","rates":{"USD":1.2225,...}}``; ``date`` is
the publication valid on the day asked for, which is an earlier business day on weekends
and holidays.
"""

import logging
import time
from decimal import Decimal

from ..errors import DateOutOfRange, RateUnavailable
from .http import as_day, is_currency_code, parse_day, to_rate, utc_today
from .table import FIRST_DAY, RateTable

log = logging.getLogger(__name__)


class FrankfurterProvider:
    """Fetches ``RateTable``s from a Frankfurter API at ``base_url`` through ``http``.

    ``http`` is an ``HttpClient``; the provider owns it and ``close()`` closes it.
    ``today`` returns the current UTC day (a clock for tests): that day and later ones are
    asked of ``/latest``, because a dated query for a day not yet published is refused.
    """

    def __init__(self, http, base_url, name="frankfurter", *, today=utc_today):
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.name = name
        self._today = today

    def needs_cache(self, day):
        """Always: every answer costs a network call."""
        return True

    def fetch(self, day):
        """The table valid on ``day`` (a ``datetime.date``, UTC).

        Raises ``DateOutOfRange`` before 1999-01-04 (without asking: the API has nothing
        earlier) and ``RateUnavailable`` for any failure of the API or its answer.
        """
        day = as_day(day)
        if day < FIRST_DAY:
            raise DateOutOfRange(f"no exchange rate before {FIRST_DAY.isoformat()}")
        latest = day >= self._today()
        path = "latest" if latest else day.isoformat()
        answer = self.http.get_json(f"{self.base_url}/{path}", {"base": "EUR"})
        return self._table(day, answer, latest)

    def close(self):
        self.http.close()

    def _table(self, day, answer, latest):
        if not isinstance(answer, dict) or not isinstance(answer.get("rates"), dict):
            raise RateUnavailable("unexpected answer from Frankfurter: no 'rates' object")
        if answer.get("base") != "EUR":
            raise RateUnavailable(
                f"Frankfurter answered with base {str(answer.get('base'))[:8]!r}, not 'EUR'")
        if to_rate(answer.get("amount", 1)) != 1:
            raise RateUnavailable("Frankfurter answered for an amount other than 1 EUR")
        published = parse_day(answer.get("date"))
        if published is None:
            raise RateUnavailable("unexpected answer from Frankfurter: no valid 'date'")
        # /latest may be a day ahead of our clock around midnight; a dated query must not.
        if published > day and not latest:
            raise RateUnavailable(
                f"Frankfurter answered with the rates of {published} for {day}")
        return RateTable(provider=self.name, day=day, published=min(published, day),
                         rates=euro_rates(answer["rates"], self.name), fetched_at=time.time())


def euro_rates(raw, source):
    """``{code: Decimal}`` from a JSON ``rates`` object, plus ``"EUR": 1``.

    An entry that is not a three-letter code with a positive number is left out with a
    warning: one bad rate should not cost every other currency its conversion.
    """
    rates = {}
    for code, value in raw.items():
        rate = to_rate(value)
        if is_currency_code(code) and rate is not None:
            rates[code] = rate
        else:
            log.warning("%s: skipped the malformed rate %.20r: %.40r", source, code, value)
    if not rates:
        raise RateUnavailable(f"{source} answered with no rates")
    rates["EUR"] = Decimal(1)
    return rates
