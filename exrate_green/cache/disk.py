"""Rate tables on disk: diskcache underneath, JSON text on top, one thread touching it.

Why the shape:

* Values are ``RateTable.to_json()`` text and keys are ``"{provider}/{YYYY-MM-DD}"``
  strings. ``JsonDisk`` (``jsondisk.py``) refuses to store anything else and to decode a
  pickled key or value that something else wrote into the directory, so nobody who can
  write the cache can run code through it. Every row read is untrusted input, checked by
  ``RateTable.from_json`` after its size (a bad one is a deleted miss, ``rows.py``).
* SQLite never yields to the gevent hub, its lock waits block the whole process, and with
  a monkey-patched ``threading.local`` diskcache opens one connection per greenlet. So
  every disk access runs in ONE native thread (``ThreadPool(1)`` owned by the cache):
  one connection, three file descriptors (db, -wal, -shm), whatever the number of callers.
* A cache failure (locked, full, read-only, corrupt, malformed row) is a miss with a
  warning, never an exception out of ``get``/``put``: the rate provider is the source of
  truth, the cache only saves calls to it.

* Rows are kept ``ttl_s + stale_s`` seconds after the table's ``fetched_at``: fresh for
  ``ttl_s``, then held for stale-if-error use; the caller judges freshness.

The in-memory front for hot tables lives in the rate book (``rates/book.py``); this module
is the disk tier under it, ``tiers.TieredCache`` puts Redis below it.
"""

import contextlib
import datetime
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import diskcache
import gevent
import gevent.monkey
from gevent.threadpool import ThreadPool

from ..errors import CacheError
from ..rates.table import MAX_ROW_BYTES, RateTable
from .jsondisk import JsonCache, UnsafeRow
from .rows import BadRow, BadRowLog

log = logging.getLogger("exrate_green.cache")

#: SQLite's page cache, in 4 KiB pages (diskcache's default is 8,192: 32 MiB, plus a
#: 64 MiB memory map). Rows are a few KB and read once before the memory front holds
#: them, so 1 MiB and no map is plenty; a full cache's worth of pages resident would be a
#: third of the service's memory after a cold storm over every month since 1999.
SQLITE_CACHE_PAGES = 256
#: diskcache's database and SQLite's journal files: what a corrupt cache moves aside
DATABASE_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")
#: SQLite errors that mean the file is not a usable database (moved aside at start-up)
_CORRUPT = ("SQLITE_NOTADB", "SQLITE_CORRUPT")
#: everything the disk layer may raise that means "the cache failed", not "a bug"
_DISK_ERRORS = (diskcache.Timeout, sqlite3.Error, OSError)


class BadRowError(CacheError):
    """A row under our key that is not a rate table (deleted): a miss, warned about at
    most once a minute."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"row {key!r} is not a rate table: {why}")
        self.key, self.why = key, why


def _returning_failure(fn, *args):
    """``(None, fn(*args))``, or ``(CacheError, None)``: in the disk thread, a failure is
    returned, not raised, because gevent prints every exception raised in a threadpool
    to stderr, traceback and all; the caller's one warning line is the whole report."""
    try:
        return None, fn(*args)
    except CacheError as e:
        return e, None


def _usable_directory(directory: Path) -> tuple[Path, bool]:
    """(``directory`` made absolute with ``~`` expanded, False), or, when ``~`` cannot be
    expanded (HOME unset and a uid with no passwd entry, as in many containers), (a new
    private temporary directory, True) with one warning: a service without a home still
    serves, its disk cache lasting as long as the process."""
    try:
        return directory.expanduser().absolute(), False
    except RuntimeError:  # "Could not determine home directory"
        temporary = Path(tempfile.mkdtemp(prefix="exrate-green-cache-"))
        log.warning("no usable home directory for the cache at %s (HOME is unset and uid %d "
                    "has no passwd entry): using the temporary %s for this process; set "
                    "EXRATE_CACHE_DIR to keep tables across restarts", directory, os.getuid(),
                    temporary)
        return temporary, True


def table_entry(tier: str, table: RateTable | BadRow, expire_time: float | None,
                now: float) -> dict[str, Any]:
    """One ``cache list`` row: tier, provider, day, published (ISO dates), currencies
    (count), fetched_at (epoch s), expires_in_s (s, None: never), bad (why, or None)."""
    if isinstance(table, BadRow):
        return {"tier": tier, "provider": table.provider, "day": table.day,
                "published": "-", "currencies": 0, "fetched_at": None,
                "expires_in_s": None if expire_time is None else expire_time - now,
                "bad": table.why}
    return {"tier": tier, "provider": table.provider, "day": table.day.isoformat(),
            "published": table.published.isoformat(), "currencies": len(table.rates),
            "fetched_at": table.fetched_at,
            "expires_in_s": None if expire_time is None else expire_time - now, "bad": None}


