"""Single-flight across processes: one fetch per table (or month) for a whole fleet.

A flight is taken before a rate-API call and held until the table is written to the
shared tiers; whoever does not get it polls the cache for the table instead of calling.
Two locks, both non-blocking (nothing here waits for another process):

* A lock file per key in ``<cache dir>/flights/``, taken with ``flock(LOCK_EX | LOCK_NB)``:
  processes on one machine sharing one cache directory. The kernel drops the lock when
  its holder dies, so a crashed process never blocks the others. The files stay (deleting
  a lock file another process has open would let two processes hold "the" lock); each is
  empty.
* With Redis, ``SET {prefix}flight:{provider}/{key} TOKEN NX PX ttl`` across machines (a
  Heroku fleet), released by compare-and-delete so a holder whose lock expired never
  drops a lock another process took since. A holder that dies keeps it for ``ttl_s``.

Failing open: when the lock file cannot be made (disk trouble) or Redis does not answer,
the flight is granted. A second fetch costs one API call; a refused flight nobody holds
would cost every request for that table until the lock expired.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .redis import RedisTier

log = logging.getLogger("exrate_green.cache")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def flight_name(provider: str, key: str) -> str:
    """``"ecb/2021-05"``; ``ValueError`` for names that could escape the flight directory."""
    if not (_NAME.fullmatch(provider) and _NAME.fullmatch(key)):
        raise ValueError(f"invalid flight {provider!r}/{key!r}")
    return f"{provider}/{key}"


class Flights:
    """Cross-process single-flight: ``flight(provider, key)`` yields True to one holder.

    ``directory``: where lock files go (created on first use). ``redis``: a ``RedisTier``
    or None. ``ttl_s``: seconds the Redis lock outlives a holder that died (a living holder
    releases it when done; it must finish within ``ttl_s``, else a second process may fetch).
    ``led`` and ``followed`` count flights this process was granted and refused.
    """

    def __init__(self, directory: str | os.PathLike[str], redis: RedisTier | None = None, *,
                 ttl_s: float = 15.0) -> None:
        self.directory = Path(directory).expanduser().absolute() / "flights"
        self.redis = redis
        self.ttl_s = float(ttl_s)
        self.led = 0
        self.followed = 0
        self._warned_disk = False

    @contextlib.contextmanager
    def flight(self, provider: str, key: str) -> Iterator[bool]:
        """True: this process should fetch (and write the tables before leaving the block);
        False: another process holds the flight: poll the cache instead. Never waits."""
        name = flight_name(provider, key)
        fd = self._lock_file(name)
        if fd is _HELD:
            self.followed += 1
            yield False
            return
        try:
            token = secrets.token_hex(16)
            redis = self.redis
            taken = redis.acquire(name, token, self.ttl_s) if redis else None
            if taken is False:
                self.followed += 1
                yield False
                return
            self.led += 1
            try:
                yield True
            finally:
                if taken and redis:  # only a Redis tier says True
                    redis.release(name, token)
        finally:
            if fd is not None:
                os.close(fd)  # closing the descriptor drops the flock

    def _lock_file(self, name):
        """An fd holding the flock of ``name``, ``_HELD`` if another holder has it, or
        None if no lock file can be made (the flight is then granted: fail open)."""
        path = self.directory / (name.replace("/", "_") + ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                return self._no_lock_file(e)
        except OSError as e:
            return self._no_lock_file(e)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _HELD
        except OSError as e:
            os.close(fd)
            return self._no_lock_file(e)
        return fd

    def _no_lock_file(self, e):
        if not self._warned_disk:
            log.warning("single-flight lock files in %s unavailable (%s): processes sharing "
                        "this cache directory may fetch the same table", self.directory, e)
            self._warned_disk = True


_HELD = object()
