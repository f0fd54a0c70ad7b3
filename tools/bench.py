"""The service against the simulator, each in its own process: figures, not verdicts on CI.

A development tool (it needs ``psutil``, from requirements-dev.txt) run from a checkout::

    python tools/bench.py [--out=FILE] [--quick] [--pin]
    python tools/bench.py --baseline=DIR [--levels=R,R,...] [--level-seconds=S] [--rounds=N]
    python tools/bench.py echo ws://HOST:PORT

Every measurement runs ``exrate-service simulate`` (the load generator and judge) and
the service (``bin/exrate-service``, configured by environment variables as in
production) as separate processes on loopback; ``psutil`` watches the service's CPU and
memory. Scenarios:

- ``generator ceiling``: the simulator against the echo client (``echo``, a minimal
  blocking-socket client that answers every request at once), so the simulator's own
  limit is known and shown to be above the service's;
- ``warm``: the ECB provider with every day's table in memory (a warm-up run first),
  request rates swept upwards until the service falls behind;
- ``cold``: an empty cache and a rate API answering in 200 ms: 1,000 requests over 50
  days must cost at most 50 API calls, keep p99 under 300 ms and never reconnect;
- ``rate API failing``: every rate fetch fails (HTTP 500): each request still gets an
  error reply, heartbeats stay on time, the connection stays up.

``--baseline=DIR`` compares instead: DIR is another source tree of the project (e.g. the
previous commit, ``git archive c2caf8e | tar -x -C DIR``). Its ``bin/exrate-service`` and
this tree's run side by side, both warm, against this tree's simulator (the same load
generator for both): each warm level is run on one then the other, the order alternating
round by round, and the figures are printed side by side.

With ``--pin`` (and two CPUs or more) the service and the echo client run on CPU 0 and the
simulator on CPU 1; by default the OS schedules them, which copes better with other
processes on the machine (a pinned process cannot move away from a busy neighbour).
Anything else running still shows in the figures: the load average before and after is
recorded.

A level "keeps up" when the simulator sent and got back at least 98 % of the offered
rate during the window, every request was answered (2 s drain), no reply was invalid,
p99 stayed under 100 ms, the client's heartbeats never came more than 1.1 s apart and
the connection never dropped. A level that does not is run
once more before the sweep stops (the JSON keeps both attempts).
"""

from gevent import monkey

monkey.patch_all()  # first, as in every entry point: the child watchers run on gevent

import argparse
import dataclasses
import datetime
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_output import (
    cpu_us_per_reply,
    format_comparison,
    format_results,
    format_row,
    side_summary,
)
from bench_processes import (
    GENERATOR_CPU,
    ROOT,
    SERVICE_CPU,
    BenchError,
    Child,
    child_env,
    free_port,
    load_average,
    machine,
    pin,
)

BIN = ROOT / "bin" / "exrate-service"
ECHO = ROOT / "tools" / "echo_client.py"
KEEP_UP_RATIO = 0.98
KEEP_UP_P99_MS = 100.0
KEEP_UP_HEARTBEAT_GAP_S = 1.1


@dataclasses.dataclass(frozen=True)
class Plan:
    warmup_rate: float
    warmup_s: float
    warm_levels: tuple
    level_s: float
    ceiling_levels: tuple
    ceiling_s: float
    cold_rate: float
    cold_requests: int
    cold_days: int
    cold_latency_ms: float
    failing_rate: float
    failing_s: float
    failing_days: int
    failing_http_timeout_s: float


FULL = Plan(warmup_rate=3000, warmup_s=3, level_s=8,
            warm_levels=(1000, 5000, 10000, 15000, 20000, 25000, 30000, 40000, 50000, 60000,
                         70000, 80000, 90000),
            ceiling_levels=(20000, 30000, 40000, 50000, 60000, 70000, 80000, 90000, 100000),
            ceiling_s=5,
            cold_rate=200, cold_requests=1000, cold_days=50, cold_latency_ms=200,
            failing_rate=200, failing_s=5, failing_days=10, failing_http_timeout_s=2)
QUICK = Plan(warmup_rate=5000, warmup_s=1, level_s=1.5, warm_levels=(500, 2000),
             ceiling_levels=(2000,), ceiling_s=1,
             cold_rate=100, cold_requests=100, cold_days=10, cold_latency_ms=200,
             failing_rate=50, failing_s=1, failing_days=5, failing_http_timeout_s=1)
FIRST_DAY = datetime.date(2021, 3, 1)


