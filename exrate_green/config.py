"""Settings: one frozen object built from the environment and the command line.

Flags override environment variables; every duration is in seconds and says so in its
name. Nothing here is read at import time: ``Settings.load(environ, flags)`` is called by
the entry point and the result is passed down.
"""

import dataclasses
import os
import urllib.parse
from pathlib import Path

from .errors import ConfigError

PROVIDERS = ("ecb", "frankfurter", "exchangerate.host")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
    #: serve /metrics and /healthz on this port (all interfaces); None: nothing listens
    metrics_port: int | None = None
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
    def load(cls, environ=None, **flags):
        """Settings from ``environ`` (default ``os.environ``), then ``flags`` on top.

        ``flags`` holds only what the command line set (``None`` means unset). Raises
        ``ConfigError`` with one line saying what is wrong.
        """
        env = os.environ if environ is None else environ
        values = _from_environ(env)
        values.update({k: v for k, v in flags.items() if v is not None})
        if "provider" not in values:
            values["provider"] = "exchangerate.host" if values.get("access_key") else "ecb"
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self):
        _check_url("EXRATE_URL", self.url, ("ws", "wss"))
        _check_url("EXCHANGERATE_HOST_URL", self.exchangerate_host_url, ("http", "https"))
        _check_url("FRANKFURTER_URL", self.frankfurter_url, ("http", "https"))
        for name in self.providers:
            if name not in PROVIDERS:
                raise ConfigError(f"EXRATE_PROVIDER: unknown provider {name!r}: choose one "
                                  f"or more of {', '.join(PROVIDERS)}, comma-separated")
        if len(set(self.providers)) != len(self.providers):
            raise ConfigError(f"EXRATE_PROVIDER names a provider twice: {self.provider!r}")
        if "exchangerate.host" in self.providers and not self.access_key:
            raise ConfigError("provider exchangerate.host needs EXCHANGE_ACCESS_KEY")
        if not 1 <= self.fetch_concurrency <= 256:
            raise ConfigError(f"EXRATE_FETCH_CONCURRENCY must be 1-256, "
                              f"got {self.fetch_concurrency!r}")
        for name in ("cache_ttl_s", "heartbeat_interval_s", "heartbeat_timeout_s",
                     "http_timeout_s", "http_connect_timeout_s", "shutdown_grace_s",
                     "redelivery_window_s", "reconnect_max_delay_s", "summary_interval_s",
                     "stall_exit_s", "send_timeout_s"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 0 <= self.stale_if_error_s < float("inf"):
            raise ConfigError(f"EXRATE_STALE_IF_ERROR must be 0 or a positive number of "
                              f"seconds, got {self.stale_if_error_s!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"EXRATE_METRICS_PORT must be a port number (0-65535), "
                              f"got {self.metrics_port!r}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError("heartbeat timeout must be longer than the heartbeat interval")
        if self.max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"unknown log level {self.log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ConfigError(f"CA file {self.ca_file!r} does not exist")

    @property
    def providers(self):
        """The provider chain, in order of preference: ``"exchangerate.host,ecb"`` gives
        ``("exchangerate.host", "ecb")``."""
        return tuple(name.strip() for name in self.provider.split(","))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# (environment variable, field, parser)
_ENVIRONMENT = (
    ("EXRATE_URL", "url", str),
    ("EXRATE_PROVIDER", "provider", str.lower),
    ("EXCHANGE_ACCESS_KEY", "access_key", str),
    ("EXCHANGERATE_HOST_URL", "exchangerate_host_url", str),
    ("FRANKFURTER_URL", "frankfurter_url", str),
    ("EXRATE_CACHE_DIR", "cache_dir", Path),
    ("EXRATE_CACHE_TTL", "cache_ttl_s", float),
    ("EXRATE_HEARTBEAT_INTERVAL", "heartbeat_interval_s", float),
    ("EXRATE_HEARTBEAT_TIMEOUT", "heartbeat_timeout_s", float),
    ("EXRATE_HTTP_TIMEOUT", "http_timeout_s", float),
    ("EXRATE_SHUTDOWN_GRACE", "shutdown_grace_s", float),
    ("EXRATE_SHOW_MESSAGES", "show_messages", lambda v: v.strip().lower() in ("1", "true", "yes")),
    ("LOG_LEVEL", "log_level", str.upper),
    ("EXRATE_REDELIVERY_WINDOW", "redelivery_window_s", float),
    ("EXRATE_MAX_IN_FLIGHT", "max_in_flight", int),
    ("EXRATE_SUMMARY_INTERVAL", "summary_interval_s", float),
    ("EXRATE_CA_FILE", "ca_file", str),
    ("EXRATE_STALL_EXIT", "stall_exit_s", float),
    ("EXRATE_STALE_IF_ERROR", "stale_if_error_s", float),
    ("REDIS_URL", "redis_url", str),
    ("EXRATE_REDIS_VERIFY", "redis_verify", lambda v: v.strip().lower() not in ("0", "false", "no")),
    ("EXRATE_SEND_TIMEOUT", "send_timeout_s", float),
    ("EXRATE_METRICS_PORT", "metrics_port", int),
    ("EXRATE_FETCH_CONCURRENCY", "fetch_concurrency", int),
)


def _from_environ(env):
    values = {"cache_dir": default_cache_dir(env)}
    for variable, field, parse in _ENVIRONMENT:
        raw = env.get(variable)
        if raw is None or raw == "":
            continue
        try:
            values[field] = parse(raw)
        except ValueError:
            raise ConfigError(f"{variable}={raw!r} is not valid") from None
    return values


def default_cache_dir(env):
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "exrate-green"


def _check_url(variable, url, schemes):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(
            f"{variable} must be a {' or '.join(s + '://' for s in schemes)} URL, got {url!r}")
