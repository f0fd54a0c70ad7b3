"""Exchange rates: providers that fetch one day's table, and the book that caches them."""

import importlib

from .table import FIRST_DAY, RateTable

# The providers pull in requests and gevent; they load on first use so that importing
# ``rates.table`` (pure) never imports ssl before the entry point has monkey-patched.
_LAZY = {
    "HttpClient": ".http",
    "HttpError": ".http",
    "FrankfurterProvider": ".frankfurter",
    "ExchangerateHostProvider": ".exchangerate_host",
    "cross_rates": ".exchangerate_host",
    "EcbProvider": ".providers",
    "make_provider": ".providers",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


__all__ = ["FIRST_DAY", "RateTable", "HttpClient", "HttpError", "FrankfurterProvider",
           "ExchangerateHostProvider", "cross_rates", "EcbProvider", "make_provider"]
