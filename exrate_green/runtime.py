"""The rate machinery a command needs, assembled from the settings and closed in order.

``cli`` (run, convert, cache), ``demo`` and the tests build the same thing; it lives here
so that none of them imports another to get it (no import cycles).
"""


class Runtime:
    """The rate machinery a command needs, closed in reverse order of opening."""

    def __init__(self, settings):
        from .cache import open_cache
        from .rates.book import RateBook
        from .rates.http import HttpClient
        from .rates.providers import make_provider

        self.settings = settings
        self.http = HttpClient(settings)
        self.provider = make_provider(settings, self.http)
        self.cache = open_cache(settings)  # disk, and Redis when REDIS_URL is set
        self.book = RateBook(self.provider, self.cache, ttl_s=settings.cache_ttl_s,
                             wait_s=settings.http_timeout_s + 2)

    def close(self):
        self.book.close()
        self.cache.close()
        self.provider.close()
        self.http.close()
