"""exrate-service: answers currency-assignment's stakes in EUR over one WebSocket.

Usage:
  exrate-service [options]
  exrate-service demo [--duration=SECONDS] [--rate=RPS] [options]
  exrate-service cache (list | show DAY | stats | clear) [--json] [options]
  exrate-service convert AMOUNT CURRENCY [DATE] [options]
  exrate-service simulate [--host=HOST] [--port=PORT] [--rate=RPS] [--poisson]
                          [--duration=SECONDS] [--faults=SCRIPT] [--report=FILE] [options]
  exrate-service -h | --help
  exrate-service --version

Commands:
  (none)      Run the service: connect to EXRATE_URL and answer until SIGTERM/SIGINT.
  demo        Run the bundled upstream simulator and a fake rate API on loopback, and the
              service against them, offline; print a summary at the end.
  cache       Inspect the rate cache, every tier (disk; Redis with REDIS_URL): list,
              show DAY (YYYY-MM-DD), stats, clear.
  convert     One conversion through the service's code path, e.g. convert 253.67 USD 2021-05-18.
  simulate    Run the currency-assignment simulator as a standalone WebSocket server for any
              client: paced requests, scripted faults, reply validation, a JSON report.

Options:
  --show-messages     Log every request and reply as compact JSON [env: EXRATE_SHOW_MESSAGES=1].
  --url=URL           Upstream WebSocket URL, ws:// or wss:// [env: EXRATE_URL].
  --provider=NAME     ecb, frankfurter or exchangerate.host [env: EXRATE_PROVIDER].
  --cache-dir=DIR     Rate cache directory [env: EXRATE_CACHE_DIR].
  --log-level=LEVEL   DEBUG, INFO, WARNING or ERROR [env: LOG_LEVEL].
  --duration=SECONDS  demo, simulate: stop after this many seconds (default: until Ctrl-C).
  --rate=RPS          demo, simulate: requests per second sent by the simulator [default: 20].
  --host=HOST         simulate: address to listen on [default: 127.0.0.1].
  --port=PORT         simulate: port to listen on, 0 for any free one [default: 0].
  --poisson           simulate: exponentially distributed gaps between requests.
  --faults=SCRIPT     simulate: SECONDS:ACTION[=VALUE],... with ACTION pause=S, drop,
                      close=CODE, garbage=N or slowread=S, e.g. 5:pause=3,12:drop.
  --report=FILE       simulate: write the JSON report to FILE (default: stdout).
  --requests=N        simulate: stop sending after N requests.
  --dates=FIRST:LAST  simulate: request dates from YYYY-MM-DD to YYYY-MM-DD.
  --seed=N            simulate: random seed, for a reproducible request mix.
  --drain=SECONDS     simulate: after --duration, wait this long for replies [default: 2].
  --rate-api=PORT     simulate: also serve the fake rate API on PORT (0: any free one).
  --rate-api-latency=MS  simulate: the fake rate API answers after MS milliseconds [default: 0].
  --rate-api-fail=MODE   simulate: the fake rate API fails every request: 500, 429, hang,
                      bad_json or api_error.
  --json              cache: machine-readable JSON output.
  -h --help           Show this help.
  --version           Show the version.

Exit codes:
  0       done (a stop by SIGTERM or SIGINT included)
  1       failed
  2       bad usage or configuration (one line on stderr says which)
  3       stalled: the connection's reader or heartbeat made no progress for
          EXRATE_STALL_EXIT seconds (30), so the platform restarts the process
  128+N   a second signal N during shutdown: exit at once (130 for Ctrl-C, 143 for SIGTERM)
"""

import datetime
import logging
import os
import signal
import sys
import time
from decimal import Decimal, InvalidOperation

from docopt import DocoptExit, docopt

from . import __version__, protocol
from .config import Settings
from .errors import ConfigError, ProtocolError, RateError
from .redact import RedactingFormatter
from .runtime import Runtime
from .usage import HELP_POINTER, usage_problem

log = logging.getLogger("exrate_green")

