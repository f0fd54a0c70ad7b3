"""The stall watchdog (``service.start_stall_watchdog``): a wedged process exits with 3.

A tiny script runs the service in a subprocess against the simulator in this process,
waits until it serves, then wedges its hub: with the original (unpatched) ``time.sleep``,
or a busy loop. Nothing in that process can run but native threads; the watchdog thread
must notice that the receive loop and the heartbeat sender stopped making progress and
end the process with exit code 3 within ``stall_exit_s`` (+ its 1 s check period), so the
platform restarts it. A healthy, idle service must not trip it.
"""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from exrate_green.simulator import Upstream

from .support import service_env

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[1]
STALL_S = 1.5
CHECK_EVERY_S = 1.0  # start_stall_watchdog's default period

SCRIPT = """
    from gevent import monkey; monkey.patch_all()
    import sys, gevent
    from pathlib import Path
    from exrate_green.cli import setup_logging
    from exrate_green.runtime import Runtime
    from exrate_green.config import Settings
    from exrate_green.service import Service

    url, cache_dir, stall_s, how = sys.argv[1:5]
    settings = Settings(url=url, cache_dir=Path(cache_dir), provider="ecb",
                        stall_exit_s=float(stall_s), heartbeat_interval_s=0.1,
                        heartbeat_timeout_s=0.5, summary_interval_s=3600.0)
    settings.validate()
    setup_logging(settings)
    runtime = Runtime(settings)
    service = Service(settings, runtime.book)
    gevent.spawn(service.run)
    while not (service.session and service.session.heartbeats_received):
        gevent.sleep(0.02)
    gevent.sleep(0.3)
    if how == "sleep-while-disconnected":
        print("SERVING", flush=True)  # the test now takes the upstream down
        while service.session is not None:
            gevent.sleep(0.02)
        gevent.sleep(0.3)             # reconnecting, with backoff
    print("WEDGING", how, flush=True)
    if how.startswith("sleep"):  # the hub is blocked in a native sleep: no greenlet runs
        monkey.get_original("time", "sleep")(60)
    elif how == "busy":     # a greenlet that never yields
        while True:
            pass
    else:                   # healthy: idle, serving heartbeats
        gevent.sleep(60)
"""


def run_wedged(tmp_path, how, wait_s):
    env = service_env(tmp_path, PYTHONPATH=str(ROOT))
    env.pop("GEVENT_MONITOR_THREAD_ENABLE", None)  # its reports would only add noise
    with Upstream(heartbeat_interval_s=0.1) as up:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(SCRIPT), up.url, str(tmp_path / "cache"),
             str(STALL_S), how], env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        lines = []
        try:
            wedged_at = None
            for raw in iter(proc.stdout.readline, b""):
                lines.append(raw.decode("utf-8", "replace"))
                if raw.startswith(b"SERVING"):
                    up.refuse_connections()
                    up.drop()
                if raw.startswith(b"WEDGING"):
                    wedged_at = time.monotonic()
                    break
            assert wedged_at is not None, "".join(lines)
            try:
                code = proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                code = None
            exited_after = time.monotonic() - wedged_at
            lines.append(proc.stdout.read().decode("utf-8", "replace") if code is not None else "")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        return code, exited_after, "".join(lines)


@pytest.mark.parametrize("how", ["sleep", "busy", "sleep-while-disconnected"])
def test_a_wedged_hub_exits_with_3(tmp_path, how):
    code, exited_after, output = run_wedged(tmp_path, how, wait_s=STALL_S + CHECK_EVERY_S + 5)
    assert code == 3, output[-3000:]
    # the last sign of progress came at most one hub tick (stall_exit_s / 4) before the
    # wedge; the watchdog looks once a second
    earliest, latest = STALL_S - STALL_S / 4 - 0.1, STALL_S + CHECK_EVERY_S + 0.5
    assert earliest <= exited_after <= latest, exited_after
    assert "made no progress" in output and "exiting so the platform restarts us" in output
    print(f"\nFIGURES watchdog {how}: exit 3 after {exited_after:.2f} s "
          f"(stall_exit_s {STALL_S}, checked every {CHECK_EVERY_S} s)")


def test_a_healthy_idle_service_is_left_alone(tmp_path):
    code, exited_after, output = run_wedged(tmp_path, "none", wait_s=3 * STALL_S + CHECK_EVERY_S)
    assert code is None, output[-3000:]  # still running after three stall periods
    assert "made no progress" not in output
