"""``exrate-service simulate``: the currency-assignment simulator as a standalone server.

It is a plain WebSocket server (``ws://HOST:PORT``, any path), so it can drive any client,
not only exrate-green. Once the first client connects it sends heartbeats every second
and requests at ``--rate`` per second (fixed intervals, or ``--poisson``), validates every
reply, plays a fault script, and after ``--duration`` seconds stops sending, waits up to
``--drain`` seconds for the last replies and writes a JSON report.

Fault script: comma-separated ``SECONDS:ACTION[=VALUE]``, times counted from the first
connection, e.g. ``5:pause=3,12:drop,20:close=1011,25:garbage=10,30:slowread=2``:

=============  ==========================================================================
``pause=S``    send no heartbeat for S seconds (the client should give up and reconnect)
``drop``       end every connection abruptly: TCP shutdown, no close frame
``close=CODE`` send a close frame with CODE (default 1000) and end the connection
``garbage=N``  send N bad frames (non-JSON, binary, non-ASCII text, deep nesting, requests
               with a bad payload that each need an error reply)
``slowread=S`` for S seconds read the client's frames at ~80 KiB/s, so its writes back up
=============  ==========================================================================

Optionally (``--rate-api=PORT``) it also serves the fake rate API (Frankfurter under
``/v1`` and exchangerate.host at the root) with ``--rate-api-latency`` milliseconds per
answer or failing every request (``--rate-api-fail=500|429|hang|bad_json|api_error``).

Status lines on stdout start with ``simulate:`` so a harness can follow the run:
``listening on URL``, ``client connected``, ``window over``, ``report``.
"""

import dataclasses
import datetime
import json
import logging
import os
import resource
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Group

from .fake_rates import FAULT_MODES, FakeRateApi
from .server import Upstream

log = logging.getLogger(__name__)

FAULT_ACTIONS = ("pause", "drop", "close", "garbage", "slowread")
_NEEDS_VALUE = {"pause": "seconds", "garbage": "a count", "slowread": "seconds"}


@dataclasses.dataclass(frozen=True)
class Fault:
    """One step of a fault script: ``action`` at ``at_s`` seconds, with its ``value`` as
    the script gave it (``parse_faults`` checks it). Read the value through the property
    that names what it means for the action: ``seconds``, ``count`` or ``close_code``."""

    at_s: float
    action: str
    value: float | int | None = None   # an int for close and garbage, else a float

    def describe(self) -> str:
        return f"{self.at_s:g}:{self.action}" + ("" if self.value is None else f"={self.value:g}")

    @property
    def seconds(self) -> float:
        """How long a pause or a slow read lasts, in seconds."""
        return float(self._required())

    @property
    def count(self) -> int:
        """How many garbage frames to send."""
        return int(self._required())

    @property
    def close_code(self) -> int:
        """The code of a close fault's close frame: 1000 when the script gave none."""
        return 1000 if self.value is None else int(self.value)

    def _required(self) -> float:
        if self.value is None:
            raise ValueError(f"fault {self.describe()}: {self.action} needs a value")
        return self.value


def parse_faults(script: str | None) -> list[Fault]:
    """[Fault] from ``"5:pause=3,12:drop,..."``, sorted by time; ValueError says what is wrong."""
    faults = []
    for item in filter(None, (part.strip() for part in (script or "").split(","))):
        when, sep, action = item.partition(":")
        action, _, value = action.partition("=")
        action = action.strip().lower()
        try:
            at_s = float(when)
        except ValueError:
            raise ValueError(f"fault {item!r}: {when!r} is not a number of seconds") from None
        if not sep or action not in FAULT_ACTIONS or at_s < 0 or at_s != at_s:
            raise ValueError(f"fault {item!r}: expected SECONDS:ACTION[=VALUE] with ACTION "
                             f"one of {', '.join(FAULT_ACTIONS)}")
        if action in _NEEDS_VALUE and not value:
            raise ValueError(f"fault {item!r}: {action} needs {_NEEDS_VALUE[action]}")
        if action == "drop" and value:
            raise ValueError(f"fault {item!r}: drop takes no value")
        try:
            number = None if not value else (
                int(value) if action in ("close", "garbage") else float(value))
        except ValueError:
            raise ValueError(f"fault {item!r}: {value!r} is not a number") from None
        if action == "close" and number is not None and not 1000 <= number <= 4999:
            raise ValueError(f"fault {item!r}: a close code is 1000-4999")
        if number is not None and number <= 0 and action != "close":
            raise ValueError(f"fault {item!r}: the value must be positive")
        faults.append(Fault(at_s, action, number))
    return sorted(faults, key=lambda f: f.at_s)


