"""Frankfurter (ECB reference rates as a keyless JSON API): a day's table, or a month's.

``GET {base}/YYYY-MM-DD?base=EUR`` and ``GET {base}/latest?base=EUR`` answer
``{"amount":1.0,"base":"EUR","date":"YYYY-MM-DD","rates":{"USD":1.2225,...}}``; ``date`` is
the publication valid on the day asked for, which is an earlier business day on weekends
and holidays. ``GET {base}/START..END?base=EUR`` answers ``{"amount":1.0,"base":"EUR",
"start_date":..,"end_date":..,"rates":{"YYYY-MM-DD":{"USD":1.2,...},...}}`` with one entry
per publication in the range: one call gives every day of a past month.
"""

import bisect
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import RateUnavailable
from .checks import MAX_LOOKBACK_DAYS, ImplausibleAnswer, check_publication, checked_rates
from .http import HttpClient, as_day, parse_day, to_rate, utc_today
from .table import FIRST_DAY, RateTable, check_not_before_first_day

log = logging.getLogger(__name__)

#: A month's range starts this many days before the 1st, so that a weekend or holiday at
#: the start of the month finds the previous month's last publication in the same answer
#: (the ECB never went a week without publishing).
LOOKBACK_DAYS = 7


class FrankfurterProvider:
    """Fetches ``RateTable``s from a Frankfurter API at ``base_url`` through ``http``.

    ``http`` is an ``HttpClient``; the provider owns it and ``close()`` closes it.
    ``today`` returns the current UTC day (a clock for tests): that day and later ones are
    asked of ``/latest``, because a dated query for a day not yet published is refused.
    """

    def __init__(self, http: HttpClient, base_url: str, name: str = "frankfurter", *,
                 today: Callable[[], datetime.date] = utc_today) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.name = name
        self._today = today

    def needs_cache(self, day: datetime.date) -> bool:
        """Always: every answer costs a network call."""
        return True

    def fetch_key(self, day: datetime.date) -> str:
        """What one call fetches for ``day``: its month (``"2021-05"``) for a past day,
        the day itself (``"2021-05-18"``) for today, later days and days before 1999."""
        day = as_day(day)
        if FIRST_DAY <= day < self._today():
            return f"{day.year:04d}-{day.month:02d}"
        return day.isoformat()

    def fetch_tables(self, key: str, **http: Any) -> list[RateTable]:
        """The tables ``fetch_key`` promised for ``key``: a past month's (the current
        month's up to yesterday), or one day's. ``http`` goes to ``HttpClient.get_json``."""
        if len(key) == 7:
            return self.fetch_month(int(key[:4]), int(key[5:]), **http)
        return [self.fetch(datetime.date.fromisoformat(key), **http)]

    def fetch(self, day: datetime.date, **http: Any) -> RateTable:
        """The table valid on ``day`` (a ``datetime.date``, UTC).

        Raises ``DateOutOfRange`` before 1999-01-04 (without asking: the API has nothing
        earlier) and ``RateUnavailable`` for any failure of the API or its answer.
        """
        day = as_day(day)
        check_not_before_first_day(day)
        latest = day >= self._today()
        path = "latest" if latest else day.isoformat()
        answer = self.http.get_json(f"{self.base_url}/{path}", {"base": "EUR"}, **http)
        return self._table(day, answer, latest)

    def fetch_month(self, year: int, month: int, **http: Any) -> list[RateTable]:
        """A table for every day of the month (up to yesterday), from ONE range call.

        Weekends and holidays get the latest earlier publication; a day with none in the
        answer (only possible at the very start of the history) asks the single-day
        endpoint. Raises ``RateUnavailable`` when the range cannot be had.
        """
        first = datetime.date(year, month, 1)
        last = min(_month_end(first), self._today() - datetime.timedelta(days=1))
        start = max(first - datetime.timedelta(days=LOOKBACK_DAYS), FIRST_DAY)
        if last < start:
            return []
        answer = self.http.get_json(f"{self.base_url}/{start.isoformat()}..{last.isoformat()}",
                                    {"base": "EUR"}, **http)
        published, rates = self._publications(answer, start, last)
        now, tables, orphan = time.time(), [], None
        for day in _days(max(first, FIRST_DAY), last):
            index = bisect.bisect_right(published, day) - 1
            if index >= 0:
                check_publication(self.name, published[index], day)
                tables.append(RateTable(provider=self.name, day=day, published=published[index],
                                        rates=rates[index], fetched_at=now))
                continue
            # Before the range's first publication: the single-day endpoint says which
            # earlier one is valid; the days after it until that first publication share it.
            orphan = orphan or self.fetch(day, **http)
            check_publication(self.name, orphan.published, day)  # never stretched a month
            tables.append(RateTable(provider=self.name, day=day, published=orphan.published,
                                    rates=orphan.rates, fetched_at=now))
        return tables

    def close(self) -> None:
        self.http.close()

    def _table(self, day, answer, latest):
        """The table of a single-day answer, checked against the day asked (today's for
        ``/latest``); ``RateUnavailable`` (an ``ImplausibleAnswer``) if it does not fit."""
        self._check_shape(answer)
        published = parse_day(answer.get("date"))
        if published is None:
            raise RateUnavailable("unexpected answer from Frankfurter: no valid 'date'")
        check_publication(self.name, published, min(day, self._today()) if latest else day)
        return RateTable(provider=self.name, day=day, published=published,
                         rates=checked_rates(answer["rates"], self.name, day),
                         fetched_at=time.time())

    def _publications(self, answer, start, last):
        """(sorted publication days, their rates) from a range answer for ``start..last``.

        Every entry must be a publication inside the range asked, or the lookback one
        before it (Frankfurter starts a range at the publication valid on its first day);
        any other entry fails the whole answer."""
        self._check_shape(answer)
        asked = f"{start.isoformat()}..{last.isoformat()}"
        earliest = start - datetime.timedelta(days=MAX_LOOKBACK_DAYS)
        by_day = {}
        for text, raw in answer["rates"].items():
            day = parse_day(text)
            if day is None or not isinstance(raw, dict):
                raise ImplausibleAnswer(f"{self.name} answered a malformed range entry "
                                        f"{str(text)[:20]!r} for {asked}")
            if not earliest <= day <= last:
                raise ImplausibleAnswer(
                    f"{self.name} answered a publication of {day.isoformat()} for {asked}")
            by_day[day] = checked_rates(raw, self.name, day)
        days = sorted(by_day)
        return days, [by_day[day] for day in days]

    def _check_shape(self, answer):
        if not isinstance(answer, dict) or not isinstance(answer.get("rates"), dict):
            raise RateUnavailable("unexpected answer from Frankfurter: no 'rates' object")
        if answer.get("base") != "EUR":
            raise RateUnavailable(
                f"Frankfurter answered with base {str(answer.get('base'))[:8]!r}, not 'EUR'")
        if to_rate(answer.get("amount", 1)) != 1:
            raise RateUnavailable("Frankfurter answered for an amount other than 1 EUR")


def _month_end(first):
    following = (first.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    return following - datetime.timedelta(days=1)


def _days(first, last):
    for n in range((last - first).days + 1):
        yield first + datetime.timedelta(days=n)
