"""Exceptions, one base per boundary.

Library errors are translated where they enter (``raise ... from e``), so code above a
boundary catches one family and never a library's own exception type.
"""


class ExrateError(Exception):
    """Base of every error exrate-green raises on purpose.

    ``reason`` is the human text (what a log line, an error reply or the CLI shows; also
    ``str(e)``). ``kind`` names the class of failure for counting (the metrics' error
    replies by reason class): a short fixed word, never the reason text itself.
    """

    kind = "error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(ExrateError):
    """Settings refused at start (bad URL scheme, unknown provider, negative timeout)."""


class ProtocolError(ExrateError):
    """A message from the upstream that cannot be served.

    ``request_id`` is the message's id when one could be read (the reply goes to it),
    else ``None`` (the message is logged and skipped).
    """

    kind = "invalid_request"

    def __init__(self, reason: str, request_id: object = None) -> None:
        super().__init__(reason)
        self.request_id = request_id


class RateError(ExrateError):
    """No rate for a request; ``reason`` is the human reason sent in the error reply."""

    kind = "no_rate"


class UnsupportedCurrency(RateError):
    kind = "unsupported_currency"

    def __init__(self, currency: str) -> None:
        super().__init__(f"unsupported currency '{currency}'")
        self.currency = currency


class DateOutOfRange(RateError):
    """The provider has no publication on or before the day asked for."""


class RateUnavailable(RateError):
    """The rate service could not answer; never cached, the next request tries again."""

    kind = "rate_unavailable"

    def __init__(self, why: str) -> None:
        super().__init__(f"exchange rate service unavailable: {why}")
        self.why = why


class CacheError(ExrateError):
    """The disk cache failed (locked, full, read-only, corrupt); callers treat it as a miss."""


class ConnectionClosed(ExrateError):
    """The WebSocket link ended; ``cause`` (and ``reason``, the same text) says why, for
    the reconnect log line."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class ProtocolViolation(ConnectionClosed):
    """The upstream broke RFC 6455; we failed the connection with close ``code``
    (1002, or 1007 for invalid UTF-8)."""

    def __init__(self, cause: str, code: int) -> None:
        super().__init__(cause)
        self.code = code


#: the ``kind`` of the error reply to a request a bug kept from being converted
INTERNAL = "internal"
#: every ``kind`` an error reply can have: the metrics export each at 0 from the start and
#: the summary line counts each, so a rule or a drain has a series before the first error
ERROR_REASONS = tuple(sorted({cls.kind for cls in (
    ProtocolError, RateError, UnsupportedCurrency, DateOutOfRange, RateUnavailable)}
    | {INTERNAL}))
