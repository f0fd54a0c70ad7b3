"""One exception interface: every exrate error carries ``reason``, its human text."""

from exrate_green.errors import (
    CacheError,
    ConfigError,
    ConnectionClosed,
    ExrateError,
    ProtocolError,
    ProtocolViolation,
    RateError,
    RateUnavailable,
    UnsupportedCurrency,
)
from exrate_green.rates.breaker import ProviderRefused
from exrate_green.rates.http import HttpError


def test_every_error_family_carries_its_human_text_as_reason():
    errors = [ConfigError("bad URL"), ProtocolError("bad stake", 7), RateError("no rate"),
              UnsupportedCurrency("XYZ"), RateUnavailable("down"), CacheError("locked"),
              ConnectionClosed("reset"), ProtocolViolation("masked frame", 1002),
              HttpError("HTTP 404 from api", 404), ProviderRefused("quota", "quota", 1.0)]
    reasons = [e.reason for e in errors]
    assert reasons == ["bad URL", "bad stake", "no rate", "unsupported currency 'XYZ'",
                       "exchange rate service unavailable: down", "locked", "reset",
                       "masked frame", "exchange rate service unavailable: HTTP 404 from api",
                       "exchange rate service unavailable: quota"]
    assert all(isinstance(e, ExrateError) and str(e) == e.reason for e in errors)


def test_the_families_keep_their_own_fields_beside_reason():
    assert ProtocolError("bad stake", 7).request_id == 7
    assert ConnectionClosed("reset").cause == "reset"
    assert ProtocolViolation("bad utf-8", 1007).code == 1007
    assert UnsupportedCurrency("XYZ").currency == "XYZ"
