"""The README's soak: abrupt drops every 30 s for 5 minutes, service and simulator as processes.

usage: python tools/soak.py [--service LABEL=TREE ...] [--simulator-tree TREE]
                            [--duration 300] [--rate 1000] [--seed 7] [--every 30]
                            [--outdir DIR] [--json]

For each ``--service`` (default: this checkout), one after the other: the simulator of
``--simulator-tree`` (default: this checkout, so every service meets the same simulator)
runs in its own process on a free port of 127.0.0.1,

    exrate-service simulate --host 127.0.0.1 --port PORT --rate 1000 --duration 300
                            --seed 7 --faults=30:drop,60:drop,...,270:drop --report=FILE

and the service of TREE runs in its own process against it
(``EXRATE_URL=ws://127.0.0.1:PORT EXRATE_PROVIDER=ecb EXRATE_CACHE_DIR=<fresh tmp dir>
TREE/bin/exrate-service``). When the simulator has written its report and exited, the
service gets SIGTERM; its summary lines are read from its log. Summary lines in l2met form
(``count#exrate.replies=...``, per interval) are summed over the run; the older
``replies=...`` form (cumulative, the first release) is read from the last line.

Prints one table row per service (requests, answered, unanswered from the simulator's
report; the service's own counters) and keeps every log and report in --outdir
(default: a fresh directory under /tmp). Dev only: loopback only, every process bounded in
time and stopped at the end.
"""

from gevent import monkey; monkey.patch_all()  # noqa: E702, I001  first: before socket/subprocess

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START_S = 30.0          # the simulator must listen, the service connect, within this
STOP_S = 30.0           # the service must exit this long after SIGTERM
COUNTERS = ("requests", "replies", "delivered", "redelivered", "dropped", "possibly_lost",
            "connects", "reconnects", "errors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = STOP_S) -> int:
    """Signal ``process`` (one we started) and wait; kill it if it outlives ``wait_s``."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def wait_for_line(path: Path, pattern: str, process: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def faults(duration_s: float, every_s: float) -> str:
    times = []
    t = every_s
    while t < duration_s:
        times.append(t)
        t += every_s
    return ",".join(f"{t:g}:drop" for t in times)


def service_counters(log_text: str) -> dict[str, Any]:
    """The service's counters over the whole run, from its ``summary:`` lines."""
    lines = [line for line in log_text.splitlines() if "summary:" in line]
    if not lines:
        return {"summary_lines": 0}
    if "count#" in lines[-1]:  # l2met: count# figures are per interval, so sum them
        totals: dict[str, int] = {}
        for line in lines:
            for name, value in re.findall(r"count#exrate\.([\w.]+)=(-?\d+)", line):
                totals[name] = totals.get(name, 0) + int(value)
        form = "l2met, summed"
    else:  # the first release: cumulative key=value, the last line has it all
        totals = {name: int(float(value))
                  for name, value in re.findall(r"\b(\w+)=(-?[\d.]+)", lines[-1])}
        form = "cumulative, last line"
    return {"summary_lines": len(lines), "form": form, "final_line": lines[-1].strip(),
            **{name: totals.get(name) for name in COUNTERS}}


def run_one(label: str, tree: Path, args: argparse.Namespace, outdir: Path) -> dict[str, Any]:
    python = args.python
    port = free_port()
    report_path = outdir / f"{label}-report.json"
    sim_log, svc_log = outdir / f"{label}-simulator.log", outdir / f"{label}-service.log"
    cache_dir = Path(tempfile.mkdtemp(prefix=f"soak-cache-{label}-", dir=outdir))
    script = faults(args.duration, args.every)
    sim_cmd = [python, str(args.simulator_tree / "bin" / "exrate-service"), "simulate",
               "--host", "127.0.0.1", "--port", str(port), "--rate", f"{args.rate:g}",
               "--duration", f"{args.duration:g}", "--seed", str(args.seed),
               f"--faults={script}", f"--report={report_path}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXRATE_", "REDIS_"))}
    env.update(EXRATE_URL=f"ws://127.0.0.1:{port}", EXRATE_PROVIDER="ecb",
               EXRATE_CACHE_DIR=str(cache_dir))
    svc_cmd = [python, str(tree / "bin" / "exrate-service")]
    print(f"== {label}: {' '.join(sim_cmd)}", file=sys.stderr, flush=True)
    print(f"== {label}: EXRATE_URL={env['EXRATE_URL']} EXRATE_PROVIDER=ecb "
          f"EXRATE_CACHE_DIR={cache_dir} {' '.join(svc_cmd)}", file=sys.stderr, flush=True)
    started = time.time()
    with open(sim_log, "wb") as slog:
        simulator = subprocess.Popen(sim_cmd, stdout=slog, stderr=subprocess.STDOUT,
                                     cwd=args.simulator_tree)
    service = None
    try:
        if not wait_for_line(sim_log, r"simulate: listening on", simulator, START_S):
            raise SystemExit(f"{label}: the simulator did not listen; see {sim_log}")
        with open(svc_log, "wb") as vlog:
            service = subprocess.Popen(svc_cmd, stdout=vlog, stderr=subprocess.STDOUT,
                                       cwd=tree, env=env)
        if not wait_for_line(sim_log, r"simulate: client connected", simulator, START_S):
            raise SystemExit(f"{label}: the service did not connect; see {svc_log}")
        # the window, the simulator's drain (2 s) and its report, with room for a busy machine
        simulator.wait(args.duration + 120)
    finally:
        sim_rc = stop(simulator, signal.SIGINT)
        svc_rc = stop(service) if service is not None else None
    report = json.loads(report_path.read_text())
    counters = service_counters(svc_log.read_text(errors="replace"))
    return {
        "label": label, "tree": str(tree), "started": time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "simulator_exit": sim_rc, "service_exit": svc_rc,
        "requests": report["requests"], "answered": report["requests"] - report["unanswered"],
        "unanswered": report["unanswered"],
        "simulator": {key: report.get(key) for key in (
            "replies", "ok", "error_replies", "invalid", "duplicates", "redelivered",
            "unanswered_on_ended_connections", "connections", "max_connected",
            "client_heartbeat_max_gap_s", "latency_p50_ms", "latency_p99_ms",
            "latency_max_ms", "faults_applied", "replies_per_s", "send_failures")},
        "service": counters,
        "logs": {"report": str(report_path), "simulator": str(sim_log), "service": str(svc_log)},
    }


