"""The rate machinery a command needs, assembled from the settings and closed in order.

``cli`` (run, convert, cache), ``demo`` and the tests build the same thing; it lives here
so that none of them imports another to get it (no import cycles).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings


class Runtime:
    """The rate machinery a command needs, closed in reverse order of opening."""

    def __init__(self, settings: Settings) -> None:
        from .cache import open_cache
        from .rates.book import RateBook
        from .rates.http import HttpClient
        from .rates.providers import make_providers

        self.settings = settings
        self.http = HttpClient(settings)
        self.providers = make_providers(settings, self.http)
        self.provider = self.providers[0]
        self.cache = open_cache(settings)  # disk, and Redis when REDIS_URL is set
        self.book = RateBook(self.providers, self.cache, ttl_s=settings.cache_ttl_s,
                             stale_s=settings.stale_if_error_s,
                             http_timeout_s=settings.http_timeout_s,
                             concurrency=settings.fetch_concurrency)

    def close(self) -> None:
        self.book.close()
        self.cache.close()
        self.http.close()  # the providers' one session
