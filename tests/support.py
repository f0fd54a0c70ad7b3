"""Helpers shared by the tests: the service in-process, and as a real subprocess."""

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import gevent

from exrate_green.config import Settings
from exrate_green.runtime import Runtime
from exrate_green.service import Service

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin" / "exrate-service"

FAST_BEATS = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 0.5}


@contextlib.contextmanager
def running_service(url, cache_dir, **overrides):
    """The service in this process against ``url``, stopped (gracefully) on exit."""
    settings = Settings(**{"url": url, "cache_dir": Path(cache_dir), "provider": "ecb",
                           "summary_interval_s": 3600.0, **overrides})
    settings.validate()
    runtime = Runtime(settings)
    service = Service(settings, runtime.book)
    runner = gevent.spawn(service.run)
    try:
        yield service
    finally:
        stopper = gevent.spawn(service.stop)
        stopper.join(timeout=settings.shutdown_grace_s + 3)
        runner.join(timeout=3)
        gevent.killall([stopper, runner], timeout=1)
        runtime.close()
        if runner.exception is not None:
            raise runner.exception


def wait_until(predicate, timeout_s, interval_s=0.01):
    """Poll ``predicate`` until it is truthy; return its last value."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        gevent.sleep(interval_s)
        value = predicate()
    return value


def service_env(tmp_path, **variables):
    """A clean environment for a subprocess: only what docs/design.md names, plus PATH.

    Not gevent's monitor thread: started by a process that exits before its hub ever ran,
    it fails at interpreter shutdown and prints a traceback (a gevent artefact).
    """
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "EXRATE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in variables.items()})
    return env


def start_service(args, env):
    """``bin/exrate-service ARGS`` as a subprocess (stdout and stderr merged)."""
    return subprocess.Popen([sys.executable, str(BIN), *args], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_service(args, env, timeout_s=30):
    return subprocess.run([sys.executable, str(BIN), *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout_s)


class ServiceProcess:
    """``bin/exrate-service`` as a subprocess against ``url``, its output collected line by
    line by a greenlet (so the pipe never fills and the test can read it at any time)."""

    def __init__(self, tmp_path, url, **env):
        self.lines = []
        self.proc = start_service([], service_env(tmp_path, EXRATE_URL=url, **env))
        self.reader = gevent.spawn(self._read)

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace"))

    @property
    def output(self):
        return "".join(self.lines)

    def wait(self, timeout_s):
        """Wait for the exit; (exit code, seconds waited)."""
        started = time.monotonic()
        code = self.proc.wait(timeout=timeout_s)
        self.reader.join(timeout=5)
        return code, time.monotonic() - started

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


#: A script (``python -c``) holding an exclusive SQLite lock on ARGV[1] for ARGV[2] seconds,
#: as another process sharing the cache could; prints "locked" once it holds it.
LOCKER = """
    import sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.execute("ROLLBACK")
"""


_SUMMARY_FIGURE = re.compile(r"\b(count|sample)#exrate\.([\w.]+)=([-\d.]+)")


def summary_totals(output: str) -> dict[str, float]:
    """The service's summary lines in ``output`` read as a log drain would: every
    ``count#`` figure summed over the lines (they are per interval), the last ``sample#``
    figure kept (a level)."""
    totals: dict[str, float] = {}
    for line in output.splitlines():
        if "summary: " not in line:
            continue
        for kind, name, value in _SUMMARY_FIGURE.findall(line):
            number = float(value)
            totals[name] = totals.get(name, 0) + number if kind == "count" else number
    return totals
