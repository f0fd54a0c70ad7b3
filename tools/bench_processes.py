"""The bench's child processes: start, follow their status lines, watch, stop.

Part of ``tools/bench.py`` (a development tool: ``psutil`` comes from requirements-dev.txt).
"""

import os
import platform
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: CPUs the service and the load generator are pinned to (when there are two or more)
SERVICE_CPU, GENERATOR_CPU = 0, 1
_STATUS = "simulate:"


class BenchError(Exception):
    """A bench run cannot go on (a child did not start, finish or report)."""


class Child:
    """A child process; its output goes to ``log_path`` and its ``simulate:`` status lines
    are remembered with the time they arrived."""

    def __init__(self, label, args, env, log_path, cwd=ROOT):
        self.label = label
        self.args = args
        self.report_path = None
        self._log = open(log_path, "w", encoding="utf-8")
        self._seen = []  # (monotonic, line)
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(args, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self.read_lines, name=f"read-{label}", daemon=True)
        self._reader.start()

    def read_lines(self):
        for line in self.proc.stdout:
            self._log.write(line)
            if line.startswith(_STATUS):
                with self._changed:
                    self._seen.append((time.monotonic(), line.strip()))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def seen(self, text):
        """When a status line containing ``text`` arrived (monotonic), or None."""
        with self._changed:
            return next((t for t, line in self._seen if text in line), None)

    def wait_for(self, text, timeout_s):
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = next((t for t, line in self._seen if text in line), None)
                left = deadline - time.monotonic()
                if found is not None or left <= 0 or self.proc.poll() is not None:
                    return found
                self._changed.wait(min(left, 0.2))

    def duration_s(self):
        for arg in self.args:
            if arg.startswith("--duration="):
                return float(arg.split("=", 1)[1])
        return None

    def alive(self):
        return self.proc.poll() is None

    def wait(self, timeout_s):
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def watch(self):
        return Usage(self.proc.pid)

    def peak_rss_mb(self):
        """The kernel's high-water mark of the process's resident memory (VmHWM)."""
        try:
            with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None

    def stop(self, timeout_s=15):
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout_s) is None:
                self.proc.kill()
                self.wait(5)
        self._reader.join(timeout=5)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


class Usage:
    """CPU and peak RSS of one process over a window, from ``psutil``."""

    def __init__(self, pid):
        import psutil
        self.process = psutil.Process(pid)
        self.started = time.monotonic()
        self.cpu_start = self._cpu()
        self.peak_rss = self.process.memory_info().rss

    def _cpu(self):
        times = self.process.cpu_times()
        return times.user + times.system

    def sample(self):
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def finish(self):
        self.sample()
        elapsed = time.monotonic() - self.started
        return {"cpu_percent": round(100 * (self._cpu() - self.cpu_start) / elapsed, 1),
                "peak_rss_mb": round(self.peak_rss / 2**20, 1)}


def child_env(**variables):
    """This environment without the service's own settings, plus ``variables``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EXRATE_", "EXCHANGE"))
           and k not in ("LOG_LEVEL", "FRANKFURTER_URL")}
    env.update(PYTHONUNBUFFERED="1", **{k: str(v) for k, v in variables.items()})
    env.setdefault("LOG_LEVEL", "INFO")
    return env


def pin(pid, cpu):
    """Keep ``pid`` on ``cpu`` when the machine has more than one CPU (else leave it)."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    try:
        if cpu in os.sched_getaffinity(0) and len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(pid, {cpu})
    except OSError:  # the process is gone already, or we may not
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine(pinned=False):
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    import gevent
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "gevent": gevent.__version__,
            "pinned": {"service": SERVICE_CPU, "generator": GENERATOR_CPU}
            if pinned and len(cpus) > 1 and {SERVICE_CPU, GENERATOR_CPU} <= cpus else None,
            "load_average_before": load_average()}


def load_average():
    """The 1-minute load average, or None where there is none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


