"""A fake of both rate APIs on ``gevent.pywsgi``, offline, from the bundled ECB history.

Frankfurter lives under ``/v1`` (``/v1/YYYY-MM-DD``, ``/v1/latest``, the range
``/v1/YYYY-MM-DD..YYYY-MM-DD``) and exchangerate.host at the root (``/historical``,
``/live``), so one server stands in for both::

    with FakeRateApi() as api:
        settings = Settings(frankfurter_url=api.url + "/v1", exchangerate_host_url=api.url)
        api.fail_next(1, "500")          # the next request fails, the one after is served

Days after the bundle get the bundle's last rates, re-published every weekday (dated the
latest weekday on or before the day asked, as a live API would date them), so "recent"
days work offline and pass the service's publication checks.
exchangerate.host also quotes a few currencies the ECB does not (``EXTRA_RATES``), like the
real one; Frankfurter, like the real one, does not. A wrong access key is answered the way
careless real APIs do: the error text repeats the request URL, key included.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import typing
import urllib.parse
import wsgiref.util
from collections.abc import Mapping
from decimal import Context, Decimal

import gevent
import gevent.event
from gevent.pywsgi import WSGIServer

from ..rates.ecb_bundle import EcbBundle
from ..rates.table import FIRST_DAY

log = logging.getLogger(__name__)

#: Units per 1 EUR of currencies exchangerate.host quotes and the ECB does not; fixed,
#: near their May 2021 values (the upstream's historical window).
EXTRA_RATES = {
    "UAH": Decimal("33.6"),
    "BTC": Decimal("0.0000245"),   # 1 BTC ~ 40,800 EUR
    "ZWL": Decimal("393.6"),       # 322 ZWL per USD, the old official peg
}
FAULT_MODES = ("500", "429", "hang", "bad_json", "api_error")
#: how long a "hang" holds its request (``stop()`` ends it sooner)
HANG_S = 60.0
#: exchangerate.host's quotes carry about 7 significant digits
_QUOTES = Context(prec=7)


#: the endpoints ``calls_by_endpoint`` counts
ENDPOINTS = ("frankfurter.day", "frankfurter.latest", "frankfurter.range",
             "exchangerate.host.historical", "exchangerate.host.live")


class _Request:
    """One request to a rate route: which API ``shape``, which ``endpoint``, the ``day``
    asked for (a date, or ``None`` if malformed; a range's first day), ``end`` (a range's
    last day), the query and the full URL (for errors that echo it)."""

    def __init__(self, shape, day, query, url, endpoint, end=None):
        self.shape, self.day, self.query, self.url = shape, day, query, url
        self.endpoint, self.end = endpoint, end


class FakeRateApi:
    """Frankfurter and exchangerate.host on ``host:port`` (port 0: any free one).

    ``latency_s`` delays every answer (changeable while running); ``extra_rates`` adds to
    or overrides ``EXTRA_RATES`` ({code: units per EUR}); ``access_key`` is the one key
    exchangerate.host accepts (``None``: any non-empty key). ``calls`` counts requests to
    rate routes, ``calls_by_day`` counts single-day ones by the day asked for (a
    ``datetime.date``; ``latest``/``live`` count under today's UTC date),
    ``calls_by_range`` range calls by (start, end), ``calls_by_endpoint`` every call by
    endpoint (``ENDPOINTS``), ``max_concurrent`` the most requests in progress at once.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency_s: float = 0.0,
                 extra_rates: Mapping[str, Decimal] | None = None,
                 access_key: str | None = None, bundle: EcbBundle | None = None) -> None:
        self.host, self.port = host, port
        self.latency_s = latency_s
        self.extra_rates = {**EXTRA_RATES, **(extra_rates or {})}
        self.access_key = access_key
        self.calls = 0
        self.calls_by_day: collections.Counter[datetime.date] = collections.Counter()
        self.calls_by_range: collections.Counter[tuple] = collections.Counter()
        self.calls_by_endpoint: collections.Counter[str] = collections.Counter()
        self.max_concurrent = 0  # most requests being answered at once
        self._active = 0
        self._bundle = bundle or EcbBundle()
        self._faults: collections.deque[str] = collections.deque()
        self._stopping = gevent.event.Event()
        self._server: WSGIServer | None = None

    # --- running ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://host:port`` once started; Frankfurter is at ``url + "/v1"``."""
        if self._server is None:
            raise RuntimeError("FakeRateApi is not started")
        return f"http://{self.host}:{self._server.server_port}"

    @property
    def frankfurter_url(self) -> str:
        return self.url + "/v1"

    @property
    def exchangerate_host_url(self) -> str:
        return self.url

    def start(self) -> FakeRateApi:
        # Indexing the bundle is ~20 ms of CPU: off the hub, before the first request.
        gevent.get_hub().threadpool.apply(self._bundle.load)
        self._stopping.clear()
        # log=None: an access log would print every access_key to stderr.
        self._server = WSGIServer((self.host, self.port), self._app, log=None, error_log=log)
        self._server.start()
        return self

    def stop(self, timeout: float = 0.5) -> None:
        """Stop serving; hanging and delayed requests end at once, keep-alive ones within
        ``timeout`` seconds."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop(timeout=timeout)

    def __enter__(self) -> FakeRateApi:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- test controls ---------------------------------------------------------------

    def fail_next(self, n: int, mode: str) -> None:
        """Fail the next ``n`` requests with ``mode``, after any failures already queued:
        "500", "429" (Retry-After: 1), "hang" (no answer for ``HANG_S``), "bad_json",
        "api_error" (exchangerate.host: success false; Frankfurter: HTTP 422)."""
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault {mode!r}: choose one of {', '.join(FAULT_MODES)}")
        self._faults.extend([mode] * n)

    def reset(self) -> None:
        """Zero the counters and drop queued failures."""
        self.calls = 0
        self.calls_by_day.clear()
        self.calls_by_range.clear()
        self.calls_by_endpoint.clear()
        self.max_concurrent = 0
        self._faults.clear()

    # --- the WSGI application ----------------------------------------------------------

    def _app(self, environ, start_response):
        request = self._route(environ)
        if request is None:
            return _json(start_response, "404 Not Found", {"message": "not found"})
        self._count(request)
        self._active += 1
        self.max_concurrent = max(self.max_concurrent, self._active)
        try:
            if self.latency_s > 0:
                self._stopping.wait(self.latency_s)
            if self._faults:
                return self._FAILURES[self._faults.popleft()](self, request, start_response)
            if request.endpoint == "frankfurter.range":
                return self._frankfurter_range(request, start_response)
            if request.shape == "frankfurter":
                return self._frankfurter(request, start_response)
            return self._exchangerate_host(request, start_response)
        finally:
            self._active -= 1

    def _route(self, environ):
        path = environ.get("PATH_INFO", "")
        query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        url = wsgiref.util.request_uri(environ)
        today = datetime.datetime.now(datetime.UTC).date()
        if path in ("/v1/latest", "/v1/latest/"):
            return _Request("frankfurter", today, query, url, "frankfurter.latest")
        if path.startswith("/v1/") and ".." in path:
            start, _, end = path[len("/v1/"):].rstrip("/").partition("..")
            return _Request("frankfurter", _day(start), query, url, "frankfurter.range",
                            _day(end) if end else today)
        if path.startswith("/v1/"):
            return _Request("frankfurter", _day(path[len("/v1/"):].rstrip("/")), query, url,
                            "frankfurter.day")
        if path == "/live":
            return _Request("exchangerate.host", today, query, url, "exchangerate.host.live")
        if path == "/historical":
            return _Request("exchangerate.host", _day(query.get("date", "")), query, url,
                            "exchangerate.host.historical")
        return None

    def _count(self, request):
        self.calls += 1
        self.calls_by_endpoint[request.endpoint] += 1
        if request.endpoint == "frankfurter.range":
            self.calls_by_range[(request.day, request.end)] += 1
        elif request.day is not None:
            self.calls_by_day[request.day] += 1

    def _frankfurter(self, request, start_response):
        if request.day is None or request.day < FIRST_DAY:
            return _json(start_response, "404 Not Found", {"message": "not found"})
        if request.query.get("base", "EUR") != "EUR":
            return _json(start_response, "422 Unprocessable Entity",
                         {"message": "the fake serves base=EUR only"})
        published, rates = self._rates(request.day)
        rates.pop("EUR")
        return _json(start_response, "200 OK", {
            "amount": Decimal("1.0"), "base": "EUR", "date": published.isoformat(),
            "rates": dict(sorted(rates.items()))})

    def _frankfurter_range(self, request, start_response):
        """``{"amount":1.0,"base":"EUR","start_date":..,"end_date":..,"rates":{day:{..}}}``:
        one entry per publication from START to END (both included), like the real API."""
        start, end = request.day, request.end
        if start is None or end is None or end < start or end < FIRST_DAY:
            return _json(start_response, "404 Not Found", {"message": "not found"})
        if request.query.get("base", "EUR") != "EUR":
            return _json(start_response, "422 Unprocessable Entity",
                         {"message": "the fake serves base=EUR only"})
        rates = {}
        for day in self._publications(max(start, FIRST_DAY), end):
            table = self._rates(day)[1]
            table.pop("EUR")
            rates[day.isoformat()] = dict(sorted(table.items()))
        days = list(rates) or [start.isoformat(), end.isoformat()]
        return _json(start_response, "200 OK", {
            "amount": Decimal("1.0"), "base": "EUR", "start_date": days[0],
            "end_date": days[-1], "rates": rates})

    def _exchangerate_host(self, request, start_response):
        key = request.query.get("access_key")
        if not key:
            return _api_error(start_response, 101, "missing_access_key",
                              "You have not supplied an API Access Key. [Required format: "
                              "access_key=YOUR_ACCESS_KEY]")
        if self.access_key is not None and key != self.access_key:
            return _api_error(start_response, 101, "invalid_access_key",
                              "You have not supplied a valid API Access Key. "
                              f"[Technical Support: support@apilayer.com] (request: {request.url})")
        if request.day is None or request.day < FIRST_DAY:
            return _api_error(start_response, 302, "invalid_date",
                              "You have entered an invalid date. [Required format: "
                              "date=YYYY-MM-DD]")
        published, rates = self._rates(request.day)
        rates.update(self.extra_rates)
        usd = rates["USD"]
        body = {"success": True, "terms": "https://exchangerate.host/terms",
                "privacy": "https://exchangerate.host/privacy",
                "timestamp": _end_of_day(published), "source": "USD",
                "quotes": {f"USD{code}": _QUOTES.divide(rate, usd)
                           for code, rate in sorted(rates.items())}}
        if "date" in request.query:
            body.update(historical=True, date=request.day.isoformat())
        return _json(start_response, "200 OK", body)

    def _rates(self, day):
        """(publication day, {code: units per EUR}) valid on ``day``; after the bundle's
        end, the bundle's last rates dated the latest weekday on or before ``day``."""
        last = self._bundle.last_day
        table = self._bundle.table(min(day, last))
        if day <= last:
            return table.published, dict(table.rates)
        published = max(_weekday_on_or_before(day), last)
        return published, dict(table.rates)

    def _publications(self, first, last):
        """The publication days from ``first`` to ``last``: the bundle's, then weekdays."""
        days = self._bundle.publications(first, last)
        day = max(first, self._bundle.last_day + datetime.timedelta(days=1))
        while day <= last:
            if day.weekday() < 5:
                days.append(day)
            day += datetime.timedelta(days=1)
        return days

    # --- one handler per failure mode --------------------------------------------------

    def _fail_500(self, request, start_response):
        return _json(start_response, "500 Internal Server Error",
                     {"message": "internal server error"})

    def _fail_429(self, request, start_response):
        return _json(start_response, "429 Too Many Requests",
                     {"message": "rate limit exceeded"}, [("Retry-After", "1")])

    def _fail_hang(self, request, start_response):
        self._stopping.wait(HANG_S)
        return _json(start_response, "503 Service Unavailable", {"message": "gave up"})

    def _fail_bad_json(self, request, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"amount":1.0,"base":"EUR","rates":{"USD":1.2']

    def _fail_api_error(self, request, start_response):
        if request.shape == "frankfurter":
            return _json(start_response, "422 Unprocessable Entity",
                         {"message": "the fake was told to refuse this request"})
        return _api_error(start_response, 104, "usage_limit_reached",
                          "Your monthly usage limit has been reached. Please upgrade your "
                          "Subscription Plan.")

    _FAILURES: typing.ClassVar[dict] = {"500": _fail_500, "429": _fail_429, "hang": _fail_hang,
                                         "bad_json": _fail_bad_json,
                                         "api_error": _fail_api_error}


def _day(text):
    try:
        return datetime.date.fromisoformat(text) if len(text) == 10 else None
    except ValueError:
        return None


def _weekday_on_or_before(day):
    return day - datetime.timedelta(days=max(day.weekday() - 4, 0))


def _end_of_day(day):
    """The epoch second at which ``day``'s rates were last quoted (23:59:59 UTC)."""
    moment = datetime.datetime.combine(day, datetime.time(23, 59, 59), datetime.UTC)
    return int(moment.timestamp())


def _api_error(start_response, code, kind, info):
    # apilayer answers its errors with HTTP 200; only the body says it failed.
    return _json(start_response, "200 OK",
                 {"success": False, "error": {"code": code, "type": kind, "info": info}})


def _json(start_response, status, body, headers=()):
    data = _dumps(body).encode("utf-8")
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data))), *headers])
    return [data]


def _dumps(value):
    """JSON text with ``Decimal``s written as the exact numbers they hold (json cannot)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    return json.dumps(value)
