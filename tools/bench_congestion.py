"""Memory and loss of the service under a burst and a cold storm (docs/congestion.md).

    /work/venv/bin/python tools/bench_congestion.py [--root DIR] [--burst N]
        [--storm N] [--days D] [--api-latency S]

The service (``DIR/bin/exrate-service``, default this checkout) runs as a subprocess
against ``tests/ws_peer.py`` (an independent upstream in its own process) and, for the
cold storm, a fake Frankfurter API in this process. Two runs, each on a fresh service:

* burst: N requests for one day, written by the peer in one ``sendall`` (the peer's
  heartbeats queued behind them), rates from the bundled ECB history;
* cold storm: N requests over D distinct days, every day cold, each table fetched from
  an API that answers after S seconds.

Printed per run: baseline RSS (connected, idle), peak RSS (sampled every 20 ms), RSS
after (all answered, 3 s later), replies received by the peer, reconnects, lost
(requests the peer never got an answer to), seconds to answer everything.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gevent import monkey

monkey.patch_all()

import gevent
import psutil

HERE = Path(__file__).resolve().parent.parent
PEER = HERE / "tests" / "ws_peer.py"
#: where the service's output goes (BENCH_LOG=FILE to keep it)
LOG = open(os.environ.get("BENCH_LOG", os.devnull), "ab")


class Peer:
    def __init__(self, heartbeat_s=1.0):
        self.proc = subprocess.Popen([sys.executable, str(PEER), str(heartbeat_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.url = f"ws://127.0.0.1:{int(self.proc.stdout.readline().split()[1])}"

    def ask(self, command):
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.kill()
        self.proc.wait()


def start_service(root, url, tmp, **env):
    variables = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "PYTHONUNBUFFERED": "1",
                 "EXRATE_CACHE_DIR": os.path.join(tmp, "cache"), "EXRATE_URL": url,
                 "EXRATE_SUMMARY_INTERVAL": "3600", "LOG_LEVEL": "WARNING"}
    variables.update({k: str(v) for k, v in env.items()})
    variables.update({k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})
    return subprocess.Popen([sys.executable, str(Path(root) / "bin" / "exrate-service")],
                            env=variables, cwd=root, stdout=LOG, stderr=subprocess.STDOUT)


def rss_mb(process):
    return process.memory_info().rss / 1e6


def run(root, label, n, days, api_latency_s=None, timeout_s=600):
    from exrate_green.simulator import FakeRateApi

    peer, api = Peer(), None
    env = {}
    if api_latency_s is not None:
        api = FakeRateApi(latency_s=api_latency_s).start()
        env = {"EXRATE_PROVIDER": "frankfurter", "FRANKFURTER_URL": api.frankfurter_url,
               "EXRATE_HTTP_TIMEOUT": 30}
    with tempfile.TemporaryDirectory() as tmp:
        service = start_service(root, peer.url, tmp, **env)
        try:
            process = psutil.Process(service.pid)
            deadline = time.monotonic() + 30
            while peer.ask("report")["connections"] < 1 and time.monotonic() < deadline:
                gevent.sleep(0.1)
            gevent.sleep(2.0)
            baseline = rss_mb(process)
            peer.ask(f"days {days}")
            peak, started = baseline, time.monotonic()
            peer.ask(f"send {n}")
            report = peer.ask("report")
            deadline = started + timeout_s
            while time.monotonic() < deadline and service.poll() is None:
                peak = max(peak, rss_mb(process))
                report = peer.ask("report")
                if report["answered"] >= n and report["unanswered"] == 0:
                    break
                gevent.sleep(0.02)
            took_s = time.monotonic() - started
            for _ in range(150):  # 3 s more, still sampling
                if service.poll() is not None:
                    break
                peak = max(peak, rss_mb(process))
                gevent.sleep(0.02)
            after = rss_mb(process) if service.poll() is None else float("nan")
            if os.environ.get("BENCH_MAPS"):
                maps = sorted(process.memory_maps(), key=lambda m: -m.rss)[:6]
                print([(m.path[-30:], m.rss // 1_000_000) for m in maps])
            report = peer.ask("report")
        finally:
            service.kill()
            service.wait()
            peer.close()
            if api is not None:
                api.stop()
    print(f"{label:<34} baseline {baseline:6.1f} MB  peak {peak:6.1f} MB  after "
          f"{after:6.1f} MB  replies {report['answered']:7d}  reconnects "
          f"{report['connections'] - 1:3d}  lost {report['unanswered']:7d}  "
          f"in {took_s:6.1f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(HERE), help="checkout whose service runs")
    parser.add_argument("--burst", type=int, default=400_000)
    parser.add_argument("--storm", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=5000)
    parser.add_argument("--api-latency", type=float, default=1.0)
    parser.add_argument("--only", choices=("burst", "storm"), help="run one of the two")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    print(f"service from {args.root}")
    if args.only != "storm":
        run(args.root, f"burst of {args.burst} (one day)", args.burst, 1)
    if args.only != "burst":
        run(args.root, f"cold storm {args.storm} x {args.days} days", args.storm, args.days,
            api_latency_s=args.api_latency)


if __name__ == "__main__":
    main()
