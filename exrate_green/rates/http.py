"""One pooled HTTP client for the rate APIs: JSON in, one deadline per call, few retries.

Every failure leaves this module as ``RateUnavailable`` whose ``why`` is short, readable
and free of secrets ("HTTP 500 from api.frankfurter.dev", "timed out after 5.0 s waiting
for api.exchangerate.host"). The code runs under gevent's monkey-patching: sockets yield
to the hub, and ``gevent.Timeout`` bounds a whole call (requests' read timeout only bounds
each ``recv``, so a server trickling bytes could otherwise hold a fetch for ever).

Also here: the small helpers every provider shares (the UTC day, a day as a URL value, a
JSON number as a rate).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import gevent
import requests
import requests.adapters
import urllib3.exceptions

from .. import __version__
from ..backoff import Backoff
from ..errors import RateUnavailable
from ..protocol import is_currency_code  # noqa: F401  the one validator, for the providers
from ..redact import redact

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

USER_AGENT = f"exrate-green/{__version__} (python-requests/{requests.__version__})"

#: attempts per call, the first included; the deadline usually ends them sooner
MAX_ATTEMPTS = 4
#: first pause between attempts, doubled each time (0.25, 0.5, 1.0 s) and jittered by up
#: to -50 % so that clients failing together do not retry in lockstep
BACKOFF_S = 0.25
RETRY_BACKOFF = Backoff(BACKOFF_S, cap_s=4.0)  # the overall budget bounds it well before
#: a retry is started only if at least this much of the budget is left after its pause
MIN_ATTEMPT_S = 0.1
#: the socket's own read timeout is the budget left plus this, so that ``gevent.Timeout``
#: (one clear message) always fires first
READ_SLACK_S = 0.5
#: larger answers are refused: a day's table is a few kilobytes
MAX_BODY_BYTES = 1 << 20
#: longest excerpt of an API's own error text kept in a ``why``
MAX_DETAIL_CHARS = 160
#: redirects followed per attempt, each on the configured origin only
MAX_REDIRECTS = 3


class HttpError(RateUnavailable):
    """The API answered with an HTTP error status (``status``, an int) that is not retried."""

    def __init__(self, why: str, status: int) -> None:
        super().__init__(why)
        self.status = status


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix (429, 5xx, connection errors).

    ``retry_after_s`` is the server's Retry-After in seconds, or ``None``.
    """

    def __init__(self, why, retry_after_s=None):
        super().__init__(why)
        self.why = why
        self.retry_after_s = retry_after_s


