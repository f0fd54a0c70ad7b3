"""exrate-service: answers currency-assignment's stakes in EUR over one WebSocket.

Usage:
  exrate-service [options]
  exrate-service demo [--duration=SECONDS] [--rate=RPS] [options]
  exrate-service cache (list | show DAY | stats) [--json] [options]
  exrate-service cache clear [--tier=TIER] [--yes] [--json] [options]
  exrate-service cache warm START END [--json] [options]
  exrate-service convert AMOUNT CURRENCY [DATE] [--json] [options]
  exrate-service simulate [--host=HOST] [--port=PORT] [--rate=RPS] [--poisson]
                          [--duration=SECONDS] [--faults=SCRIPT] [--report=FILE] [options]
  exrate-service -h | --help
  exrate-service --version

Commands:
  (none)      Run the service: connect to EXRATE_URL and answer until SIGTERM/SIGINT.
  demo        Run the bundled upstream simulator and a fake rate API on loopback, and the
              service against them, offline; print a summary at the end.
  cache       Inspect the rate cache, every tier (disk; Redis with REDIS_URL): list,
              show DAY (YYYY-MM-DD), stats, clear (asks before deleting Redis keys),
              warm START END (prefetch every table of the window, one call per month
              where the provider can).
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
  --json              cache, convert: machine-readable JSON output.
  --tier=TIER         cache clear: only this tier, disk or redis (default: every tier).
  --yes               cache clear: delete Redis keys without asking.
  -h --help           Show this help.
  --version           Show the version.

Environment:
  Every setting is an environment variable (flags override): EXRATE_URL, EXRATE_PROVIDER,
  EXCHANGE_ACCESS_KEY, REDIS_URL, EXRATE_METRICS_PORT, EXRATE_METRICS_HOST, LOG_FORMAT
  (text or json), LOG_LEVEL and 18 more. The full table, with defaults and units, is in
  README.md, section "Configuration" (also docs/operations.md in the source tree).
  Booleans take 1/0, true/false, yes/no or on/off.

Output:
  convert and cache print their answer on stdout and nothing else; logs go to stderr.
  The service logs to stdout, one line per event (LOG_FORMAT=json: one JSON object).

Exit codes:
  0       done (a stop by SIGTERM or SIGINT included)
  1       failed
  2       bad usage or configuration (one line on stderr says which)
  3       stalled: the connection's reader or heartbeat made no progress for
          EXRATE_STALL_EXIT seconds (30), so the platform restarts the process
  128+N   a second signal N during shutdown: exit at once (130 for Ctrl-C, 143 for SIGTERM)
  141     the reader of stdout went away (a closed pipe), as for any Unix tool
"""

import datetime
import json
import logging
import os
import signal
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

from docopt import DocoptExit, docopt

from . import __version__, protocol
from .config import VARIABLES_DOC, Settings
from .errors import ConfigError, ProtocolError, RateError
from .logs import install_json_stderr, setup_logging
from .runtime import Runtime
from .usage import HELP_POINTER, refused_option, usage_problem

log = logging.getLogger("exrate_green")

#: the access key ``demo`` gives its fake exchangerate.host when the user has none
DEMO_ACCESS_KEY = "demo-access-key"
#: the exit code of a command whose stdout reader went away (128 + SIGPIPE)
EXIT_PIPE_CLOSED = 141


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":
        install_json_stderr()  # from the first line on: even a usage error is JSON
    try:
        args = docopt(__doc__, argv, version=f"exrate-service {__version__}")
    except DocoptExit as e:
        return _usage_error(usage_problem(__doc__, argv, str(e.code)))
    except SystemExit as e:  # --help and --version print, then "exit"
        return e.code if isinstance(e.code, int) else 0
    refused = refused_option(__doc__, argv)
    if refused:
        return _usage_error(refused)
    try:
        settings = Settings.load(**_flags(args))
    except ConfigError as e:
        return _config_error(e)
    one_shot = bool(args["cache"] or args["convert"])
    setup_logging(settings, sys.stderr if one_shot else sys.stdout)
    try:
        code = _dispatch(args, settings)
        if one_shot:
            sys.stdout.flush()  # a closed pipe shows here for output still buffered
        return code
    except ConfigError as e:  # one a part found later (a Redis URL it cannot use)
        return _config_error(e)
    except BrokenPipeError:
        return _pipe_closed()


def _flags(args: dict[str, Any]) -> dict[str, Any]:
    """The settings the command line sets (``None``: not given)."""
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
    if args["demo"]:
        flags["redis_url"] = None  # sealed: never the user's Redis
    return flags