#: the access key ``demo`` gives its fake exchangerate.host when the user has none
DEMO_ACCESS_KEY = "demo-access-key"


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = docopt(__doc__, argv, version=f"exrate-service {__version__}")
    except DocoptExit as e:
        print(f"exrate-service: {usage_problem(__doc__, argv, str(e.code))} ({HELP_POINTER})",
              file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version print, then "exit"
        return e.code if isinstance(e.code, int) else 0
    flags = {
        "url": args["--url"], "provider": args["--provider"] and args["--provider"].lower(),
        "cache_dir": args["--cache-dir"] and os.path.expanduser(args["--cache-dir"]),
        "log_level": args["--log-level"] and args["--log-level"].upper(),
        "show_messages": True if args["--show-messages"] else None}
    if args["demo"] and not os.environ.get("EXCHANGE_ACCESS_KEY"):
        # The demo's fake rate API takes any key: the demo supplies one, so every provider
        # runs offline; without a key of the user's, ecb stays the default.
        flags["access_key"] = DEMO_ACCESS_KEY
        if not flags["provider"] and not os.environ.get("EXRATE_PROVIDER"):
            flags["provider"] = "ecb"
    try:
        settings = Settings.load(**flags)
    except ConfigError as e:
        print(f"exrate-service: configuration error: {e}", file=sys.stderr)
        return 2
    setup_logging(settings)
    if args["cache"]:
        from .cache import run_cache_command
        action = next(a for a in ("list", "show", "stats", "clear") if args[a])
        return run_cache_command(settings, action, day=args["DAY"], as_json=args["--json"])
    if args["convert"]:
        return convert(settings, args["AMOUNT"], args["CURRENCY"], args["DATE"])
    if args["demo"]:
        from .demo import run_demo
        try:
            duration_s = float(args["--duration"]) if args["--duration"] else None
            rate = float(args["--rate"])
        except ValueError:
            print("exrate-service: --duration and --rate take numbers", file=sys.stderr)
            return 2
        return run_demo(settings, duration_s=duration_s, rate=rate)
    if args["simulate"]:
        from .simulator.tool import options_from_args, run_simulate
        try:
            options = options_from_args(args)
        except ValueError as e:
            print(f"exrate-service: simulate: {e}", file=sys.stderr)
            return 2
        return run_simulate(options)
    return run(settings)


def setup_logging(settings: Settings) -> None:
    """One line per event on stdout, UTC timestamps, secrets redacted from every logger."""
    from .cache.redis import redis_password  # the Redis password is a secret too
    formatter = RedactingFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s",
        secrets=[settings.access_key, redis_password(settings.redis_url)])
    formatter.converter = time.gmtime  # UTC, like the protocol's dates
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    messages = logging.getLogger("exrate_green.messages")
    messages.setLevel(logging.INFO if settings.show_messages else logging.WARNING)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # platforms read logs through a pipe


def run(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT; a second signal exits at once."""
    import gevent

    from .service import Service

    runtime = Runtime(settings)
    service = Service(settings, runtime.book)

    def on_signal(signum):
        if service.stopping:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        gevent.spawn(service.stop)

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, on_signal, signum)
    log.info("exrate-service %s: provider %s, upstream %s, cache %s",
             __version__, settings.provider, settings.url, settings.cache_dir)
    metrics = None
    try:
        if settings.metrics_port is not None:
            from .metrics import MetricsServer
            try:
                metrics = MetricsServer(service, settings.metrics_port).start()
            except OSError as e:  # the port is taken, or needs privileges
                log.error("EXRATE_METRICS_PORT=%d: cannot listen: %s",
                          settings.metrics_port, e.strerror or e)
                return 1
        return service.run()
    finally:
        if metrics is not None:
            metrics.stop()
        log.info("summary: %s", service.summary_line())
        runtime.close()
        log.info("stopped")


def convert(settings: Settings, amount: str, currency: str, date: str | None) -> int:
    """Print one conversion computed exactly as the service computes a reply."""
    today = datetime.datetime.now(datetime.UTC).date()
    try:
        stake = protocol.read_stake(_decimal(amount))
        code = protocol.read_currency(currency)
        day = protocol.read_day(date or today.isoformat(), today)
    except ProtocolError as e:
        print(f"exrate-service: {e.reason}", file=sys.stderr)
        return 2
    runtime = Runtime(settings)
    try:
        table = runtime.book.get(day, code)
        rate = table.rate(code)
        stake_eur = protocol.convert(stake, rate)
    except (RateError, ProtocolError) as e:
        print(f"exrate-service: {e.reason}", file=sys.stderr)
        return 1
    finally:
        runtime.close()
    print(f"{stake} {code} = {stake_eur} EUR on {day.isoformat()} "
          f"(rate {rate} {code}/EUR, {table.provider} publication of "
          f"{table.published.isoformat()})")
    return 0


def _decimal(amount: str) -> Decimal:
    """``amount`` (the command line's text) as a Decimal; ``ProtocolError`` if it is none."""
    try:
        return Decimal(amount)
    except InvalidOperation:
        raise ProtocolError(f"invalid amount {amount!r}") from None
