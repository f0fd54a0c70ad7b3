"""Rate tables in Redis, shared by a fleet: JSON text, bounded calls, failures are misses.

Why the shape:

* On Heroku-style platforms every dyno's disk is wiped at each restart, and several dynos
  run at once: Redis is the one store they share. Each table is one string key
  ``{prefix}table:{provider}/{YYYY-MM-DD}`` holding ``RateTable.to_json()`` text, expiring
  ``ttl_s + stale_s`` seconds after the table was fetched. JSON, never pickles: anyone who
  can read the store can inspect it, nobody who can write it can run code through it.
* Every call has a total deadline (``deadline_s``, a ``gevent.Timeout`` over pool wait,
  connect, TLS, send and receive). redis-py's sockets are gevent's after monkey-patching, so
  a call only ever suspends its own greenlet, never the hub. redis-py disconnects a
  connection interrupted mid-command (``except BaseException``), so a deadline never
  leaves a half-read reply in the pool.
* Redis down, restarted or slow is a miss, never an error: the provider is the source of
  truth. After a failure the tier rests (1 s, doubling to ``max_rest_s``), then one caller
  probes while the others carry on without Redis; the next success ends the rest
  (redis-py reconnects by itself). A warning is logged at most once per ``warn_every_s``.
* Reads never depend on writes: a lookup is one read-only command (``GETRANGE``, bounded
  to ``MAX_ROW_BYTES + 1`` bytes so a planted 32 MB row never crosses the wire), and a
  Redis that refuses writes (a read-only replica, OOM with ``noeviction``) is not "down":
  the refusal is warned about once a minute and reads carry on. Hit counters are
  best-effort, counted beside the lookup, never in its way.
* Rows are untrusted input: anything under our keys that is not a table this service
  could have written (wrong type, too large, not JSON, implausible) is a miss, deleted
  best-effort, with one warning a minute.
* The password of ``REDIS_URL`` is a secret: the tier shows the URL as ``where`` with the
  password replaced by ``***`` and redacts it from every text it produces.
"""

import datetime
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable

import gevent
import redis
from gevent.pool import Group
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import config
from ..backoff import Backoff
from ..errors import CacheError, ConfigError
from ..ratelimit import RateLimitedLog
from ..rates.table import MAX_ROW_BYTES, RateTable
from ..redact import MASK, redact
from .disk import table_entry, table_key
from .rows import BadRow, BadRowLog

log = logging.getLogger("exrate_green.cache")

#: what a Redis call may raise that means "Redis failed", not "a bug"
_REDIS_ERRORS = (redis.RedisError, OSError, ValueError)

#: errors that mean "Redis refuses to write", not "Redis is down": reads go on. (A
#: pipeline wraps the reply in "Command # 1 (...) of pipeline caused error: ...", so the
#: classes are checked, and the texts for the refusals redis-py has no class for.)
_REFUSED = (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError,
            redis.exceptions.NoPermissionError)
_REFUSAL_WORDS = ("READONLY", "OOM command", "MISCONF", "NOREPLICAS", "read only replica")
#: hit-counter increments in flight at once; past it a count is dropped (best-effort)
MAX_COUNTS = 16
# A flight lock is deleted only by its holder (the token), never after it expired and
# another process took it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def redis_password(url: str | None) -> str | None:
    """The password in a Redis URL (``redis://user:PASSWORD@host``), or None."""
    if not url:
        return None
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        return None
    return urllib.parse.unquote(password) if password else None


def redacted_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: safe to show and log."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if parts.password:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{hostport}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return f"<unparsable Redis URL, {len(url)} characters>"


def check_redis_url(url: str) -> None:
    """``ConfigError`` (one line naming REDIS_URL, password masked) unless ``url`` is a
    usable ``redis://host[:port][/db]``, ``rediss://...`` or ``unix:///path`` URL."""
    config.check_redis_url("REDIS_URL", url)


class _Failed:
    """The result of a call that failed (a miss); distinct from Redis answering nil."""


