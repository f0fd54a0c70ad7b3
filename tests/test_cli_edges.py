"""The rough edges a new user hits first: bad configuration, usage errors, the demo with
every provider, short access keys, the summary's counts, and the help text."""

import shutil
import signal
import subprocess

import pytest

from exrate_green.simulator import FakeRateApi, Upstream

from .support import (
    BIN,
    FAST_BEATS,
    ROOT,
    run_service,
    running_service,
    service_env,
    start_service,
    summary_totals,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


def one_line_on_stderr(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("variables, args, says", [
    ({"EXRATE_URL": "ws://127.0.0.1:99999"}, [], "EXRATE_URL is not a valid URL"),
    ({"EXRATE_URL": "ws://[::1"}, [], "EXRATE_URL is not a valid URL"),
    ({"FRANKFURTER_URL": "http://127.0.0.1:99999/v1"}, [], "FRANKFURTER_URL is not a valid URL"),
    ({"EXCHANGERATE_HOST_URL": "ftp://example.com"}, [], "EXCHANGERATE_HOST_URL must be a "),
    ({}, ["--url=ws://127.0.0.1:0x50"], "--url is not a valid URL"),
    ({"EXRATE_HTTP_TIMEOUT": "-1"}, [], "EXRATE_HTTP_TIMEOUT must be a positive number"),
    ({"EXRATE_SHUTDOWN_GRACE": "0"}, [], "EXRATE_SHUTDOWN_GRACE must be a positive number"),
    ({"EXRATE_HEARTBEAT_INTERVAL": "3"}, [],
     "EXRATE_HEARTBEAT_TIMEOUT (2 s) must be longer than EXRATE_HEARTBEAT_INTERVAL (3 s)"),
    ({"EXRATE_MAX_IN_FLIGHT": "0"}, [], "EXRATE_MAX_IN_FLIGHT must be at least 1"),
    ({"EXRATE_METRICS_PORT": "70000"}, [], "EXRATE_METRICS_PORT must be a port number"),
    ({"LOG_LEVEL": "LOUD"}, [], "LOG_LEVEL: unknown log level 'LOUD'"),
    ({}, ["--provider=fixer"], "--provider: unknown provider 'fixer'"),
])
def test_bad_configuration_is_one_line_naming_the_variable_and_exit_2(
        tmp_path, variables, args, says):
    result = run_service(args, service_env(tmp_path, **variables))
    assert result.returncode == 2, result.stderr
    line = one_line_on_stderr(result)
    assert says in line
    assert "Traceback" not in line and "_s " not in line  # never an internal field name


@pytest.mark.parametrize("level", ["warn", "Warning", "fatal", "debug"])
def test_log_level_accepts_the_spellings_logging_accepts(tmp_path, level):
    result = run_service(["convert", "1", "USD", "2021-05-18"],
                         service_env(tmp_path, LOG_LEVEL=level))
    assert result.returncode == 0, result.stderr
    flag = run_service([f"--log-level={level}", "convert", "1", "USD", "2021-05-18"],
                       service_env(tmp_path))
    assert flag.returncode == 0, flag.stderr


@pytest.mark.parametrize("args, says", [
    (["convert", "5"], "convert needs AMOUNT and CURRENCY"),
    (["cache", "show"], "cache show needs a DAY"),
    (["cache", "foo"], "unknown cache action 'foo'"),
    (["cache"], "cache needs an action"),
    (["--bogus"], "unknown option '--bogus'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["--url"], "--url needs a value"),
    (["cache", "list", "--rate=5"], "--rate is not an option of 'cache'"),
    (["--report=x.json"], "--report is not an option of the service itself"),
    (["simulate", "--json"], "--json is not an option of 'simulate'"),
])
def test_a_usage_error_is_one_line_with_a_pointer_to_help_and_exit_2(tmp_path, args, says):
    result = run_service(args, service_env(tmp_path))
    assert result.returncode == 2
    line = one_line_on_stderr(result)
    assert says in line and "--help" in line
    assert "Warning" not in line and "Usage" not in line and "Argument(" not in line


def test_help_lists_every_exit_code(tmp_path):
    shown = run_service(["--help"], service_env(tmp_path)).stdout
    codes = shown.split("Exit codes:", 1)[1]
    for code, meaning in [("0", "done"), ("1", "failed"), ("2", "bad usage"),
                          ("3", "stalled"), ("128+N", "second signal")]:
        assert any(line.split()[:1] == [code] and meaning in line
                   for line in codes.splitlines()), (code, codes)


def test_the_demo_runs_with_exchangerate_host_and_no_key_of_the_users(tmp_path):
    result = run_service(["demo", "--provider=exchangerate.host", "--duration=2", "--rate=30"],
                         service_env(tmp_path), 40)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo summary (provider exchangerate.host)" in result.stdout
    assert "unanswered            0" in result.stdout
    assert "demo-access-key" not in result.stdout + result.stderr  # still a secret


@pytest.mark.parametrize("key", ["e", "x", "ra"])
def test_a_short_access_key_is_masked_without_mangling_log_lines(tmp_path, key):
    with FakeRateApi() as api:
        env = service_env(tmp_path, EXCHANGE_ACCESS_KEY=key, LOG_LEVEL="DEBUG",
                          EXCHANGERATE_HOST_URL=api.exchangerate_host_url)
        result = run_service(["convert", "100", "USD", "2021-05-18"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "access_key=***" in output  # urllib3's DEBUG line of the request, masked
    assert f"access_key={key}" not in output
    assert "***" not in output.replace("access_key=***", "")  # nothing else masked
    for line in output.splitlines():
        if " DEBUG " in line or " INFO " in line:
            assert line.split()[2].startswith(("exrate_green", "urllib3")), line


def test_the_summary_counts_failed_connects_and_shows_no_latency_without_traffic(tmp_path):
    process = start_service([], service_env(tmp_path, EXRATE_URL="ws://127.0.0.1:9/"))
    try:
        wait_until(lambda: process.poll() is not None, 2.5)  # a few attempts, with backoff
        process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: process.poll() is not None, 15)
    finally:
        process.kill()
        output = process.stdout.read().decode()
    assert process.returncode == 0, output
    fields = summary_totals(output)
    failures = output.count("connect failed")
    assert failures >= 2
    assert fields["connect_attempts"] == fields["connect_failures"] == failures
    assert fields["connects"] == 0
    assert "p50_ms" not in fields and "p99_ms" not in fields  # no reply: no latency figure


def test_a_request_with_a_bad_payload_is_counted_as_a_request(tmp_path):
    with Upstream(heartbeat_interval_s=0.2) as up, \
            running_service(up.url, tmp_path, **FAST_BEATS) as service:
        assert up.wait_for_connections(1, 5)
        up.send_raw('{"type":"message","id":41,"payload":{"stake":"lots"}}')
        up.send_raw('{"type":"message","id":42,"payload":[]}')
        good = up.send_request({"marketId": 1, "selectionId": 2, "odds": 2.5, "stake": 10,
                                "currency": "USD", "date": "2021-05-18T12:00:00.000Z"})
        assert up.wait_for_reply(good, 5)
        assert wait_until(lambda: service.stats.replies == 3, 5)
        line = service.summary_line()
    assert service.stats.requests == 3 and service.stats.errors == 2
    fields = summary_totals("summary: " + line)
    assert (fields["requests"], fields["replies"], fields["errors"]) == (3, 3, 2)
    assert fields["errors.invalid_request"] == 2


@pytest.mark.skipif(subprocess.run(["/usr/bin/python3", "-c", "import gevent"],
                                   capture_output=True).returncode == 0
                    if shutil.which("/usr/bin/python3") else True,
                    reason="needs a system python3 without gevent")
def test_bin_without_the_venv_says_what_to_do_in_one_line(tmp_path):
    result = subprocess.run(["/usr/bin/python3", str(BIN), "--help"], cwd=str(ROOT),
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    line = one_line_on_stderr(result)
    assert "'gevent' not found" in line and "pip install ." in line and "activate" in line
