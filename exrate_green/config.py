"""Settings: one frozen object built from the environment and the command line.

Flags override environment variables; every duration is in seconds and says so in its
name. Nothing here is read at import time: ``Settings.load(environ, flags)`` is called by
the entry point and the result is passed down.
"""

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

PROVIDERS = ("ecb", "frankfurter", "exchangerate.host")
LOG_FORMATS = ("text", "json")
#: the spellings a boolean variable accepts (any case); anything else is refused
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
#: where the full variable table lives (``--help`` and error lines point there)
VARIABLES_DOC = "README.md, section Configuration"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: the spellings logging itself accepts besides LOG_LEVELS
LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}


@dataclasses.dataclass(frozen=True)
class Settings:
    url: str = "wss://currency-assignment.ematiq.com"
    provider: str = "ecb"
    access_key: str | None = dataclasses.field(default=None, repr=False)
    exchangerate_host_url: str = "https://api.exchangerate.host"
    frankfurter_url: str = "https://api.frankfurter.dev/v1"
    cache_dir: Path = Path("~/.cache/exrate-green")
    cache_ttl_s: float = 7200.0
    #: seconds past freshness a table may still answer while its provider fails (0: never)
    stale_if_error_s: float = 604800.0
    #: Redis tier shared by a fleet (a password in it is a secret: never logged)
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    #: False accepts a self-signed rediss:// certificate (Heroku's), only when asked
    redis_verify: bool = True
    #: seconds a write may make no progress before the connection is abandoned
    send_timeout_s: float = 30.0
    #: serve /metrics and /healthz on this port; None: nothing listens
    metrics_port: int | None = None
    #: the address the metrics port binds: all interfaces by default, so a platform's
    #: health check from outside the container reaches it; "127.0.0.1" keeps it local
    metrics_host: str = "0.0.0.0"
    #: "text" (one readable line per event) or "json" (one JSON object per line)
    log_format: str = "text"
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 2.0
    http_timeout_s: float = 5.0
    #: concurrent rate fetches per provider (fetcher greenlets, pooled connections)
    fetch_concurrency: int = 8
    http_connect_timeout_s: float = 2.0
    shutdown_grace_s: float = 10.0
    show_messages: bool = False
    log_level: str = "INFO"
    #: a reply caught by a dropped connection is resent on the next one opened within this
    redelivery_window_s: float = 30.0
    #: requests waiting for a rate fetch at once; past it the reader stops reading
    max_in_flight: int = 10_000
    #: reconnect backoff cap (first retry is immediate)
    reconnect_max_delay_s: float = 10.0
    summary_interval_s: float = 60.0
    #: frames larger than this are skipped unread (DESIGN: 1 MiB)
    max_frame_bytes: int = 1 << 20
    #: CA bundle trusted for wss:// and https:// instead of the system CAs (private upstreams)
    ca_file: str | None = None
    #: if the reader or heartbeat greenlet makes no progress for this long, exit non-zero
    stall_exit_s: float = 30.0

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **flags: Any) -> "Settings":
        """Settings from ``environ`` (default ``os.environ``), then ``flags`` on top.

        ``flags`` holds only what the command line set (``None`` means unset). Raises
        ``ConfigError`` with one line saying what is wrong, naming the variable (or the
        flag) that set the bad value.
        """
        env = os.environ if environ is None else environ
        values = _from_environ(env)
        flags = {k: v for k, v in flags.items() if v is not None}
        values.update(flags)
        if "provider" not in values:
            values["provider"] = "exchangerate.host" if values.get("access_key") else "ecb"
        if isinstance(values.get("log_level"), str):
            level = values["log_level"].upper()
            values["log_level"] = LOG_LEVEL_ALIASES.get(level, level)
        settings = cls(**values)
        names = {field: f"--{field.replace('_', '-')}" for field in flags}
        settings.validate(names)
        return settings

    def validate(self, names: Mapping[str, str] | None = None) -> None:
        """Raise ``ConfigError`` (one line) for the first invalid setting.

        The message names the setting as the user wrote it: ``names`` maps a field to a
        command-line flag that set it; other fields go by their environment variable.
        """
        def name(field: str) -> str:
            return (names or {}).get(field) or VARIABLES.get(field, field)

        _check_url(name("url"), self.url, ("ws", "wss"))
        _check_url(name("exchangerate_host_url"), self.exchangerate_host_url, ("http", "https"))
        _check_url(name("frankfurter_url"), self.frankfurter_url, ("http", "https"))
        for provider in self.providers:
            if provider not in PROVIDERS:
                raise ConfigError(f"{name('provider')}: unknown provider {provider!r}: choose "
                                  f"one or more of {', '.join(PROVIDERS)}, comma-separated")
        if len(set(self.providers)) != len(self.providers):
            raise ConfigError(f"{name('provider')} names a provider twice: {self.provider!r}")
        if "exchangerate.host" in self.providers and not self.access_key:
            raise ConfigError("provider exchangerate.host needs EXCHANGE_ACCESS_KEY")
        if not 1 <= self.fetch_concurrency <= 256:
            raise ConfigError(f"{name('fetch_concurrency')} must be 1-256, "
                              f"got {self.fetch_concurrency!r}")
        for field in ("cache_ttl_s", "heartbeat_interval_s", "heartbeat_timeout_s",
                      "http_timeout_s", "http_connect_timeout_s", "shutdown_grace_s",
                      "redelivery_window_s", "reconnect_max_delay_s", "summary_interval_s",
                      "stall_exit_s", "send_timeout_s"):
            value = getattr(self, field)
            if not value > 0 or value == float("inf"):
                raise ConfigError(
                    f"{name(field)} must be a positive number of seconds, got {value!r}")
        if not 0 <= self.stale_if_error_s < float("inf"):
            raise ConfigError(f"{name('stale_if_error_s')} must be 0 or a positive number of "
                              f"seconds, got {self.stale_if_error_s!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"{name('metrics_port')} must be a port number (0-65535), "
                              f"got {self.metrics_port!r}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"{name('heartbeat_timeout_s')} ({self.heartbeat_timeout_s:g} s) must be longer "
                f"than {name('heartbeat_interval_s')} ({self.heartbeat_interval_s:g} s)")
        if self.max_in_flight < 1:
            raise ConfigError(f"{name('max_in_flight')} must be at least 1, "
                              f"got {self.max_in_flight!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"{name('log_level')}: unknown log level {self.log_level!r}: "
                              f"choose one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"{name('log_format')} must be text or json, "
                              f"got {self.log_format!r}")
        if not _HOST.fullmatch(self.metrics_host):
            raise ConfigError(f"{name('metrics_host')} must be an IP address or a host name "
                              f"(127.0.0.1 keeps the port local), got {self.metrics_host!r}")
        if self.redis_url is not None:
            check_redis_url(name("redis_url"), self.redis_url)
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ConfigError(f"{name('ca_file')}: CA file {self.ca_file!r} does not exist")

    @property
    def providers(self) -> tuple[str, ...]:
        """The provider chain, in order of preference: ``"exchangerate.host,ecb"`` gives
        ``("exchangerate.host", "ecb")``."""
        return tuple(name.strip() for name in self.provider.split(","))

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off``, any case; ``ValueError`` otherwise."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(text)