class HttpClient:
    """GETs JSON from the rate APIs over one pooled ``requests.Session``.

    ``settings`` gives the connect timeout (``http_connect_timeout_s``, per connection
    attempt), the total budget of one ``get_json`` call retries and pauses included
    (``http_timeout_s``), the CA bundle (``ca_file``, else the system's) and the secret to
    keep out of every message (``access_key``). Safe to share between greenlets.
    """

    def __init__(self, settings: Settings, *, pool_size: int | None = None) -> None:
        self.timeout_s = settings.http_timeout_s
        self.connect_timeout_s = settings.http_connect_timeout_s
        self.verify = settings.ca_file or True
        self.secrets = tuple(s for s in (settings.access_key,) if s)
        self.pool_size = pool_size or pool_size_for(settings)
        self.session = _make_session(self.pool_size)
        #: HTTP requests sent (every attempt, retries included), by this client
        self.attempts = 0

    def get_json(self, url: str, params: Mapping[str, str] | None = None, *,
                 on_attempt: Callable[[], object] | None = None,
                 may_retry: Callable[[], bool] | None = None) -> Any:
        """The JSON answer of ``GET url?params``, decoded with floats as ``Decimal``.

        Retries 429, 5xx and connection failures with exponential backoff, honouring a
        Retry-After given in seconds; never waits or retries past ``http_timeout_s`` from
        the call. ``on_attempt()`` is called before each HTTP request is sent (to count
        them); ``may_retry()`` is asked before each retry (a provider whose breaker has
        seen failures makes one attempt). Raises ``RateUnavailable`` (``HttpError`` for
        other HTTP error statuses); no library exception leaves this method.
        """
        timeout = gevent.Timeout(self.timeout_s)
        timeout.start()
        try:
            return self._get_with_retries(url, params, time.monotonic() + self.timeout_s,
                                          on_attempt, may_retry)
        except gevent.Timeout as e:
            if e is not timeout:
                raise
            raise RateUnavailable(
                f"timed out after {self.timeout_s:.1f} s waiting for {self._where(url)}") from None
        finally:
            timeout.close()

    def close(self) -> None:
        """Close the pooled connections; idempotent."""
        self.session.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _get_with_retries(self, url, params, deadline, on_attempt, may_retry):
        where = self._where(url)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                self.attempts += 1
                if on_attempt is not None:
                    on_attempt()
                return self._attempt(url, params, where, deadline)
            except _Retryable as failure:
                pause = _pause_before_retry(failure, attempt)
                left = deadline - time.monotonic()
                if (attempt == MAX_ATTEMPTS or pause + MIN_ATTEMPT_S > left
                        or (may_retry is not None and not may_retry())):
                    raise RateUnavailable(
                        f"{failure.why} (gave up after {attempt} attempt"
                        f"{'s' if attempt > 1 else ''}, {max(left, 0):.1f} s of the "
                        f"{self.timeout_s:.1f} s budget left)") from failure.__cause__
                log.info("%s; retrying in %.2f s (attempt %d of %d)",
                         failure.why, pause, attempt + 1, MAX_ATTEMPTS)
                gevent.sleep(pause)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _attempt(self, url, params, where, deadline):
        """One attempt: GET, following redirects only within ``url``'s own origin."""
        origin = _origin(url)
        for _hop in range(MAX_REDIRECTS + 1):
            status, body, retry_after_s, location = self._send(url, params, where, deadline)
            if location is None:
                break
            url, params = self._redirect_target(url, location, origin, where), None
        else:
            raise RateUnavailable(f"{where} redirected more than {MAX_REDIRECTS} times")
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status} from {where}", retry_after_s)
        if not 200 <= status < 300:
            raise HttpError(f"HTTP {status} from {where}{self._detail(body)}", status)
        return self._decode(body, where)

    def _redirect_target(self, url, location, origin, where):
        """The absolute URL a redirect points to, if it stays on ``origin`` (scheme, host
        and port of the configured URL); else ``RateUnavailable``: a redirect elsewhere or
        to plain http would carry the access key (in the query) where it must not go."""
        target = urllib.parse.urljoin(url, location)
        if _origin(target) == origin:
            return target
        scheme = urllib.parse.urlsplit(target).scheme
        if origin[0] == "https" and scheme == "http":
            why = "plain http, a downgrade from https"
        else:
            why = f"another origin ({self._where(target)})"
        raise RateUnavailable(f"{where} redirected to {why}: not followed")

    def _send(self, url, params, where, deadline):
        """(status, body, Retry-After s, redirect Location or None) of one request."""
        left = max(deadline - time.monotonic(), 0.001)
        try:
            # requests would follow a redirect anywhere, query string (the key) and all:
            # redirects are ours to judge (``_redirect_target``).
            with self.session.get(url, params=params, stream=True, verify=self.verify,
                                  allow_redirects=False,
                                  timeout=(min(self.connect_timeout_s, left),
                                           left + READ_SLACK_S)) as response:
                # Read even error bodies: a fully read response returns its connection
                # to the pool, and the body may say what went wrong.
                body = _read_body(response, where)
                location = response.headers.get("Location") if response.is_redirect else None
                return response.status_code, body, _retry_after_s(response), location
        except requests.exceptions.SSLError as e:
            raise RateUnavailable(f"TLS error with {where}: {self._reason(e)}") from e
        except requests.exceptions.ConnectTimeout as e:
            raise _Retryable(f"connecting to {where} timed out") from e
        except requests.exceptions.ReadTimeout as e:
            raise RateUnavailable(
                f"timed out after {self.timeout_s:.1f} s waiting for {where}") from e
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            raise _Retryable(f"cannot reach {where}: {self._reason(e)}") from e
        except requests.RequestException as e:
            raise RateUnavailable(f"request to {where} failed: {self._reason(e)}") from e
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            # urllib3 errors requests does not wrap (a pool error, a protocol error while
            # streaming), socket errors, a malformed URL: translated here, never a class name.
            raise RateUnavailable(f"request to {where} failed: {self._reason(e)}") from e

    def _decode(self, body, where):
        try:
            return json.loads(body, parse_float=Decimal, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
            raise RateUnavailable(f"invalid JSON from {where}") from e

    def _where(self, url):
        """``host`` or ``host:port`` of ``url``: enough to say who failed, no path or query."""
        parts = urllib.parse.urlsplit(url)
        where = parts.hostname or "the rate API"
        if parts.port:
            where = f"{where}:{parts.port}"
        return redact(where, self.secrets)

    def _reason(self, error):
        return redact(_innermost_reason(error), self.secrets)

    def _detail(self, body):
        """``": <the API's own message>"``, short and redacted, or ``""``."""
        try:
            data = json.loads(body)
            text = data.get("message") or data.get("error") if isinstance(data, dict) else None
        except ValueError:
            text = body.decode("utf-8", "replace")
        if not text:
            return ""
        text = " ".join(str(text).split())
        if len(text) > MAX_DETAIL_CHARS:
            text = text[:MAX_DETAIL_CHARS - 3] + "..."
        return f": {redact(text, self.secrets)}"


def pool_size_for(settings: Settings) -> int:
    """Pooled connections per API host: one per fetcher greenlet of every provider in the
    chain (several providers may share a host), so no fetch ever waits for a connection."""
    return max(settings.fetch_concurrency * len(settings.providers), 1)


def _make_session(pool_size):
    session = requests.Session()
    session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
    # Retries are ours (within the budget), so urllib3's own are off. Concurrency is
    # bounded by the fetcher greenlets (EXRATE_FETCH_CONCURRENCY per provider), and the
    # pool holds one connection per fetcher, so nobody waits for a connection: with
    # pool_block=True, a gevent.Timeout ending a fetch that waited in urllib3's pool queue
    # returned None into a full pool (FullPoolError) and the budget included the wait.
    adapter = requests.adapters.HTTPAdapter(
        pool_connections=4, pool_maxsize=pool_size, pool_block=False, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # Every call passes allow_redirects=False (HttpClient._send judges redirects); 0 here
    # would make requests raise TooManyRedirects while merely preparing ``response.next``.
    session.max_redirects = MAX_REDIRECTS
    return session


def _origin(url):
    """(scheme, host, port) of ``url``, the port made explicit: what a secret is bound to."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    default = {"https": 443, "http": 80}.get(parts.scheme, -1)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port or default


def _read_body(response, where):
    chunks, size = [], 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RateUnavailable(f"answer from {where} is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _retry_after_s(response):
    """Retry-After in seconds, or ``None`` (absent, or in the HTTP-date form we ignore)."""
    value = response.headers.get("Retry-After", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _pause_before_retry(failure, attempt):
    if failure.retry_after_s is not None:
        return failure.retry_after_s
    return RETRY_BACKOFF.delay_s(attempt)


def _innermost_reason(error):
    """The root cause of a requests/urllib3 error, e.g. ``"Connection refused"``.

    requests wraps urllib3's ``MaxRetryError`` whose text repeats the whole URL; the OS
    error at the bottom of the chain says what happened in a few words.
    """
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "reason", None)
        if not isinstance(inner, BaseException):
            inner = error.args[0] if error.args and isinstance(error.args[0], BaseException) \
                else error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or "no detail given"


def _refuse_constant(name):
    raise ValueError(f"{name} is not a rate")


# --- shared by the providers ---------------------------------------------------------

def utc_today() -> datetime.date:
    """Today's date in UTC: the day whose rate ``latest``/``live`` endpoints give."""
    return datetime.datetime.now(datetime.UTC).date()


def as_day(day: datetime.date) -> datetime.date:
    """``day`` as a plain ``datetime.date`` (a ``datetime`` loses its time), else TypeError.

    Only a real date reaches a URL: its ``isoformat()`` is ``YYYY-MM-DD`` and nothing else.
    """
    if isinstance(day, datetime.datetime):
        return day.date()
    if isinstance(day, datetime.date):
        return datetime.date(day.year, day.month, day.day)
    raise TypeError(f"a datetime.date is needed, not {type(day).__name__}")


def to_rate(value: object) -> Decimal | None:
    """A JSON number as a positive finite ``Decimal``, or ``None`` if it is not one."""
    if isinstance(value, bool):
        return None
    try:
        rate = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return rate if rate.is_finite() and rate > 0 else None


def parse_day(value: object) -> datetime.date | None:
    """A ``YYYY-MM-DD`` string as a date, or ``None``."""
    try:
        return datetime.date.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