def run_bench(out_path, *, quick=False, pin_cpus=False, out=print):
    """Run every scenario, print the table, write the JSON; 0 if all targets were met."""
    plan = QUICK if quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="exrate-bench-"))
    bench = Bench(plan, workdir, out, pin_cpus)
    started = time.monotonic()
    failed = True
    try:
        results = {
            "machine": machine(pin_cpus),
            "command": "python tools/bench.py" + (" --quick" if quick else ""),
            "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "criteria": {"keep_up_ratio": KEEP_UP_RATIO, "keep_up_p99_ms": KEEP_UP_P99_MS,
                         "keep_up_heartbeat_gap_s": KEEP_UP_HEARTBEAT_GAP_S},
            "plan": dataclasses.asdict(plan),
            "scenarios": {},
        }
        for name, scenario in (("generator_ceiling", bench.ceiling), ("warm", bench.warm),
                               ("cold", bench.cold), ("rate_api_failing", bench.failing)):
            out(f"bench: {name} ...")
            results["scenarios"][name] = scenario()
        results["duration_s"] = round(time.monotonic() - started, 1)
        results["machine"]["load_average_after"] = load_average()
        results["verdict"] = verdict(results["scenarios"])
        failed = False
    except BenchError as e:
        out(f"tools/bench.py: {e}; the processes' logs are in {workdir}")
        return 1
    finally:
        bench.close()
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)
    out(format_results(results))
    if out_path:
        write_json(out_path, results, out)
    return 0 if all(results["verdict"].values()) else 1