def _seconds(text: str) -> float:
    value = float(text)
    if value != value:  # NaN compares false with everything: refuse it by name
        raise ValueError(text)
    return value


_SECONDS = "a positive number of seconds"
_BOOLEAN = "1/0, true/false, yes/no or on/off"

# (environment variable, field, parser, what a valid value is: the error line says it)
_ENVIRONMENT = (
    ("EXRATE_URL", "url", str, "a ws:// or wss:// URL"),
    ("EXRATE_PROVIDER", "provider", str.lower, "a provider name"),
    ("EXCHANGE_ACCESS_KEY", "access_key", str, "an access key"),
    ("EXCHANGERATE_HOST_URL", "exchangerate_host_url", str, "an http:// or https:// URL"),
    ("FRANKFURTER_URL", "frankfurter_url", str, "an http:// or https:// URL"),
    ("EXRATE_CACHE_DIR", "cache_dir", Path, "a directory"),
    ("EXRATE_CACHE_TTL", "cache_ttl_s", _seconds, _SECONDS),
    ("EXRATE_HEARTBEAT_INTERVAL", "heartbeat_interval_s", _seconds, _SECONDS),
    ("EXRATE_HEARTBEAT_TIMEOUT", "heartbeat_timeout_s", _seconds, _SECONDS),
    ("EXRATE_HTTP_TIMEOUT", "http_timeout_s", _seconds, _SECONDS),
    ("EXRATE_SHUTDOWN_GRACE", "shutdown_grace_s", _seconds, _SECONDS),
    ("EXRATE_SHOW_MESSAGES", "show_messages", parse_bool, _BOOLEAN),
    ("LOG_LEVEL", "log_level", str.upper, "a log level"),
    ("LOG_FORMAT", "log_format", str.lower, "text or json"),
    ("EXRATE_REDELIVERY_WINDOW", "redelivery_window_s", _seconds, _SECONDS),
    ("EXRATE_MAX_IN_FLIGHT", "max_in_flight", int, "a whole number >= 1"),
    ("EXRATE_SUMMARY_INTERVAL", "summary_interval_s", _seconds, _SECONDS),
    ("EXRATE_CA_FILE", "ca_file", str, "a file"),
    ("EXRATE_STALL_EXIT", "stall_exit_s", _seconds, _SECONDS),
    ("EXRATE_STALE_IF_ERROR", "stale_if_error_s", _seconds,
     "a number of seconds >= 0 (0: never)"),
    ("REDIS_URL", "redis_url", str, "a redis://, rediss:// or unix:// URL"),
    ("EXRATE_REDIS_VERIFY", "redis_verify", parse_bool, _BOOLEAN),
    ("EXRATE_SEND_TIMEOUT", "send_timeout_s", _seconds, _SECONDS),
    ("EXRATE_METRICS_PORT", "metrics_port", int, "a port number (0-65535)"),
    ("EXRATE_METRICS_HOST", "metrics_host", str.strip, "an IP address or a host name"),
    ("EXRATE_FETCH_CONCURRENCY", "fetch_concurrency", int, "a whole number 1-256"),
)