def parse_dates(text: str | None) -> tuple[datetime.date, datetime.date]:
    """(first, last) dates from ``"YYYY-MM-DD:YYYY-MM-DD"``; ValueError if malformed."""
    first, sep, last = (text or "").partition(":")
    try:
        days = datetime.date.fromisoformat(first), datetime.date.fromisoformat(last)
    except ValueError:
        raise ValueError(
            f"--dates wants FIRST:LAST as YYYY-MM-DD:YYYY-MM-DD, got {text!r}") from None
    if days[1] < days[0]:
        raise ValueError(f"--dates {text!r} ends before it starts")
    return days


@dataclasses.dataclass
class SimulateOptions:
    host: str = "127.0.0.1"
    port: int = 0
    rate: float = 20.0
    poisson: bool = False
    duration_s: float | None = None      # None: until SIGINT/SIGTERM
    faults: tuple = ()
    report_path: str | None = None       # None: the report goes to stdout
    seed: int | None = None
    dates: tuple | None = None           # (first, last) request dates
    max_requests: int | None = None
    drain_s: float = 2.0
    wait_s: float = 60.0                 # for the first client
    rate_api_port: int | None = None
    rate_api_latency_s: float = 0.0
    rate_api_fail: str | None = None

    def validate(self) -> None:
        if self.rate < 0 or self.drain_s < 0 or self.wait_s <= 0:
            raise ValueError("--rate, --drain and --wait must not be negative")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("--duration must be positive")
        if self.rate_api_fail is not None and self.rate_api_fail not in FAULT_MODES:
            raise ValueError(f"--rate-api-fail: choose one of {', '.join(FAULT_MODES)}")
        if (self.rate_api_fail or self.rate_api_latency_s) and self.rate_api_port is None:
            raise ValueError("--rate-api-latency and --rate-api-fail need --rate-api=PORT")