FAILED = _Failed()
_CALL, _SKIP, _PROBE = "call", "skip", "probe"


class RedisTier:
    """Rate tables in Redis at ``url`` (``redis://``, ``rediss://`` or ``unix://``).

    ``ttl_s`` and ``stale_s`` (seconds): a table is kept ``ttl_s + stale_s`` after its
    ``fetched_at``. ``verify=False`` accepts a self-signed certificate for ``rediss://``.
    ``prefix`` starts every key. ``deadline_s`` bounds every service-path call (seconds,
    everything included); ``max_connections`` bounds the pool (a caller waits for a free
    connection within its deadline). Raises ``ConfigError`` for a URL it cannot use.

    ``get``, ``put``, ``put_many``, ``acquire`` and ``release`` never raise and never take
    longer than ``deadline_s``; the inspection methods (``entries``, ``tables_for``,
    ``stats``, ``clear``) raise ``CacheError`` and are for the CLI. ``hits``, ``misses``
    and ``errors`` count this process's lookups (an error is also a miss). ``clock``
    (monotonic seconds) times the rests after failures and the warnings.
    """

    name = "redis"

    def __init__(self, url: str, ttl_s: float, *, stale_s: float = 0.0, verify: bool = True,
                 prefix: str = "exrate-green:", deadline_s: float = 1.0,
                 max_connections: int = 16, warn_every_s: float = 60.0,
                 max_rest_s: float = 10.0, inspect_deadline_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.where = redacted_url(url)
        self._secrets = [s for s in (redis_password(url),) if s]
        self.ttl_s = float(ttl_s)
        self.keep_s = self.ttl_s + float(stale_s)
        self.prefix = prefix
        self.deadline_s = float(deadline_s)
        self.warn_every_s = float(warn_every_s)
        self.max_rest_s = float(max_rest_s)
        self.inspect_deadline_s = float(inspect_deadline_s)
        self.clock = clock  # monotonic seconds: rests and warning intervals
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self._client = redis.Redis(connection_pool=self._pool(url, verify, max_connections))
        self.bad_rows = BadRowLog(self.name)
        #: writes Redis refused (read-only replica, OOM): counted, never a rest
        self.refusals = 0
        self._refusal_log = RateLimitedLog(log, self.warn_every_s, clock=self.clock)
        self._counts = Group()  # best-effort counters and deletions, nobody waits for them
        self._release = self._client.register_script(_RELEASE)
        self._stats_key = f"{prefix}stats"
        # health: after a failure no call is made until _rest_until (monotonic seconds),
        # then one caller probes (_probing) while the others skip Redis
        self._rest = Backoff(1.0, self.max_rest_s, jitter=0.0)  # 1 s doubling to the cap
        self._rests = 0  # rests in a row (one per outage step, see _failed)
        self._rest_s = 0.0
        self._rest_began = 0.0
        self._rest_until = 0.0
        self._probing = False
        self._failures = 0
        self._failure_log = RateLimitedLog(log, self.warn_every_s, clock=self.clock)

    @property
    def enabled(self) -> bool:
        """True unless the tier is resting after a failure (a lookup then is a miss)."""
        return self._rest_s == 0.0

    def _pool(self, url, verify, max_connections):
        check_redis_url(url)
        options = {
            "socket_connect_timeout": self.deadline_s,
            "socket_timeout": self.deadline_s,
            "socket_keepalive": True,
            "health_check_interval": 30,
            "retry": Retry(NoBackoff(), 0),  # our deadline is the budget: no retries
            "max_connections": max_connections,
            "timeout": self.deadline_s,  # waiting for a free pooled connection
        }
        if url.startswith("rediss:") and not verify:
            options.update(ssl_cert_reqs="none", ssl_check_hostname=False)
        try:
            return redis.BlockingConnectionPool.from_url(url, **options)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"REDIS_URL {self.where!r} is not valid: "
                              f"{self._redact(e)}") from None

    def close(self) -> None:
        """Close every pooled connection. Idempotent."""
        self._counts.kill(timeout=0.5)
        self._client.connection_pool.disconnect()

    # -- the service's path: greenlets, bounded, never an exception ----------------------

    def get(self, provider: str, day: datetime.date) -> RateTable | None:
        """The table of ``provider`` for ``day`` while kept, else None (a failure too)."""
        key = table_key(provider, day)
        text = self._call("read", self._read_row, self._key(key))
        table = None if text is FAILED else self._parse(key, text)
        if table is None:
            self.misses += 1
        else:
            self.hits += 1
        if text is not FAILED:
            self._count("hits" if table is not None else "misses")
        return table

    def _read_row(self, rkey):
        """At most ``MAX_ROW_BYTES + 1`` bytes of the row (b"" if none), or a ``BadRow``
        reason for a key of another type; one read-only command."""
        try:
            return self._client.getrange(rkey, 0, MAX_ROW_BYTES)
        except redis.ResponseError as e:
            if "WRONGTYPE" not in str(e):
                raise
            return "not a string key"

    def _count(self, field):
        """Add one to the fleet's ``field`` counter, best-effort, beside the lookup."""
        self._beside(self._client.hincrby, self._stats_key, field, 1)

    def _beside(self, fn, *args):
        """``fn(*args)`` best-effort in a greenlet of its own: the lookup never waits for
        it (at most ``MAX_COUNTS`` at once; past that, or while Redis rests, skipped)."""
        if len(self._counts) < MAX_COUNTS and self.enabled:
            self._counts.spawn(self._best_effort, fn, *args)

    def _best_effort(self, fn, *args):
        """``fn(*args)`` within ``deadline_s``; any failure ignored (and not counted
        against Redis's health): for counters and deleting bad rows."""
        try:
            with gevent.Timeout(self.deadline_s, False):
                fn(*args)
        except _REDIS_ERRORS:
            pass

    def put(self, table: RateTable) -> bool:
        """Store ``table`` until ``ttl_s + stale_s`` after its fetch; True when written."""
        return self.put_many([table]) == 1

    def put_many(self, tables: Iterable[RateTable]) -> int:
        """Store ``tables`` in one round trip (a pipeline); how many were written."""
        now = time.time()
        keep = [(t, int((t.fetched_at + self.keep_s - now) * 1000)) for t in tables]
        keep = [(t, ms) for t, ms in keep if ms > 0]
        if not keep:
            return 0
        done = self._call("write", self._set_all, keep)
        return 0 if done is FAILED else len(keep)

    def acquire(self, name: str, token: str, ttl_s: float) -> bool | None:
        """Take the flight lock ``name`` for ``ttl_s`` seconds (``SET NX PX``): True if
        taken, False if another process holds it, None if Redis did not answer."""
        got = self._call("lock", self._client.set, self._flight_key(name), token,
                         nx=True, px=max(1, int(ttl_s * 1000)))
        return None if got is FAILED else bool(got)

    def release(self, name: str, token: str) -> None:
        """Drop the flight lock ``name`` if ``token`` still holds it (compare-and-delete)."""
        self._call("unlock", self._release, [self._flight_key(name)], [token])

    def _set_all(self, keep):
        pipe = self._client.pipeline(transaction=False)
        for table, ms in keep:
            pipe.set(self._key(table_key(table.provider, table.day)), table.to_json(), px=ms)
        return pipe.execute()

    def _key(self, key):
        return f"{self.prefix}table:{key}"

    def _flight_key(self, name):
        return f"{self.prefix}flight:{name}"

    def _parse(self, key, text):
        if text == b"":
            return None  # GETRANGE of a missing key (an empty row is no table either)
        try:
            table = self._decode(key, text)
        except ValueError as e:  # UnicodeDecodeError included
            self.errors += 1
            self.bad_rows.report(key, str(e))
            self._beside(self._client.delete, self._key(key))
            return None
        if table.fetched_at + self.keep_s <= time.time():
            return None  # written by a process that keeps tables longer
        return table

    def _decode(self, key, text):
        """The ``RateTable`` in a row read by ``_read_row``; ``ValueError`` otherwise."""
        if isinstance(text, str):
            raise ValueError(text)  # _read_row's reason
        if len(text) > MAX_ROW_BYTES:
            raise ValueError("larger than any rate table")
        table = RateTable.from_json(text)
        if table_key(table.provider, table.day) != key:
            raise ValueError(f"holds the table of {table_key(table.provider, table.day)!r}")
        return table

    def ping(self) -> bool:
        """One bounded PING through the tier's own failure accounting (a failure rests the
        tier and warns, rate-limited); True if Redis answered."""
        return self._call("ping", self._client.ping) is not FAILED

    def _call(self, what, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` within ``deadline_s``; ``FAILED`` when Redis failed or
        is resting after a failure."""
        mode = self._may_call()
        if mode is _SKIP:
            return FAILED
        started = self.clock()
        deadline = gevent.Timeout(self.deadline_s)
        deadline.start()
        try:
            value = fn(*args, **kwargs)
        except gevent.Timeout as e:
            if e is not deadline:
                raise
            return self._failed(what, f"no answer within {self.deadline_s:g} s", started)
        except redis.ResponseError as e:
            if isinstance(e, _REFUSED) or any(w in str(e) for w in _REFUSAL_WORDS):
                # the server's own words, without the pipeline's echo of the command
                return self._refused(what, self._redact(e).rpartition("caused error: ")[2])
            return self._failed(what, self._redact(e), started)
        except _REDIS_ERRORS as e:
            return self._failed(what, self._redact(e), started)
        finally:
            deadline.cancel()
            if mode is _PROBE:
                self._probing = False
        self._succeeded()
        return value

    # -- health: rest after a failure, one probe, warn at most once per warn_every_s -----

    def _may_call(self):
        """``_CALL`` while Redis is well, ``_SKIP`` while it rests after a failure (or
        another caller probes it), ``_PROBE`` for the one caller that tries it again."""
        if self._rest_s == 0.0:
            return _CALL
        if self._probing or self.clock() < self._rest_until:
            return _SKIP
        self._probing = True  # the others skip Redis until this call ends
        return _PROBE

    def _failed(self, what, reason, started):
        self.errors += 1
        self._failures += 1
        now = self.clock()
        # Calls already under way when a rest began fail with it: one outage, one step
        # of the backoff (20 lookups hitting a dead Redis at once must not mean 10 s).
        if started >= self._rest_began:
            self._rests += 1
            self._rest_s = self._rest.delay_s(self._rests)
            self._rest_began, self._rest_until = now, now + self._rest_s
        self._failure_log.warning(
            "Redis at %s failed (%s: %s), carrying on with memory and disk, retrying in %g s",
            self.where, what, reason, self._rest_s)
        return FAILED

    def _refused(self, what, reason):
        """Redis answered but refused (a write on a replica, OOM): it is up, reads go on."""
        self.refusals += 1
        self._refusal_log.warning("Redis at %s refused a %s (%s): reading only (%d refusal(s) "
                                  "so far)", self.where, what, reason[:120], self.refusals)
        return FAILED

    def _succeeded(self):
        if self._rest_s:
            log.info("Redis at %s answers again (after %d failed calls)",
                     self.where, self._failures)
        self._rest_s = 0.0
        self._rests = 0
        self._failures = 0

    def _redact(self, e):
        return redact(str(e) or type(e).__name__, self._secrets)

    # -- inspection, for the CLI: may take a while, raises CacheError --------------------

    def entries(self) -> list:
        """One dict per kept table: tier, provider, day, published, currencies (count),
        fetched_at (epoch seconds), expires_in_s (seconds until Redis drops it)."""
        now = time.time()
        return [table_entry(self.name, table, None if pttl < 0 else now + pttl / 1000, now)
                for _key, table, pttl in self._inspect(self._scan_tables)]

    def tables_for(self, day: datetime.date) -> list[RateTable | BadRow]:
        """Every kept table for ``day`` (or ``BadRow``), one per provider, by provider."""
        suffix = "/" + day.isoformat()
        found = self._inspect(self._scan_tables, suffix)
        return sorted((table for _, table, _ in found), key=lambda t: t.provider)

    def stats(self) -> dict:
        """tier, where (URL, password masked), entries, bytes (Redis memory of the tables),
        hits and misses (counted in Redis by every process of the fleet)."""
        return self._inspect(self._stats)

    def clear(self) -> int:
        """Remove every table and the statistics; returns how many tables were removed."""
        return self._inspect(self._clear)

    def _inspect(self, fn, *args):
        try:
            with gevent.Timeout(self.inspect_deadline_s,
                                CacheError(f"Redis at {self.where} gave no answer within "
                                           f"{self.inspect_deadline_s:g} s")):
                return fn(*args)
        except _REDIS_ERRORS as e:
            raise CacheError(f"Redis at {self.where}: {self._redact(e)}") from None

    def _table_keys(self):
        pattern = _glob_escape(self._key("")) + "*"
        keys = self._client.scan_iter(match=pattern, count=500)
        return sorted(k.decode() for k in keys if _is_utf8(k))  # others were not ours

    def _scan_tables(self, suffix=""):
        keys = [k for k in self._table_keys() if k.endswith(suffix)]
        found = []
        for start in range(0, len(keys), 200):
            batch = keys[start:start + 200]
            pipe = self._client.pipeline(transaction=False)
            for key in batch:
                pipe.getrange(key, 0, MAX_ROW_BYTES)
                pipe.pttl(key)
            answers = pipe.execute(raise_on_error=False)
            for key, text, pttl in zip(batch, answers[::2], answers[1::2]):
                table = self._inspectable(key[len(self._key("")):], text)
                if table is not None:
                    found.append((key, table, pttl if isinstance(pttl, int) else -1))
        return found

    def _inspectable(self, key, text):
        """The table, a ``BadRow`` (shown as bad, left in place), or None (gone, old)."""
        if isinstance(text, Exception):
            text = "not a string key" if "WRONGTYPE" in str(text) else str(text)[:80]
        if text == b"":
            return None
        try:
            table = self._decode(key, text)
        except ValueError as e:
            return BadRow(self.name, key, str(e))
        return None if table.fetched_at + self.keep_s <= time.time() else table

    def _stats(self):
        keys = self._table_keys()
        size = 0
        for start in range(0, len(keys), 200):
            pipe = self._client.pipeline(transaction=False)
            for key in keys[start:start + 200]:
                pipe.memory_usage(key)
            size += sum(n or 0 for n in pipe.execute())
        try:
            counts = self._client.hgetall(self._stats_key)
        except redis.ResponseError:  # something else under our key: no counts to show
            counts = {}
        bad = sum(isinstance(t, BadRow) for _, t, _ in self._scan_tables())
        return {"tier": self.name, "where": self.where, "entries": len(keys),
                "bad_rows": bad, "bytes": size,
                "hits": _count_of(counts, b"hits"), "misses": _count_of(counts, b"misses")}

    def _clear(self):
        keys = self._table_keys()
        removed = 0
        for start in range(0, len(keys), 500):
            removed += self._client.delete(*keys[start:start + 500])
        self._client.delete(self._stats_key)
        return removed


def _count_of(counts, field):
    """A counter from the stats hash, 0 if missing or not a number (anyone may write it)."""
    try:
        return max(int(counts.get(field, 0)), 0)
    except ValueError:
        return 0


def _is_utf8(key):
    try:
        key.decode()
    except UnicodeDecodeError:
        return False
    return True


def _glob_escape(text):
    """``text`` with Redis glob metacharacters escaped, for ``SCAN MATCH``."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
