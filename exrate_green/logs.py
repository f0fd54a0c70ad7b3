"""Logging: one line per event, as text or as JSON, secrets redacted, nothing forgeable.

``setup_logging(settings, stream)`` installs one handler on the root logger:

- ``LOG_FORMAT=text`` (default): ``2026-12-07T05:52:57.123Z INFO exrate_green: message``.
  Every message is passed through ``escape_for_log`` (line and paragraph separators, C0 and
  C1 controls, bidi overrides), so text from outside (an echoed payload field, a server's
  error text) can never start a new line that reads as one of ours. A traceback's
  continuation lines are indented, so they never start with a timestamp either.
- ``LOG_FORMAT=json``: one JSON object per line (python-json-logger), with ``timestamp``,
  ``level``, ``logger``, ``message``, the event's ``extra`` fields as keys, and a traceback in
  the one field ``exception``. The encoder escapes every non-ASCII character, so a message
  cannot break the line either. Anything else that reaches stderr (a greenlet's uncaught
  error, a warning, an interpreter traceback) is turned into such an object too
  (``JsonLines``), so a drain can parse every line of the process.

Both formats redact the secrets (access key, Redis password) from the whole record.

``format_summary`` and ``Summary`` build the service's periodic summary in l2met form
(``count#`` per interval, ``sample#`` for levels and percentiles): see docs/operations.md.
"""

from __future__ import annotations

import datetime
import io
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import IO, TYPE_CHECKING, Any

from pythonjsonlogger.json import JsonFormatter

from .redact import RedactingFormatter, redact

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("exrate_green")

# -- escaping ------------------------------------------------------------------------------

#: what may end or fake a line in some reader, or reorder what a terminal shows: C0 controls
#: (\n, \r, ESC...), DEL, C1 controls (U+0085 NEL, U+009B CSI...), the Unicode line and
#: paragraph separators, and the bidi embedding/override/isolate controls
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_for_log(text: str) -> str:
    """``text`` with every character that could end or forge a log line escaped.

    ``\\n`` becomes the four characters ``\\x0a``, U+2028 becomes ``\\u2028``, U+009B
    becomes ``\\x9b``; everything else (printable non-ASCII included) is kept as it is.
    Costs one ``str.isprintable`` call for an ordinary line.
    """
    if text.isprintable():  # False for every character _UNSAFE matches: the common case
        return text
    return _UNSAFE.sub(_escape_one, text)


# -- text format ---------------------------------------------------------------------------

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(RedactingFormatter):
    """``RedactingFormatter`` in UTC whose message is escaped and whose traceback's lines
    are indented: one event, one line that starts with a timestamp."""

    converter = staticmethod(lambda secs=None: time.gmtime(secs))  # UTC, as the protocol
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_for_log(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(stack_info)


def _indented(text: str) -> str:
    """Every line of a traceback escaped and indented: never a line that passes for an event."""
    return "\n".join("    " + escape_for_log(line) for line in text.splitlines())


# -- JSON format ---------------------------------------------------------------------------

class JsonLogFormatter(JsonFormatter):
    """python-json-logger's formatter with our field names, UTC timestamps and redaction.

    ``secrets`` are masked in every string field and in the encoded line (a secret inside
    a nested value). The encoder's ``ensure_ascii`` escapes every non-ASCII character.
    """

    def __init__(self, secrets: Iterable[str | None] | None = ()) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception",
                           "stack_info": "stack"},
            timestamp=False, json_ensure_ascii=True, json_default=str)
        self.secrets = tuple(str(secret) for secret in secrets or () if secret)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        log_data["timestamp"] = _utc_iso(record.created)  # first, as in the text format
        super().add_fields(log_data, record, message_dict)
        for noise in ("color_message", "taskName"):  # set by other libraries' records
            log_data.pop(noise, None)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        # every string, secrets or not: any access_key= value is masked as well
        for key, value in log_data.items():
            if isinstance(value, str):
                log_data[key] = redact(value, self.secrets)
        return log_data

    def serialize_log_record(self, log_data: dict[str, Any]) -> str:
        return redact(super().serialize_log_record(log_data), self.secrets)


