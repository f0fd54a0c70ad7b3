"""diskcache that stores and reads JSON text only, and never waits a minute for a lock.

``JsonDisk`` refuses to store anything but strings and refuses to decode a pickled key or
value (or a value file larger than any rate table) that something else wrote into the
directory, so nobody who can write the cache can run code through it or make it read a
32 MB row. ``JsonCache`` is ``diskcache.Cache`` over it with bounded lock waits.
"""

import os
import sqlite3
import time

import diskcache
import gevent.monkey

from ..rates.table import MAX_ROW_BYTES

#: the disk thread is a native thread: a patched time.sleep there would start a second hub
_native_sleep = gevent.monkey.get_original("time", "sleep")


class UnsafeRow(ValueError):
    """A row that is not JSON text (a pickle, bytes, a number), or too large to be a
    table; it is never decoded."""


class JsonDisk(diskcache.Disk):
    """``diskcache.Disk`` for string keys and string values only; never calls pickle.

    diskcache pickles any key or value that is not str/bytes/int/float and unpickles
    whatever a row says is a pickle. Here storing such a thing is a ``TypeError`` and
    reading one is ``UnsafeRow``, so a row planted by another writer is refused unread.
    """

    def put(self, key: object) -> tuple[object, bool]:
        if type(key) is not str:
            raise TypeError(f"cache keys are strings, not {type(key).__name__}")
        return super().put(key)

    def get(self, key: object, raw: bool) -> object:
        if not raw:
            raise UnsafeRow("pickled key refused")
        return super().get(key, raw)

    def store(self, value: object, read: bool,
              key: object = diskcache.UNKNOWN) -> tuple[int, int, str | None, object]:
        if type(value) is not str or read:
            raise TypeError(f"cache values are JSON text, not {type(value).__name__}")
        return super().store(value, read, key)

    def fetch(self, mode: int, filename: str | None, value: object, read: bool) -> object:
        # MODE_RAW holds short text in the row, MODE_TEXT long text in a file beside it;
        # both are read as text. Pickles and bytes are refused without being read.
        if mode == diskcache.core.MODE_RAW and type(value) is str:
            return value
        if mode == diskcache.core.MODE_TEXT and not read and filename:
            size = os.path.getsize(os.path.join(self._directory, filename))
            if size > MAX_ROW_BYTES:  # checked before reading: a real table is a few KB
                raise UnsafeRow(f"row file of {size} bytes refused unread")
            return super().fetch(mode, filename, value, read)
        raise UnsafeRow(f"row stored in mode {mode} refused: only JSON text is read")


class JsonCache(diskcache.Cache):
    """``diskcache.Cache`` over ``JsonDisk`` whose lock waits are bounded.

    diskcache retries "database is locked" for 60 s in ``__init__`` and ``reset`` (outside
    transactions, where its ``timeout`` does not apply). A cache is not worth a minute of
    start-up: this gives up after ``lock_wait_s`` seconds and the caller treats it as a
    failure. (Overrides the private ``_sql_retry`` of diskcache 5.6.)
    """

    def __init__(self, directory, timeout, lock_wait_s, **settings):
        self._lock_wait_s = lock_wait_s
        try:
            super().__init__(directory, timeout=timeout, disk=JsonDisk, **settings)
        except BaseException:
            # A half-built instance still holds its SQLite connection: close it now, so
            # the corrupt file can be moved aside and no descriptor leaks.
            if hasattr(self, "_local"):
                self.close()
            raise

    @property
    def _sql_retry(self):
        sql = self._sql
        deadline = time.monotonic() + self._lock_wait_s

        def execute(statement, *args, **kwargs):
            while True:
                try:
                    return sql(statement, *args, **kwargs)
                except sqlite3.OperationalError as e:
                    if str(e) != "database is locked" or time.monotonic() > deadline:
                        raise
                    _native_sleep(0.01)

        return execute