def table_key(provider: str, day: datetime.date) -> str:
    """The cache key of one provider's table for one day: ``"ecb/2021-05-18"``."""
    return f"{provider}/{day.isoformat()}"


class TableCache:
    """Rate tables on disk (diskcache), JSON text only, kept ``ttl_s + stale_s`` after fetching.

    ``directory``: the cache directory (created by ``open``). ``ttl_s``: seconds a table
    is fresh after its ``fetched_at``; ``stale_s``: seconds it is kept beyond that for
    stale-if-error use (0: dropped when no longer fresh). ``timeout_s``: SQLite's wait for a
    lock held by another process, in seconds, per statement; short, so a locked cache degrades
    to misses quickly. ``wait_s``: the longest a ``get``/``put`` caller waits for the disk thread
    (queueing behind other callers included), in seconds.

    ``get`` and ``put`` are called from greenlets and never block the hub; the inspection
    methods (``entries``, ``tables_for``, ``stats``, ``clear``) may block and raise
    ``CacheError``: they are for the CLI, never for the service's hot path.

    ``hits``, ``misses`` and ``errors`` count this process's ``get`` calls (an error is
    also a miss); ``stats()`` reports diskcache's persistent counters across processes.
    """

    name = "disk"

    def __init__(self, directory: str | os.PathLike[str], ttl_s: float, *,
                 stale_s: float = 0.0, timeout_s: float = 1.0, wait_s: float = 5.0) -> None:
        self.directory, self._temporary = _usable_directory(Path(directory))
        self.ttl_s = float(ttl_s)
        self.stale_s = float(stale_s)
        #: seconds a row is kept after its table's fetched_at
        self.keep_s = self.ttl_s + self.stale_s
        self.timeout_s = float(timeout_s)
        self.wait_s = float(wait_s)
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.bad_rows = BadRowLog(self.name)
        self._pool: Any = None
        self._cache: Any = None  # touched only in the pool's thread
        self._enabled = False
        # After a lock timeout the disk is skipped until then (monotonic seconds): every
        # caller queued behind the one thread would otherwise wait out the same lock.
        self._skip_until = 0.0

    @property
    def where(self) -> str:
        """Where the tier keeps its tables, for ``cache stats``: the directory."""
        return str(self.directory)

    @property
    def enabled(self) -> bool:
        """True once ``open`` succeeded and until ``close``; else every get is a miss."""
        return self._enabled

    # -- life cycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating the directory) in the disk thread; never raises for disk trouble.

        A corrupt database is moved aside, its own files only (``cache.db`` and its
        ``-wal``/``-shm``), into ``<directory>/corrupt-<UTC timestamp>/`` with a warning, and
        a new one is created: the directory may hold files of the user's. If the cache
        still cannot be opened (read-only, full, locked longer than ``3 * timeout_s``) a
        warning is logged and the cache runs disabled: every get is a miss, every put a
        no-op.
        """
        if self._enabled:
            return
        if self._pool is None:
            self._pool = ThreadPool(1)
        self._enabled = self._pool.spawn(self._open).get()

    def close(self) -> None:
        """Close the database connection and stop the disk thread. Idempotent."""
        self._enabled = False
        pool, self._pool = self._pool, None
        if pool is None:
            self._remove_temporary()
            return
        try:
            with gevent.Timeout(self.wait_s, CacheError("disk thread busy at close")):
                pool.spawn(self._close).get()
        except (CacheError, *_DISK_ERRORS) as e:
            log.warning("closing the cache at %s: %s", self.directory, e)
        pool.kill()
        self._remove_temporary()

    def _remove_temporary(self):
        """A temporary directory (no usable home) goes with the process that made it."""
        if self._temporary:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._temporary = False

    # -- the service's path: greenlets, never an exception -------------------------------

    def get(self, provider: str, day: datetime.date) -> RateTable | None:
        """The cached table of ``provider`` for ``day`` (a ``datetime.date``), or ``None``.

        A table is returned while it is kept (``ttl_s + stale_s`` after its fetch; the
        caller judges freshness from ``fetched_at``). ``None`` for a miss, a table past
        that, or any cache failure (logged, counted in ``errors``; a malformed row is
        deleted).
        """
        table = self._call("read", self._read, table_key(provider, day))
        if table is None:
            self.misses += 1
        else:
            self.hits += 1
        return table

    def put(self, table: RateTable) -> bool:
        """Store ``table``, kept ``ttl_s + stale_s`` seconds after ``table.fetched_at``.

        Returns True when written; False when the table is already past that, the cache is
        disabled, or the write failed (logged, counted in ``errors``).
        """
        return bool(self._call("write", self._write, table))

    def put_many(self, tables: Iterable[RateTable]) -> int:
        """Store every table of ``tables`` in one transaction (one trip to the disk
        thread); returns how many were written (0 if the write failed, logged)."""
        tables = list(tables)
        if not tables:
            return 0
        return self._call("write", self._write_many, tables) or 0

    def _call(self, what, fn, *args):
        """``fn(*args)`` in the disk thread, waiting at most ``wait_s``; None on failure."""
        if not self._enabled:
            return None
        try:
            timeout = CacheError(f"no answer from the disk thread within {self.wait_s:g}s")
            with gevent.Timeout(self.wait_s, timeout):
                failure, value = self._pool.spawn(_returning_failure, fn, *args).get()
            if failure is not None:
                raise failure
            return value
        except BadRowError as e:
            self.errors += 1
            self.bad_rows.report(e.key, e.why)
            return None
        except CacheError as e:
            self.errors += 1
            log.warning("cache %s failed, treated as a miss: %s", what, e)
            return None

    # -- inspection, for the CLI: may block, raises CacheError ----------------------------

    def entries(self) -> list[dict[str, Any]]:
        """One dict per live table: provider, day, published (ISO dates), currencies (count),
        fetched_at (epoch seconds), expires_in_s (seconds, None if it never expires)."""
        return self._inspect(self._entries)

    def tables_for(self, day: datetime.date) -> list[RateTable]:
        """Every live cached table for ``day``, one per provider, sorted by provider."""
        return self._inspect(self._tables_for, day)

    def stats(self) -> dict[str, Any]:
        """directory, entries (live tables), bytes (disk volume), hits and misses (diskcache's
        persistent counters, shared by every process using the directory)."""
        return self._inspect(self._stats)

    def clear(self) -> int:
        """Remove every table; returns how many rows were removed."""
        return self._inspect(self._clear)

    def _inspect(self, fn, *args):
        if not self._enabled:
            raise CacheError(f"the cache at {self.directory} is not available")
        return self._pool.spawn(fn, *args).get()

    # -- below: run in the disk thread only ----------------------------------------------

    def _open(self):
        try:
            self._cache = self._connect()
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorname", None) not in _CORRUPT:
                return self._disable(e)
            try:
                moved = self._move_aside()
                log.warning("cache database in %s is corrupt (%s): moved aside to %s, "
                            "starting an empty one", self.directory, e, moved)
                self._cache = self._connect()
            except _DISK_ERRORS as e2:
                return self._disable(e2)
        except _DISK_ERRORS as e:
            return self._disable(e)
        return True

    def _connect(self):
        return JsonCache(self.directory, timeout=self.timeout_s,
                          lock_wait_s=3 * self.timeout_s, statistics=1,
                         sqlite_cache_size=SQLITE_CACHE_PAGES, sqlite_mmap_size=0)

    def _move_aside(self):
        """Move the database's own files into a new ``corrupt-STAMP`` subdirectory;
        nothing else in the directory is touched (it may be a user's)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.directory / f"corrupt-{stamp}"
        n = 0
        while target.exists():
            n += 1
            target = self.directory / f"corrupt-{stamp}-{n}"
        target.mkdir(mode=0o700)
        for name in DATABASE_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.directory / name, target / name)
        return target

    def _disable(self, e):
        log.warning("cache at %s cannot be opened, running without it "
                    "(every lookup is a miss): %s", self.directory, e)
        self._cache = None
        return False

    def _close(self):
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def _read(self, key):
        self._check_not_skipping()
        try:
            size = self._row_size(key)
            if size > MAX_ROW_BYTES:
                raise UnsafeRow(f"{size} bytes, larger than any rate table")
            text = self._cache.get(key)
        except ValueError as e:  # UnsafeRow, or a text file that is not UTF-8
            self._discard(key)
            raise BadRowError(key, f"refused: {e}") from e
        except _DISK_ERRORS as e:
            raise self._failure(f"cannot read {key!r}", e) from e
        return None if text is None else self._parse(key, text)

    def _row_size(self, key):
        """Bytes of the row's in-database value (0 if none): known before SQLite loads
        it, so a planted 32 MB row is refused without being read."""
        row = self._cache._sql("SELECT length(CAST(value AS BLOB)) FROM Cache "
                               "WHERE key = ? AND raw = 1", (key,)).fetchone()
        return (row[0] or 0) if row else 0

    def _parse(self, key, text):
        """The table of a row just read, or None when too old; a bad row is deleted
        and raised as ``BadRowError``."""
        try:
            table = self._decode(key, text)
        except ValueError as e:
            self._discard(key)
            raise BadRowError(key, str(e)) from e
        if table.fetched_at + self.keep_s <= time.time():
            return None  # written by a process that keeps tables longer; too old for ours
        return table

    def _decode(self, key, text):
        """``RateTable`` of the row ``key``; ``ValueError`` if it is not that table."""
        if not isinstance(text, str):
            raise ValueError("not JSON text")
        table = RateTable.from_json(text)
        if table_key(table.provider, table.day) != key:
            raise ValueError(f"holds the table of {table_key(table.provider, table.day)!r}")
        return table

    def _write(self, table):
        expire_s = table.fetched_at + self.keep_s - time.time()
        if expire_s <= 0:
            return False
        self._check_not_skipping()
        key = table_key(table.provider, table.day)
        try:
            return self._cache.set(key, table.to_json(), expire=expire_s)
        except _DISK_ERRORS as e:
            raise self._failure(f"cannot write {key!r}", e) from e

    def _write_many(self, tables):
        now = time.time()
        keep = [t for t in tables if t.fetched_at + self.keep_s > now]
        if not keep:
            return 0
        self._check_not_skipping()
        try:
            with self._cache.transact():  # one commit (one fsync) for a month of tables
                for table in keep:
                    self._cache.set(table_key(table.provider, table.day), table.to_json(),
                                    expire=table.fetched_at + self.keep_s - now)
        except _DISK_ERRORS as e:
            raise self._failure(f"cannot write {len(keep)} tables", e) from e
        return len(keep)

    def _discard(self, key):
        try:
            self._cache.delete(key)
        except _DISK_ERRORS as e:
            log.warning("could not delete the bad row %r: %s", key, e)

    def _check_not_skipping(self):
        if self._cache is None:
            raise CacheError("the cache is closed")
        if time.monotonic() < self._skip_until:
            raise CacheError("skipped: the cache was locked by another process a moment ago")

    def _failure(self, what, e):
        if isinstance(e, diskcache.Timeout) or "locked" in str(e):
            self._skip_until = time.monotonic() + 2 * self.timeout_s
            return CacheError(f"{what}: locked by another process for over "
                              f"{self.timeout_s:g}s")
        return CacheError(f"{what}: {e!r}")

    def _entries(self):
        now = time.time()
        return [table_entry(self.name, table, expire_time, now)
                for table, expire_time in self._live_tables(lambda key: True)]

    def _tables_for(self, day):
        suffix = "/" + day.isoformat()
        tables = [t for t, _ in self._live_tables(lambda key: key.endswith(suffix))]
        return sorted(tables, key=lambda t: t.provider)

    def _stats(self):
        try:
            self._cache.expire()  # so that "entries" counts live tables only
            hits, misses = self._cache.stats(enable=True)
            bad = sum(isinstance(t, BadRow) for t, _ in self._live_tables(lambda key: True))
            return {"tier": self.name, "where": str(self.directory),
                    "entries": len(self._cache), "bad_rows": bad,
                    "bytes": self._cache.volume(), "hits": hits, "misses": misses}
        except _DISK_ERRORS as e:
            raise CacheError(f"cannot read cache statistics: {e!r}") from e

    def _clear(self):
        try:
            return self._cache.clear()
        except _DISK_ERRORS as e:
            raise CacheError(f"cannot clear the cache: {e!r}") from e

    def _live_tables(self, wanted):
        """(table or ``BadRow``, expire_time) for every unexpired row whose key is
        wanted; bad rows are shown as bad, not deleted (inspection changes nothing)."""
        found = []
        with self._quiet_statistics():
            try:
                for key in self._text_keys():
                    if wanted(key):
                        found += self._inspectable(key)
            except _DISK_ERRORS as e:
                raise CacheError(f"cannot list the cache: {e!r}") from e
        return found

    def _inspectable(self, key):
        try:
            size = self._row_size(key)
            if size > MAX_ROW_BYTES:
                raise UnsafeRow(f"{size} bytes, larger than any rate table")
            value, expire_time = self._cache.get(key, expire_time=True)
            if value is None:
                return []  # expired or removed meanwhile
            table = self._decode(key, value)
        except ValueError as e:
            return [(BadRow(self.name, key, str(e)), None)]
        if table.fetched_at + self.keep_s <= time.time():
            return []  # kept longer by another process; too old for ours
        return [(table, expire_time)]

    def _text_keys(self):
        # SQLite sorts TEXT before BLOB, so iterkeys() yields every string key before any
        # pickled (BLOB) key, where JsonDisk refuses and the listing stops.
        keys = []
        try:
            for key in self._cache.iterkeys():
                if type(key) is str:
                    keys.append(key)
        except UnsafeRow:
            log.warning("the cache holds rows with pickled keys, not written by "
                        "exrate-green: ignored (`cache clear` removes them)")
        return keys

    @contextlib.contextmanager
    def _quiet_statistics(self):
        # Listing reads every row; it must not count as hits in the shared statistics.
        # update=False changes this connection's setting only, not the Settings table.
        self._cache.reset("statistics", 0, update=False)
        try:
            yield
        finally:
            self._cache.reset("statistics", 1, update=False)