def _utc_iso(epoch_s: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch_s, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonLines(io.TextIOBase):
    """A text stream that turns whatever is written to it into JSON log lines.

    Installed as ``sys.stderr`` in JSON mode: writes are buffered up to a line end, and
    what was written in one burst (a traceback printed line by line) becomes one object,
    emitted at the next line that looks like the start of another event or on ``flush``.
    A line that is already a JSON object passes through unchanged.
    """

    def __init__(self, raw: IO[str], logger_name: str = "stderr",
                 level: str = "ERROR") -> None:
        super().__init__()
        self.raw = raw
        self.formatter = JsonLogFormatter()
        self.logger_name = logger_name
        self.level = level
        self._buffer = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            if self._buffer.endswith("\n"):
                self._emit()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._emit()
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def isatty(self) -> bool:
        return False

    def _emit(self) -> None:
        text, self._buffer = self._buffer.rstrip("\n"), ""
        if not text:
            return
        if text.startswith("{") and text.endswith("}") and "\n" not in text:
            self.raw.write(text + "\n")
            return
        record = logging.LogRecord(self.logger_name, logging.getLevelName(self.level), "",
                                   0, text, None, None)
        self.raw.write(self.formatter.format(record) + "\n")


# -- setup ---------------------------------------------------------------------------------

def setup_logging(settings: Settings, stream: IO[str] | None = None, *,
                  stray: bool = True) -> logging.Handler:
    """One handler on the root logger writing to ``stream`` (default stdout: platforms read
    a worker's logs there; one-shot commands pass stderr so stdout holds only the answer).

    Returns the handler. In JSON mode (and ``stray``), also routes what bypasses logging
    (warnings, a greenlet's or thread's uncaught exception, prints to stderr) into JSON
    lines.
    """
    from .cache.redis import redis_password  # the Redis password is a secret too

    stream = sys.stdout if stream is None else stream
    secrets = [settings.access_key, redis_password(settings.redis_url)]
    formatter: logging.Formatter
    if settings.log_format == "json":
        formatter = JsonLogFormatter(secrets)
        if stray:
            _route_stray_output_to_logging()
    else:
        formatter = TextFormatter(TEXT_FORMAT, secrets=secrets)
    handler = logging.StreamHandler(_raw(stream))
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    messages = logging.getLogger("exrate_green.messages")
    messages.setLevel(logging.INFO if settings.show_messages else logging.WARNING)
    for each in (sys.stdout, sys.stderr):
        if hasattr(each, "reconfigure"):
            each.reconfigure(line_buffering=True)  # platforms read logs through a pipe
    return handler


def install_json_stderr() -> None:
    """``sys.stderr`` as ``JsonLines`` (idempotent): called as early as the command line
    knows ``LOG_FORMAT=json``, so even a configuration error is a JSON line."""
    if not isinstance(sys.stderr, JsonLines):
        sys.stderr = JsonLines(sys.stderr)


def _raw(stream: IO[str]) -> IO[str]:
    """The stream under a ``JsonLines`` (our own records need no second encoding)."""
    return stream.raw if isinstance(stream, JsonLines) else stream


def _route_stray_output_to_logging() -> None:
    install_json_stderr()
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(
        args.exc_type, args.exc_value, args.exc_traceback)
    try:
        import gevent
    except ImportError:  # pragma: no cover  (gevent is a dependency)
        return
    hub = gevent.get_hub()
    hub.print_exception = _log_greenlet_error  # instead of a traceback printed to stderr


def _log_uncaught(kind: Any, value: Any, tb: Any) -> None:
    log.critical("uncaught %s", getattr(kind, "__name__", kind), exc_info=(kind, value, tb))


def _log_greenlet_error(context: Any, kind: Any, value: Any, tb: Any) -> None:
    if value is None and isinstance(kind, BaseException):
        kind, value = type(kind), kind
    log.error("%s failed with %s", context if isinstance(context, str) else repr(context),
              getattr(kind, "__name__", kind), exc_info=(kind, value, tb) if value else None)


# -- the periodic summary ------------------------------------------------------------------

def format_summary(counts: Mapping[str, int], samples: Mapping[str, float | int | None],
                   *, prefix: str = "exrate.") -> str:
    """The summary line in l2met form: ``count#exrate.requests=12 ... sample#exrate.p99_ms=4.1``.

    ``counts``: events in this interval (a drain sums them); ``samples``: levels and
    percentiles as they are now (a drain keeps the last). A sample of ``None`` (no figure,
    e.g. a percentile with no reply in the interval) is left out. Names keep their order.
    """
    words = [f"count#{prefix}{name}={int(value)}" for name, value in counts.items()]
    for name, value in samples.items():
        if value is None:
            continue
        shown = f"{value:.2f}" if isinstance(value, float) else str(int(value))
        words.append(f"sample#{prefix}{name}={shown}")
    return " ".join(words)


class Summary:
    """Turns cumulative counters into per-interval counts for ``format_summary``.

    ``line(cumulative, samples)`` returns the summary line of the interval since the
    previous call; ``fields`` then holds the same figures as a flat dict (``requests``,
    ``sample.p99_ms``...) to pass as a log record's ``extra`` (JSON mode keys).
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self.fields: dict[str, float | int] = {}

    def line(self, cumulative: Mapping[str, int],
             samples: Mapping[str, float | int | None]) -> str:
        counts = {name: value - self._last.get(name, 0) for name, value in cumulative.items()}
        self._last = dict(cumulative)
        self.fields = {**{f"count.{k}": v for k, v in counts.items()},
                       **{f"sample.{k}": v for k, v in samples.items() if v is not None}}
        return format_summary(counts, samples)