def row(result: dict[str, Any]) -> str:
    s = result["service"]
    shown = " ".join(f"{k}={s[k]}" for k in ("replies", "delivered", "redelivered", "dropped",
                                             "possibly_lost") if s.get(k) is not None)
    return (f"| {result['label']} | {result['requests']:,} | {result['answered']:,} | "
            f"{result['unanswered']:,} | `{shown}` |")


def parse_service(text: str) -> tuple[str, Path]:
    label, sep, tree = text.partition("=")
    if not sep or not label or not tree:
        raise argparse.ArgumentTypeError("--service LABEL=TREE")
    path = Path(tree).resolve()
    if not (path / "bin" / "exrate-service").exists():
        raise argparse.ArgumentTypeError(f"no bin/exrate-service under {path}")
    return label, path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", type=parse_service, action="append",
                        help="LABEL=TREE, repeatable; run one after the other")
    parser.add_argument("--simulator-tree", type=Path, default=ROOT)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between drops")
    parser.add_argument("--outdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.simulator_tree = args.simulator_tree.resolve()
    services = args.service or [("today", ROOT)]
    outdir = args.outdir or Path(tempfile.mkdtemp(prefix="exrate-soak-"))
    outdir.mkdir(parents=True, exist_ok=True)
    results = []
    for label, tree in services:
        results.append(run_one(label, tree, args, outdir))
        (outdir / "soak.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("| service | requests | answered | unanswered | the service's own counters |")
        print("|---|--:|--:|--:|---|")
        for result in results:
            print(row(result))
        print(f"\nlogs and reports: {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
