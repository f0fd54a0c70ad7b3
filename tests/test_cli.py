"""The command line as a user runs it: a real subprocess with only docs/design.md's variables."""

import json
import signal
import time

import gevent
import pytest

from exrate_green.simulator import FakeRateApi, Upstream

from .support import run_service, service_env, start_service, wait_until

pytestmark = pytest.mark.timeout(90)


def test_help_and_version_exit_0(tmp_path):
    shown = run_service(["--help"], service_env(tmp_path))
    assert shown.returncode == 0 and "exrate-service cache" in shown.stdout
    version = run_service(["--version"], service_env(tmp_path))
    assert version.returncode == 0 and version.stdout.startswith("exrate-service ")


@pytest.mark.parametrize("args, variables, says", [
    ([], {"EXRATE_URL": "http://example.com"}, "EXRATE_URL must be a ws:// or wss:// URL"),
    (["--provider=fixer"], {}, "unknown provider 'fixer'"),
    ([], {"EXRATE_HEARTBEAT_TIMEOUT": "-1"}, "EXRATE_HEARTBEAT_TIMEOUT must be a positive number"),
    ([], {"EXRATE_HTTP_TIMEOUT": "soon"},
     "EXRATE_HTTP_TIMEOUT must be a positive number of seconds, got 'soon'"),
    ([], {"LOG_LEVEL": "LOUD"}, "unknown log level 'LOUD'"),
    ([], {"EXRATE_PROVIDER": "exchangerate.host"}, "needs EXCHANGE_ACCESS_KEY"),
])
def test_bad_configuration_is_refused_with_one_line_and_exit_2(tmp_path, args, variables, says):
    result = run_service(args, service_env(tmp_path, **variables))
    assert result.returncode == 2
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_bad_usage_exits_2(tmp_path):
    result = run_service(["cache", "explode"], service_env(tmp_path))
    assert result.returncode == 2 and "unknown cache action 'explode'" in result.stderr


def test_convert_prints_the_ecb_figure(tmp_path):
    result = run_service(["convert", "253.67", "usd", "2021-05-18T21:32:42.324Z"],
                         service_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "253.67 USD = 207.55196 EUR on 2021-05-18" in result.stdout


@pytest.mark.parametrize("args, code, says", [
    (["convert", "10", "ZWL", "2021-05-18"], 1, "unsupported currency 'ZWL'"),
    (["convert", "ten", "USD", "2021-05-18"], 2, "invalid amount 'ten'"),
    (["convert", "10", "USD", "1998-01-01"], 1, "no exchange rate before 1999-01-04"),
    (["convert", "NaN", "USD", "2021-05-18"], 2, "stake must be a finite number"),
])
def test_convert_errors(tmp_path, args, code, says):
    result = run_service(args, service_env(tmp_path))
    assert result.returncode == code and says in result.stderr


def test_a_warm_cache_survives_restarts_and_expires(tmp_path):
    with FakeRateApi() as api:
        env = service_env(tmp_path, EXRATE_PROVIDER="frankfurter",
                          FRANKFURTER_URL=api.frankfurter_url, EXRATE_CACHE_TTL="3")
        args = ["convert", "100", "USD", "2021-05-18"]
        first = run_service(args, env)
        assert first.returncode == 0 and "81.81967 EUR" in first.stdout, first.stderr
        assert api.calls == 1
        second = run_service(args, env)  # a new process: the table comes from disk
        assert second.returncode == 0 and "81.81967 EUR" in second.stdout
        assert api.calls == 1
        listing = run_service(["cache", "list", "--json"], env)
        # one range call fetched (and cached) every day of May 2021
        assert [(e["provider"], e["day"]) for e in json.loads(listing.stdout)] == [
            ("frankfurter", f"2021-05-{d:02d}") for d in range(1, 32)]
        time.sleep(3.2)
        third = run_service(args, env)  # past EXRATE_CACHE_TTL: fetched again
        assert third.returncode == 0 and api.calls == 2


def test_sigterm_finishes_in_flight_work_sends_a_close_frame_and_exits_0(tmp_path):
    with FakeRateApi(latency_s=1.5) as api, Upstream() as up:
        env = service_env(tmp_path, EXRATE_URL=up.url, EXRATE_PROVIDER="frankfurter",
                          FRANKFURTER_URL=api.frankfurter_url, EXRATE_SHUTDOWN_GRACE="10")
        process = start_service([], env)
        try:
            assert up.wait_for_connections(1, 15)
            assert wait_until(lambda: up.client_heartbeats(), 5)
            ids = [up.send_request({"marketId": 1, "selectionId": 2, "odds": 2.5,
                                    "stake": 10 + i, "currency": "USD",
                                    "date": f"2021-05-{10 + i}T12:00:00.000Z"})
                   for i in range(5)]
            gevent.sleep(0.3)  # read, and waiting on the slow rate API
            process.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            replies = [up.wait_for_reply(rid, 10) for rid in ids]
            assert wait_until(lambda: process.poll() is not None, 12)
            took_s = time.monotonic() - stopped_at
        finally:
            process.kill()
            output = process.stdout.read().decode()
        assert process.returncode == 0, output
        assert all(r and r["type"] == "message" for r in replies), (replies, output)
        assert any(code == 1000 for code, _ in up.client_closes()), up.client_closes()
        assert took_s < 10, took_s
        assert "shutting down" in output and "stopped" in output


def test_a_second_signal_exits_at_once(tmp_path):
    with FakeRateApi(latency_s=30) as api, Upstream() as up:
        env = service_env(tmp_path, EXRATE_URL=up.url, EXRATE_PROVIDER="frankfurter",
                          FRANKFURTER_URL=api.frankfurter_url, EXRATE_SHUTDOWN_GRACE="20",
                          EXRATE_HTTP_TIMEOUT="30")
        process = start_service([], env)
        try:
            assert up.wait_for_connections(1, 15)
            up.send_request({"stake": 1, "currency": "USD", "date": "2021-05-18"})
            gevent.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            gevent.sleep(0.3)
            process.send_signal(signal.SIGINT)
            assert wait_until(lambda: process.poll() is not None, 3)
        finally:
            process.kill()
            output = process.stdout.read().decode()
        assert process.returncode == 128 + signal.SIGINT, output
        assert "exiting now" in output


def test_demo_runs_offline_and_reports(tmp_path):
    result = run_service(["demo", "--duration=3", "--rate=30"], service_env(tmp_path), 40)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo summary" in result.stdout
    assert "unanswered            0" in result.stdout
    assert "invalid replies       0" in result.stdout