def _dispatch(args: dict[str, Any], settings: Settings) -> int:
    if args["cache"] and args["warm"]:
        from .warm import run_warm  # rates and cache together: above both
        return run_warm(settings, args["START"], args["END"], as_json=args["--json"])
    if args["cache"]:
        from .cache.commands import run_cache_command
        action = next(a for a in ("list", "show", "stats", "clear") if args[a])
        return run_cache_command(settings, action, day=args["DAY"], as_json=args["--json"],
                                 tier=args["--tier"], yes=args["--yes"])
    if args["convert"]:
        return convert(settings, args["AMOUNT"], args["CURRENCY"], args["DATE"],
                       as_json=args["--json"])
    if args["demo"]:
        from .demo import run_demo
        try:
            duration_s = _positive("--duration", args["--duration"])
            rate = _positive("--rate", args["--rate"]) or 20.0
        except ValueError as e:
            return _usage_error(str(e))
        # JSON logs: the summary is one more event, so every line of the demo parses
        out = (lambda text: log.info("%s", text)) if settings.log_format == "json" else print
        return run_demo(settings.replace(redis_url=None), duration_s=duration_s, rate=rate,
                        out=out)
    if args["simulate"]:
        from .simulator.tool import options_from_args, run_simulate
        try:
            options = options_from_args(args)
        except ValueError as e:
            return _usage_error(f"simulate: {e}")
        return run_simulate(options)
    return run(settings)


def _positive(flag: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{flag} must be a positive number, got {text!r}")
    return value


def _usage_error(problem: str) -> int:
    print(f"exrate-service: {problem} ({HELP_POINTER})", file=sys.stderr)
    return 2


def _config_error(e: ConfigError) -> int:
    print(f"exrate-service: configuration error: {e} (all variables: {VARIABLES_DOC})",
          file=sys.stderr)
    return 2


def _pipe_closed() -> int:
    """The reader of stdout went away: end quietly, as ``head`` expects of a Unix tool.

    Later writes (the interpreter flushes stdout at exit) go to /dev/null instead of
    raising a second BrokenPipeError that Python would print."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_PIPE_CLOSED


def run(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT; a second signal exits at once.

    The metrics port is bound first: a taken port is one line and exit 2, before any
    connection is made or any summary is logged.
    """
    import gevent

    from .metrics import bind_metrics_port, raise_fd_limit
    from .service import Service

    listener = None
    if settings.metrics_port is not None:
        raise_fd_limit()
        try:
            listener = bind_metrics_port(settings.metrics_host, settings.metrics_port)
        except OSError as e:  # the port is taken, needs privileges, or the host is not ours
            print(f"exrate-service: configuration error: EXRATE_METRICS_PORT="
                  f"{settings.metrics_port} on {settings.metrics_host or 'all interfaces'}: "
                  f"cannot listen ({e.strerror or e}): choose a free port", file=sys.stderr)
            return 2
    runtime = Runtime(settings)
    service = Service(settings, runtime.book)

    def on_signal(signum: int) -> None:
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
        if listener is not None:
            from .metrics import MetricsServer
            metrics = MetricsServer(service, settings.metrics_port or 0,
                                    host=settings.metrics_host, listener=listener).start()
        return service.run()
    finally:
        if metrics is not None:
            metrics.stop()
        line = service.summary_line()
        # the same figures as keys of a JSON event (Service.summary_fields: see logs.Summary)
        log.info("summary: %s", line, extra=service.summary_fields)
        runtime.close()
        log.info("stopped")


def convert(settings: Settings, amount: str, currency: str, date: str | None,
            as_json: bool = False) -> int:
    """Print one conversion computed exactly as the service computes a reply: a sentence,
    or with ``as_json`` one JSON object (numbers exact, as the reply writes them)."""
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
    if as_json:
        print(_json_object(amount=stake, currency=code, day=day.isoformat(),
                           stake_eur=stake_eur, rate=rate, provider=table.provider,
                           published=table.published.isoformat()))
    else:
        print(f"{stake} {code} = {stake_eur} EUR on {day.isoformat()} "
              f"(rate {rate} {code}/EUR, {table.provider} publication of "
              f"{table.published.isoformat()})")
    return 0


def _json_object(**fields: Any) -> str:
    """One line of JSON; a Decimal is written as the number it is, digit for digit."""
    return "{" + ", ".join(
        f"{json.dumps(key)}: {value if isinstance(value, Decimal) else json.dumps(value)}"
        for key, value in fields.items()) + "}"


def _decimal(amount: str) -> Decimal:
    """``amount`` (the command line's text) as a Decimal; ``ProtocolError`` if it is none."""
    try:
        return Decimal(amount)
    except InvalidOperation:
        raise ProtocolError(f"invalid amount {amount!r}") from None
