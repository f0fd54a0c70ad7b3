"""Smoke tests of ``exrate-service simulate`` and of the dev tool ``tools/bench.py``.

They check that the tools run and that their JSON has the fields the README's figures
come from; they assert no timing (the bench prints figures, it does not judge CI).
"""

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest

from exrate_green.simulator.tool import Fault, parse_dates, parse_faults

from .support import ROOT, run_service, running_service, service_env, start_service

pytestmark = pytest.mark.timeout(60)

LEVEL_FIELDS = {"rate", "requests_per_s", "replies_per_s", "p50_ms", "p99_ms", "max_ms",
                "heartbeat_max_gap_s", "unanswered", "invalid", "connections",
                "service_cpu_percent", "service_peak_rss_mb", "simulator_cpu_percent", "kept_up"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fault_scripts_parse_in_time_order():
    assert parse_faults("12:drop, 5:pause=3,20:close=1011,25:garbage=10,30:slowread=2") == [
        Fault(5, "pause", 3.0), Fault(12, "drop"), Fault(20, "close", 1011),
        Fault(25, "garbage", 10), Fault(30, "slowread", 2.0)]
    assert parse_faults("") == [] and parse_faults("1:close") == [Fault(1, "close")]


@pytest.mark.parametrize("script", ["5", "x:drop", "5:explode", "5:pause", "5:drop=1",
                                    "5:close=99", "5:garbage=-1", "5:slowread=fast"])
def test_bad_fault_scripts_say_what_is_wrong(script):
    with pytest.raises(ValueError, match="fault"):
        parse_faults(script)


def test_dates_option():
    first, last = parse_dates("2021-03-01:2021-04-19")
    assert (last - first).days == 49
    with pytest.raises(ValueError):
        parse_dates("2021-04-19:2021-03-01")


def test_simulate_refuses_a_bad_script_with_exit_code_2(tmp_path):
    result = run_service(["simulate", "--faults=5:explode"], service_env(tmp_path))
    assert result.returncode == 2
    assert "5:explode" in result.stderr


def test_simulate_drives_a_client_through_faults_and_writes_a_report(tmp_path):
    port, report_path = free_port(), tmp_path / "report.json"
    sim = start_service(["simulate", f"--port={port}", "--rate=200", "--duration=3",
                         "--faults=0.5:garbage=12,1:close=1011", f"--report={report_path}",
                         "--seed=3"], service_env(tmp_path))
    try:
        line = sim.stdout.readline().decode()
        assert line.startswith("simulate: listening on ws://127.0.0.1:")
        with running_service(f"ws://127.0.0.1:{port}", tmp_path / "cache"):
            deadline = time.monotonic() + 30
            while sim.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        output = sim.stdout.read().decode()
    finally:
        sim.kill()
        sim.wait()
    assert "simulate: report:" in output, output
    report = json.loads(report_path.read_text())
    assert report["invalid"] == 0, report["problems"]
    assert report["requests"] > 0 and report["replies"] > 0
    assert report["garbage_sent"] == 12
    assert [f["fault"] for f in report["faults_applied"]] == ["0.5:garbage=12", "1:close=1011"]
    assert report["connections"] == 2 and (1011, "") in map(tuple, report["client_closes"])
    for field in ("replies_per_s", "latency_p50_ms", "latency_p99_ms", "latency_max_ms",
                  "client_heartbeat_max_gap_s", "unanswered", "simulator_cpu_percent"):
        assert field in report


def run_bench_tool(args, env, timeout_s):
    """``python tools/bench.py ARGS`` from the checkout, as its users run it."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *args], env=env,
                          cwd=str(ROOT), capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def test_bench_is_a_dev_tool_not_a_command_of_the_service(tmp_path):
    result = run_service(["bench", "--quick"], service_env(tmp_path))
    assert result.returncode == 2
    assert "bench" not in run_service(["--help"], service_env(tmp_path)).stdout


def test_bench_quick_runs_and_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench_tool(["--quick", f"--out={out}"], service_env(tmp_path), timeout_s=55)
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: a target missed
    assert "replies/s" in result.stdout
    results = json.loads(out.read_text())
    assert set(results["machine"]) >= {"cpus", "cpu_model", "python"}
    scenarios = results["scenarios"]
    rows = (scenarios["warm"]["levels"] + scenarios["generator_ceiling"]["levels"]
            + [scenarios["cold"], scenarios["rate_api_failing"]])
    for row in rows:
        assert LEVEL_FIELDS <= set(row), row["label"]
    assert scenarios["warm"]["levels"] and scenarios["warm"]["service_peak_rss_mb"]
    assert scenarios["cold"]["rate_api_calls"] is not None
    assert set(scenarios["cold"]["targets"]) and set(scenarios["rate_api_failing"]["targets"])
    assert "generator_not_the_limit" in results["verdict"]


@pytest.mark.timeout(120)
def test_bench_compares_a_baseline_tree_with_this_one_side_by_side(tmp_path):
    baseline = tmp_path / "baseline"   # a copy of this tree stands in for an older commit
    for part in ("bin", "exrate_green"):
        shutil.copytree(ROOT / part, baseline / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "compare.json"
    result = run_bench_tool([f"--baseline={baseline}", "--levels=300", "--level-seconds=1",
                             "--rounds=2", f"--out={out}"], service_env(tmp_path),
                            timeout_s=110)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "base replies/s" in result.stdout and "cur replies/s" in result.stdout
    results = json.loads(out.read_text())
    assert results["baseline"] == str(baseline)
    labels = [run["label"] for run in results["runs"]]
    assert labels == ["baseline 300", "current 300", "current 300", "baseline 300"]  # alternating
    (level,) = results["summary"]
    assert level["rate"] == 300
    for side in ("baseline", "current"):
        assert level[side]["rounds"] == 2 and level[side]["replies_per_s"] > 0
        assert level[side]["cpu_us_per_reply"] is not None


def test_bench_refuses_a_baseline_without_the_service(tmp_path):
    result = run_bench_tool([f"--baseline={tmp_path}"], service_env(tmp_path), timeout_s=30)
    assert result.returncode == 2
    assert "bin/exrate-service" in result.stdout + result.stderr