class Simulation:
    """One run of the tool: the upstream (and the fake rate API) until the report."""

    def __init__(self, options: SimulateOptions, out: Callable[[str], object] = print) -> None:
        self.options = options
        self.out = out
        self.jobs = Group()
        self.done = Event()
        self.faults_applied: list[dict] = []
        kwargs: dict[str, Any] = {"dates": options.dates} if options.dates else {}
        self.upstream = Upstream(options.host, options.port, request_rate=options.rate,
                                 poisson=options.poisson, seed=options.seed,
                                 max_requests=options.max_requests, **kwargs)
        self.rate_api = None
        if options.rate_api_port is not None:
            self.rate_api = FakeRateApi(options.host, options.rate_api_port,
                                        latency_s=options.rate_api_latency_s)

    def run(self) -> dict:
        """Serve, play the faults, report; returns the report (a dict)."""
        opts, up = self.options, self.upstream
        for signum in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(signum, self.done.set)
        try:
            if self.rate_api is not None:
                self.rate_api.start()
                if opts.rate_api_fail:
                    self.jobs.spawn(self.keep_rate_api_failing, opts.rate_api_fail)
            up.start()
            api = f", rate API at {self.rate_api.url}" if self.rate_api is not None else ""
            self.out(f"simulate: listening on {up.url}{api}")
            variables = client_variables(str(up.url), self.rate_api)
            self.out(f"simulate: point a client at it with: {variables}")
            if not self._wait_for_client():
                return self._report(None, None, None, "no client connected")
            started, cpu_start = time.monotonic(), _cpu_s()
            self.out(f"simulate: client connected; {opts.rate:g} requests/s"
                     f"{' (Poisson)' if opts.poisson else ''} for "
                     f"{f'{opts.duration_s:g} s' if opts.duration_s else 'ever (Ctrl-C stops)'}")
            if opts.faults:
                self.jobs.spawn(self.play_faults, started)
            self.done.wait(opts.duration_s)
            up.pause_requests()
            window = {"seconds": time.monotonic() - started, "cpu_s": _cpu_s() - cpu_start,
                      "requests": up.requests_sent, "replies": up.replies}
            self.out(f"simulate: window over: {window['requests']} requests, "
                     f"{window['replies']} replies in {window['seconds']:.2f} s")
            up.wait_until(lambda: up.unanswered == 0, opts.drain_s)
            return self._report(started, window, cpu_start, None)
        finally:
            self.jobs.kill(timeout=1)
            up.stop()
            if self.rate_api is not None:
                self.rate_api.stop()

    def _wait_for_client(self):
        deadline = time.monotonic() + self.options.wait_s
        while not self.done.is_set() and time.monotonic() < deadline:
            if self.upstream.wait_for_connections(1, 0.2):
                return True
        return False

    def keep_rate_api_failing(self, mode: str, ahead: int = 1000) -> None:
        """Keep at least ``ahead`` failures queued on the fake rate API: every request fails."""
        queued = 0
        rate_api = self.rate_api
        assert rate_api is not None  # started with --rate-api-fail
        while True:
            if queued - rate_api.calls < ahead:
                rate_api.fail_next(ahead, mode)
                queued += ahead
            gevent.sleep(0.05)

    def play_faults(self, started: float) -> None:
        """The fault script, each at its time since ``started``; pauses end on their own."""
        for fault in self.options.faults:
            delay_s = started + fault.at_s - time.monotonic()
            if delay_s > 0:
                gevent.sleep(delay_s)
            self.apply(fault)
            self.faults_applied.append({"fault": fault.describe(),
                                        "at_s": round(time.monotonic() - started, 3)})

    def apply(self, fault: Fault) -> None:
        up = self.upstream
        log.info("simulate: fault %s", fault.describe())
        if fault.action == "pause":
            up.pause_heartbeats()
            self.jobs.add(gevent.spawn_later(fault.seconds, up.resume_heartbeats))
        elif fault.action == "drop":
            up.drop()
        elif fault.action == "close":
            up.close(fault.close_code, "simulated close")
        elif fault.action == "garbage":
            up.send_garbage(fault.count)
        elif fault.action == "slowread":
            up.slow_read(fault.seconds)

    def _report(self, started, window, cpu_start, failure):
        opts, report = self.options, self.upstream.report()
        elapsed = time.monotonic() - started if started is not None else 0.0
        report.update({
            "tool": {
                "rate": opts.rate, "poisson": opts.poisson, "duration_s": opts.duration_s,
                "faults": [f.describe() for f in opts.faults], "seed": opts.seed,
                "dates": [d.isoformat() for d in opts.dates] if opts.dates else None,
                "max_requests": opts.max_requests, "drain_s": opts.drain_s,
            },
            "failure": failure,
            "faults_applied": self.faults_applied,
            "window_s": round(window["seconds"], 3) if window else 0.0,
            "window_requests": window["requests"] if window else 0,
            "window_replies": window["replies"] if window else 0,
            "requests_per_s": _per_s(window, "requests"),
            "replies_per_s": _per_s(window, "replies"),
            "simulator_cpu_percent": round(100 * window["cpu_s"] / window["seconds"], 1)
            if window and window["seconds"] else None,
            "simulator_peak_rss_mb": round(_peak_rss_mb(), 1),
            "run_s": round(elapsed, 3),
        })
        if self.rate_api is not None:
            report["rate_api"] = {
                "calls": self.rate_api.calls, "days": len(self.rate_api.calls_by_day),
                "max_calls_per_day": max(self.rate_api.calls_by_day.values(), default=0),
                "latency_ms": round(opts.rate_api_latency_s * 1000, 1),
                "failing": opts.rate_api_fail}
        return report