#: field -> the environment variable that sets it
VARIABLES = {field: variable for variable, field, _, _ in _ENVIRONMENT}


def _from_environ(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {"cache_dir": default_cache_dir(env)}
    for variable, field, parse, expected in _ENVIRONMENT:
        raw = env.get(variable)
        if raw is None or raw == "":
            continue
        try:
            values[field] = parse(raw)
        except ValueError:
            raise ConfigError(f"{variable} must be {expected}, got {_shown(variable, raw)}") \
                from None
    return values


def _shown(variable: str, raw: str) -> str:
    """``raw`` quoted for an error line; a URL that may hold a password is masked."""
    if variable == "REDIS_URL":
        return repr(_masked_url(raw))
    return repr(raw[:80] + ("..." if len(raw) > 80 else ""))


def default_cache_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "exrate-green"


def _check_url(variable: str, url: str, schemes: tuple[str, ...]) -> None:
    """A URL with one of ``schemes``, a host and, if any, a valid port; else ``ConfigError``."""
    wanted = " or ".join(s + "://" for s in schemes)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  raises ValueError for a port out of range or not a number
    except ValueError as e:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        raise ConfigError(f"{variable} is not a valid URL ({e}): {url!r}") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"{variable} must be a {wanted} URL, got {url!r}")


#: an IPv4/IPv6 literal or a DNS name: what ``socket.bind`` can be given
_HOST = re.compile(r"[0-9A-Za-z.:%_-]{1,253}")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _masked_url(url: str) -> str:
    """``url`` with the password of its user part masked (it is a secret)."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def check_redis_url(variable: str, url: str) -> None:
    """A ``redis://host``, ``rediss://host`` or ``unix:///path`` URL, else ``ConfigError``
    (one line, password masked). Checked at start, in every command, before anything
    connects; the Redis tier asks the same function when it opens."""
    shown = _masked_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  raises ValueError for a port out of range or not a number
    except ValueError:
        raise ConfigError(f"{variable} is not a valid URL: {shown!r}") from None
    if parts.scheme not in _REDIS_SCHEMES:
        raise ConfigError(f"{variable} must be a redis://, rediss:// or unix:// URL, "
                          f"got {shown!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{variable} must name a host (redis://HOST:PORT), got {shown!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"{variable} must name a socket path (unix:///PATH), got {shown!r}")