class Bench:
    """Runs the scenarios of ``plan``; every process it starts is stopped by ``close()``."""

    def __init__(self, plan, workdir, out, pin_cpus=False):
        self.plan = plan
        self.pin_cpus = pin_cpus
        self.workdir = workdir
        self.out = out
        self.children = []

    def close(self):
        for child in self.children:
            child.stop()

    # -- scenarios -------------------------------------------------------------------

    def ceiling(self):
        """The simulator against the echo client: how fast the load generator itself goes."""
        rows = []
        for rate in self.plan.ceiling_levels:
            row = self.retried(lambda rate=rate: self.ceiling_level(rate))
            rows.append(row)
            if not row["kept_up"]:
                break
        kept = [r for r in rows if r["kept_up"]]
        return {"levels": rows,
                "sustained_replies_per_s": max((r["replies_per_s"] for r in kept), default=0.0),
                "sustained_level": max((r["rate"] for r in kept), default=None)}

    def ceiling_level(self, rate):
        port = free_port()
        sim = self.simulator("ceiling", port, rate, self.plan.ceiling_s)
        sim.wait_for("listening on", 30)
        echo = self.start("echo", [sys.executable, str(ECHO), f"ws://127.0.0.1:{port}"],
                          child_env(), cpu=SERVICE_CPU)
        try:
            return self.measure(f"ceiling {rate:g}", rate, sim, None)
        finally:
            echo.stop()

    def retried(self, run_level):
        """``run_level()``, once more if it fell behind: a level is declared out of reach
        only when it fails twice (another process on the machine can spoil one run)."""
        row = run_level()
        self.out(format_row(row))
        if not row["kept_up"]:
            first = row
            row = run_level()
            row["first_attempt"] = {k: v for k, v in first.items() if k != "report"}
            self.out(format_row(row) + "  (second attempt)")
        return row

    def warm_service(self, label, port, binary=BIN):
        """A service (``binary``, from its own tree) on ``port``, run warm: the ECB
        provider, a warm-up run first so every day's table is in memory. -> (Child, row)."""
        env = child_env(EXRATE_URL=f"ws://127.0.0.1:{port}", EXRATE_PROVIDER="ecb",
                        EXRATE_CACHE_DIR=str(self.workdir / f"{label}-cache"))
        sim = self.simulator(f"{label}-warmup", port, self.plan.warmup_rate, self.plan.warmup_s)
        sim.wait_for("listening on", 30)
        service = self.start(f"service-{label}", [sys.executable, str(binary)], env,
                             cpu=SERVICE_CPU, cwd=binary.parent.parent)
        return service, self.measure(f"{label} warm-up", self.plan.warmup_rate, sim, service)

    def warm(self):
        """Every table in memory; rates rise until the service falls behind."""
        port = free_port()
        service, warmup = self.warm_service("warm", port)
        rows = []
        for rate in self.plan.warm_levels:
            row = self.retried(lambda rate=rate: self.measure(
                f"warm {rate:g}", rate,
                self.simulator(f"warm-{rate:g}", port, rate, self.plan.level_s), service))
            rows.append(row)
            if not row["kept_up"]:
                break
        sampled = [r["service_peak_rss_mb"] for r in [warmup, *rows] if r["service_peak_rss_mb"]]
        peak_rss_mb = max([service.peak_rss_mb() or 0.0, *sampled])
        exit_code = service.stop()
        kept = [r for r in rows if r["kept_up"]]
        best = max(kept, key=lambda r: r["replies_per_s"], default=None)
        return {"warmup": warmup, "levels": rows,
                "sustained_replies_per_s": best["replies_per_s"] if best else 0.0,
                "sustained_level": best["rate"] if best else None,
                "service_peak_rss_mb": peak_rss_mb, "service_exit_code": exit_code}

    def cold(self):
        """An empty cache, a 200 ms rate API, many days: one fetch per day, no stall."""
        plan = self.plan
        port, api_port = free_port(), free_port()
        env = child_env(EXRATE_URL=f"ws://127.0.0.1:{port}", EXRATE_PROVIDER="exchangerate.host",
                        EXCHANGE_ACCESS_KEY="bench-key",
                        EXCHANGERATE_HOST_URL=f"http://127.0.0.1:{api_port}",
                        EXRATE_CACHE_DIR=str(self.workdir / "cold-cache"))
        last = FIRST_DAY + datetime.timedelta(days=plan.cold_days - 1)
        sim = self.simulator("cold", port, plan.cold_rate,
                             plan.cold_requests / plan.cold_rate + 0.05,
                             f"--requests={plan.cold_requests}", f"--dates={FIRST_DAY}:{last}",
                             f"--rate-api={api_port}",
                             f"--rate-api-latency={plan.cold_latency_ms:g}", "--drain=5")
        sim.wait_for("listening on", 30)
        service = self.start("service-cold", [sys.executable, str(BIN)], env, cpu=SERVICE_CPU)
        row = self.measure("cold", plan.cold_rate, sim, service, strict=False)
        service.stop()
        api = row["report"].get("rate_api") or {}
        row["rate_api_calls"] = api.get("calls")
        row["days"] = plan.cold_days
        row["targets"] = {
            "at_most_one_api_call_per_day": (api.get("calls") is not None
                                             and api["calls"] <= plan.cold_days),
            "p99_under_300_ms": row["p99_ms"] is not None and row["p99_ms"] < 300,
            "no_reconnect": row["connections"] == 1,
            "all_answered_valid": row["unanswered"] == 0 and row["invalid"] == 0,
        }
        self.out(format_row(row))
        return row

    def failing(self):
        """Every rate fetch fails: error replies, heartbeats on time, the connection stays."""
        plan = self.plan
        port, api_port = free_port(), free_port()
        env = child_env(EXRATE_URL=f"ws://127.0.0.1:{port}", EXRATE_PROVIDER="frankfurter",
                        FRANKFURTER_URL=f"http://127.0.0.1:{api_port}/v1",
                        EXRATE_HTTP_TIMEOUT=f"{plan.failing_http_timeout_s:g}",
                        EXRATE_CACHE_DIR=str(self.workdir / "failing-cache"))
        last = FIRST_DAY + datetime.timedelta(days=plan.failing_days - 1)
        sim = self.simulator("failing", port, plan.failing_rate, plan.failing_s,
                             f"--dates={FIRST_DAY}:{last}", f"--rate-api={api_port}",
                             "--rate-api-fail=500", f"--drain={plan.failing_http_timeout_s + 4:g}")
        sim.wait_for("listening on", 30)
        service = self.start("service-failing", [sys.executable, str(BIN)], env,
                             cpu=SERVICE_CPU)
        row = self.measure("rate API failing", plan.failing_rate, sim, service, strict=False)
        service.stop()
        report = row["report"]
        row["rate_api_calls"] = (report.get("rate_api") or {}).get("calls")
        row["error_reasons"] = report.get("error_reasons")
        unavailable = sum(n for reason, n in (report.get("error_reasons") or {}).items()
                          if reason.startswith("exchange rate service unavailable"))
        row["targets"] = {
            "every_request_answered": row["unanswered"] == 0 and row["invalid"] == 0,
            "only_error_replies": (report.get("ok") == 0
                                   and unavailable == report.get("error_replies")),
            "heartbeat_gap_under_1_1_s": (row["heartbeat_max_gap_s"] or 9) < 1.1,
            "no_reconnect": row["connections"] == 1,
        }
        self.out(format_row(row))
        return row

    # -- one measured run ------------------------------------------------------------

    def simulator(self, label, port, rate, duration_s, *extra):
        report = self.workdir / f"{label}.json"
        args = [sys.executable, str(BIN), "simulate", f"--port={port}", f"--rate={rate:g}",
                f"--duration={duration_s:g}", f"--report={report}", "--seed=1", *extra]
        child = self.start(f"simulate-{label}", args, child_env(LOG_LEVEL="WARNING"),
                           cpu=GENERATOR_CPU)
        child.report_path = report
        return child

    def start(self, label, args, env, cpu=None, cwd=ROOT):
        child = Child(label, args, env, self.workdir / f"{label}.log", cwd)
        self.children.append(child)
        if self.pin_cpus:
            pin(child.proc.pid, cpu)
        return child

    def measure(self, label, rate, sim, service, *, strict=True):
        """Wait for ``sim`` to finish, sampling ``service`` (a Child or None) meanwhile."""
        connected = sim.wait_for("client connected", 60)
        if connected is None:
            raise BenchError(f"{label}: no client connected to the simulator "
                             f"(logs in {self.workdir})")
        watch = service.watch() if service else None
        end = time.monotonic() + (sim.duration_s() or 60) + 30
        while sim.seen("window over") is None and time.monotonic() < end and sim.alive():
            if watch:
                watch.sample()
            time.sleep(0.1)
        usage = watch.finish() if watch else {}
        if sim.wait(60) is None:
            raise BenchError(f"{label}: the simulator did not finish")
        try:
            report = json.loads(sim.report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BenchError(f"{label}: no report from the simulator: {e}") from e
        row = {
            "label": label, "rate": rate,
            "requests_per_s": report["requests_per_s"], "replies_per_s": report["replies_per_s"],
            "p50_ms": report["latency_p50_ms"], "p99_ms": report["latency_p99_ms"],
            "max_ms": report["latency_max_ms"],
            "heartbeat_max_gap_s": report["client_heartbeat_max_gap_s"],
            "unanswered": report["unanswered"], "invalid": report["invalid"],
            "connections": report["connections"],
            "service_cpu_percent": usage.get("cpu_percent"),
            "service_peak_rss_mb": usage.get("peak_rss_mb"),
            "simulator_cpu_percent": report["simulator_cpu_percent"],
            "report": report,
        }
        row["kept_up"] = keeps_up(row) if strict else None
        return row


def keeps_up(row):
    rate = row["rate"]
    return (row["requests_per_s"] >= KEEP_UP_RATIO * rate
            and row["replies_per_s"] >= KEEP_UP_RATIO * rate
            and row["unanswered"] == 0 and row["invalid"] == 0 and row["connections"] == 1
            and row["p99_ms"] is not None and row["p99_ms"] < KEEP_UP_P99_MS
            and row["heartbeat_max_gap_s"] is not None
            and row["heartbeat_max_gap_s"] < KEEP_UP_HEARTBEAT_GAP_S)


def verdict(scenarios):
    """The targets of the issue, each True or False."""
    warm = scenarios["warm"]
    levels = {r["rate"]: r for r in warm["levels"]}
    best = next((r for r in warm["levels"] if r["rate"] == warm["sustained_level"]), None)
    ten_k = levels.get(10000)
    result = {
        "warm_kept_up_at_some_level": best is not None,
        "warm_peak_rss_under_100_mb": (warm["service_peak_rss_mb"] or 0) < 100,
        "warm_heartbeat_gap_under_1_1_s_at_best_level":
            best is not None and (best["heartbeat_max_gap_s"] or 9) < 1.1,
        "cold_targets": all(scenarios["cold"]["targets"].values()),
        "rate_api_failing_targets": all(scenarios["rate_api_failing"]["targets"].values()),
        # the load generator kept up alone at least as far as with the service
        "generator_not_the_limit": (scenarios["generator_ceiling"]["sustained_level"] or 0)
        >= (warm["sustained_level"] or 0),
    }
    if ten_k is not None:  # the full plan: the numbers
        result["warm_20000_replies_per_s"] = warm["sustained_replies_per_s"] >= 0.98 * 20000
        result["warm_p99_under_5_ms_at_10000"] = (ten_k["p99_ms"] or 999) < 5
    return result




# -- side by side with another source tree (--baseline) ---------------------------------

COMPARE_LEVELS = (5000, 10000, 20000, 40000)


def run_compare(baseline_dir, out_path, *, levels=COMPARE_LEVELS, level_s=5.0, rounds=2,
                pin_cpus=False, out=print):
    """Every service warm, each level run on each in turn (the order rotating round by
    round) against this tree's simulator; prints the medians side by side.
    ``baseline_dir``: one source tree, or several separated by commas (each side is then
    named by its directory's name)."""
    dirs = [d for d in str(baseline_dir).split(",") if d]
    if len(dirs) == 1:
        sides = {"baseline": Path(dirs[0]).resolve() / "bin" / "exrate-service"}
    else:
        sides = {Path(d).resolve().name: Path(d).resolve() / "bin" / "exrate-service"
                 for d in dirs}
    sides["current"] = BIN
    for binary in sides.values():
        if not binary.is_file():
            out(f"tools/bench.py: no bin/exrate-service under {binary.parent.parent} "
                f"(export a commit there: git archive COMMIT | tar -x -C DIR)")
            return 2
    plan = dataclasses.replace(FULL, level_s=level_s, warm_levels=tuple(levels))
    workdir = Path(tempfile.mkdtemp(prefix="exrate-bench-compare-"))
    bench = Bench(plan, workdir, out, pin_cpus)
    results = {"machine": machine(pin_cpus),
               "baseline": ",".join(str(Path(d).resolve()) for d in dirs),
               "sides": list(sides),
               "command": f"python tools/bench.py --baseline={baseline_dir} "
                          f"--levels={','.join(f'{x:g}' for x in levels)} "
                          f"--level-seconds={level_s:g} --rounds={rounds}",
               "level_s": level_s, "rounds": rounds, "runs": [], "summary": []}
    try:
        services, ports = {}, {}
        for side, binary in sides.items():
            ports[side] = free_port()
            services[side], warmup = bench.warm_service(side, ports[side], binary)
            out(format_row(warmup))
        for rate in levels:
            rows = {side: [] for side in sides}
            for round_number in range(rounds):
                names = list(sides)
                shift = round_number % len(names)
                order = names[shift:] + names[:shift] if len(names) > 2 else \
                    (names if round_number % 2 == 0 else names[::-1])
                for side in order:
                    row = bench.measure(f"{side} {rate:g}", rate, bench.simulator(
                        f"{side}-{rate:g}-{round_number}", ports[side], rate, level_s),
                        services[side])
                    row["cpu_us_per_reply"] = cpu_us_per_reply(row)
                    out(format_row(row))
                    rows[side].append(row)
                    results["runs"].append({k: v for k, v in row.items() if k != "report"})
            results["summary"].append({"rate": rate, **{
                side: side_summary(side_rows) for side, side_rows in rows.items()}})
        results["machine"]["load_average_after"] = load_average()
    except BenchError as e:
        out(f"tools/bench.py: {e}; the processes' logs are in {workdir}")
        return 1
    finally:
        bench.close()
    shutil.rmtree(workdir, ignore_errors=True)
    out("")
    out(format_comparison(results))
    if out_path:
        write_json(out_path, results, out)
    return 0


def write_json(out_path, results, out=print):
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    out(f"bench: results written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python tools/bench.py", description=__doc__.split("\n\n")[0],
        epilog="python tools/echo_client.py ws://HOST:PORT runs the echo client alone.")
    parser.add_argument("--out", default=None,
                        help="JSON results file [default: bench-results/bench.json, or "
                             "bench-results/compare.json with --baseline]")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (~15 s) instead of the full sweep (~3 min)")
    parser.add_argument("--pin", action="store_true",
                        help="the service on CPU 0, the load generator on CPU 1")
    parser.add_argument("--baseline", metavar="DIR",
                        help="compare the warm levels with the service of another source tree")
    parser.add_argument("--levels", default=",".join(f"{x:g}" for x in COMPARE_LEVELS),
                        help="--baseline: warm request rates, comma-separated")
    parser.add_argument("--level-seconds", type=float, default=5.0,
                        help="--baseline: seconds per run of a level [default: 5]")
    parser.add_argument("--rounds", type=int, default=2,
                        help="--baseline: runs of each level per side [default: 2]")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("psutil") is None:  # a development tool: requirements-dev.txt
        print("tools/bench.py needs psutil to watch the service: "
              "pip install -r requirements-dev.txt", file=sys.stderr)
        return 2
    if args.baseline:
        try:
            levels = tuple(float(x) for x in args.levels.split(",") if x.strip())
        except ValueError:
            parser.error(f"--levels takes comma-separated numbers, got {args.levels!r}")
        if not levels or args.rounds < 1 or args.level_seconds <= 0:
            parser.error("--levels, --rounds and --level-seconds must be positive")
        return run_compare(args.baseline, args.out or "bench-results/compare.json",
                           levels=levels, level_s=args.level_seconds, rounds=args.rounds,
                           pin_cpus=args.pin)
    return run_bench(args.out or "bench-results/bench.json", quick=args.quick,
                     pin_cpus=args.pin)


if __name__ == "__main__":
    sys.exit(main())