def client_variables(url: str, rate_api: Any = None) -> str:
    """The environment a client needs to use this simulator (and its fake rate API):
    ``EXRATE_URL=ws://... FRANKFURTER_URL=http://.../v1 EXCHANGERATE_HOST_URL=http://...``."""
    words = [f"EXRATE_URL={url}"]
    if rate_api is not None:
        words += [f"FRANKFURTER_URL={rate_api.url}/v1", f"EXCHANGERATE_HOST_URL={rate_api.url}",
                  "EXRATE_PROVIDER=frankfurter (or exchangerate.host with any "
                  "EXCHANGE_ACCESS_KEY)"]
    return " ".join(words)


def options_from_args(args: Mapping[str, Any]) -> SimulateOptions:
    """SimulateOptions from the docopt arguments of ``exrate-service simulate``."""
    def number(name, kind=float):
        value = args.get(name)
        if value is None:
            return None
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name} takes a number, got {value!r}") from None

    latency_ms = number("--rate-api-latency") or 0.0
    return SimulateOptions(
        host=args["--host"], port=number("--port", int), rate=number("--rate"),
        poisson=bool(args["--poisson"]), duration_s=number("--duration"),
        faults=tuple(parse_faults(args["--faults"])), report_path=args["--report"],
        seed=number("--seed", int), dates=parse_dates(args["--dates"]) if args["--dates"] else None,
        max_requests=number("--requests", int), drain_s=number("--drain"),
        rate_api_port=number("--rate-api", int), rate_api_latency_s=latency_ms / 1000,
        rate_api_fail=args["--rate-api-fail"])


def run_simulate(options: SimulateOptions, out: Callable[[str], object] = print) -> int:
    """The ``simulate`` command: returns 0 when every request got one valid reply, 1 when
    not (or no client came), 2 for bad options (already reported)."""
    try:
        options.validate()
    except ValueError as e:
        out(f"exrate-service: {e}")
        return 2
    try:
        report = Simulation(options, out).run()
    except OSError as e:  # the port is taken, the host is not ours
        out(f"exrate-service: simulate: cannot listen on {options.host}:{options.port}: {e}")
        return 1
    text = json.dumps(report, indent=2)
    if options.report_path:
        directory = os.path.dirname(os.path.abspath(options.report_path))
        os.makedirs(directory, exist_ok=True)
        with open(options.report_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        out(text)
    written = f" (written to {options.report_path})" if options.report_path else ""
    out(summary_line(report) + written)
    if report["failure"]:
        return 1
    return 0 if not report["invalid"] and not report["unanswered"] else 1


def summary_line(report: dict) -> str:
    def ms(key):
        value = report.get(key)
        return "-" if value is None else f"{value:.2f}"
    gap = report.get("client_heartbeat_max_gap_s")
    return (f"simulate: report: {report['requests']} requests, {report['replies']} replies "
            f"({report['ok']} ok, {report['error_replies']} errors, {report['invalid']} invalid), "
            f"{report['unanswered']} unanswered, {report['replies_per_s']:.0f} replies/s, "
            f"latency p50/p99/max {ms('latency_p50_ms')}/{ms('latency_p99_ms')}/"
            f"{ms('latency_max_ms')} ms, client heartbeat max gap "
            f"{'-' if gap is None else f'{gap:.3f} s'}, connections {report['connections']}")


def _per_s(window, key):
    if not window or not window["seconds"]:
        return 0.0
    return round(window[key] / window["seconds"], 1)


def _cpu_s():
    t = os.times()
    return t.user + t.system


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
