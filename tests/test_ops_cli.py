"""Operating the command line without surprises (issue 16): one-line errors in every
command, options a command does not use, one-shot output through pipes, JSON logs a drain
can parse, and hostile text through --show-messages. Real subprocesses throughout."""

import json
import re
import signal
import socket
import subprocess
import sys

import gevent
import pytest

from exrate_green.config import VARIABLES, Settings
from exrate_green.errors import ConfigError
from exrate_green.simulator import Upstream

from .support import BIN, ROOT, run_service, service_env, start_service

pytestmark = pytest.mark.timeout(120)

COMMANDS = {"run": [], "demo": ["demo", "--duration=1"], "cache": ["cache", "list"],
            "convert": ["convert", "1", "USD", "2021-05-18"],
            "simulate": ["simulate", "--duration=1"]}
TIMESTAMP = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
FORGED = "x\u2028CRITICAL exrate_green: forged\u0085ERROR a: b\u009b31m\rINFO c: d\ne"


def one_line_on_stderr(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("variable, value, says", [
    ("EXRATE_CACHE_TTL", "abc", "EXRATE_CACHE_TTL must be a positive number of seconds, got 'abc'"),
    ("EXRATE_SHOW_MESSAGES", "maybe",
     "EXRATE_SHOW_MESSAGES must be 1/0, true/false, yes/no or on/off, got 'maybe'"),
    ("EXRATE_REDIS_VERIFY", "maybe", "EXRATE_REDIS_VERIFY must be 1/0, true/false"),
    ("REDIS_URL", "http://127.0.0.1:6379",
     "REDIS_URL must be a redis://, rediss:// or unix:// URL, got 'http://127.0.0.1:6379'"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT must be text or json, got 'xml'"),
    ("EXRATE_METRICS_PORT", "http", "EXRATE_METRICS_PORT must be a port number (0-65535)"),
])
def test_every_command_refuses_a_bad_value_in_one_line_naming_the_variable_with_exit_2(
        tmp_path, command, variable, value, says):
    result = run_service(COMMANDS[command], service_env(tmp_path, **{variable: value}))
    assert result.returncode == 2, result.stderr
    line = one_line_on_stderr(result)
    assert says in line and "Traceback" not in line and "README.md" in line


def test_a_password_in_a_bad_redis_url_never_shows(tmp_path):
    result = run_service(["convert", "1", "USD"],
                         service_env(tmp_path, REDIS_URL="redis://user:hunter2pass@"))
    assert result.returncode == 2
    assert "hunter2pass" not in one_line_on_stderr(result)


@pytest.mark.parametrize("word, meaning", [
    ("1", True), ("TRUE", True), ("Yes", True), ("on", True),
    ("0", False), ("false", False), ("NO", False), ("Off", False)])
def test_booleans_take_exactly_the_eight_words_in_any_case(word, meaning):
    settings = Settings.load({"EXRATE_SHOW_MESSAGES": word, "EXRATE_REDIS_VERIFY": word})
    assert settings.show_messages is meaning and settings.redis_verify is meaning


@pytest.mark.parametrize("word", ["maybe", "2", "y", "enabled", "truee"])
def test_any_other_boolean_is_refused(word):
    with pytest.raises(ConfigError, match="must be 1/0, true/false, yes/no or on/off"):
        Settings.load({"EXRATE_REDIS_VERIFY": word})


@pytest.mark.parametrize("args, says", [
    (["demo", "--url=ws://127.0.0.1:1"], "--url is not an option of 'demo' (the demo is sealed"),
    (["demo", "--cache-dir=/tmp/x"], "--cache-dir is not an option of 'demo'"),
    (["convert", "1", "USD", "--url=ws://127.0.0.1:1"], "--url is not an option of 'convert'"),
    (["convert", "1", "USD", "--show-messages"], "--show-messages is not an option of 'convert'"),
    (["cache", "list", "--show-messages"], "--show-messages is not an option of 'cache'"),
    (["cache", "list", "--yes"], "--yes is an option of 'cache clear' only"),
    (["cache", "stats", "--tier=disk"], "--tier is an option of 'cache clear' only"),
    (["--json"], "--json is not an option of the service itself"),
    (["simulate", "--provider=ecb"], "--provider is not an option of 'simulate'"),
])
def test_a_command_refuses_an_option_it_does_not_use(tmp_path, args, says):
    result = run_service(args, service_env(tmp_path))
    assert result.returncode == 2
    line = one_line_on_stderr(result)
    assert says in line and "--help" in line


def test_a_taken_metrics_port_is_one_line_and_exit_2_before_connecting(tmp_path):
    with socket.socket() as taken, Upstream() as up:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_service([], service_env(tmp_path, EXRATE_URL=up.url,
                                             EXRATE_METRICS_HOST="127.0.0.1",
                                             EXRATE_METRICS_PORT=port))
        assert up.report()["connections"] == 0  # never connected
    assert result.returncode == 2
    line = one_line_on_stderr(result)
    assert f"EXRATE_METRICS_PORT={port}" in line and "cannot listen" in line
    assert "summary" not in line


def test_convert_prints_only_its_answer_on_stdout_and_logs_on_stderr(tmp_path):
    result = run_service(["convert", "253.67", "USD", "2021-05-18"], service_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "253.67 USD = 207.55196 EUR on 2021-05-18 (rate 1.2222 USD/EUR, ecb publication "
        "of 2021-05-18)"]
    assert "rate cache: disk at" in result.stderr


def test_convert_json_prints_one_object_with_exact_numbers(tmp_path):
    result = run_service(["convert", "253.67", "usd", "2021-05-18", "--json"],
                         service_env(tmp_path))
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    answer = json.loads(line, parse_float=str)
    assert answer == {"amount": "253.67", "currency": "USD", "day": "2021-05-18",
                      "stake_eur": "207.55196", "rate": "1.2222", "provider": "ecb",
                      "published": "2021-05-18"}


@pytest.mark.parametrize("args", [["convert", "1", "USD", "2021-05-18"], ["cache", "list"],
                                  ["cache", "stats", "--json"]])
def test_a_closed_pipe_ends_a_one_shot_command_quietly(tmp_path, args):
    proc = subprocess.Popen([sys.executable, str(BIN), *args], env=service_env(tmp_path),
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr


def test_cache_list_through_head_prints_one_line_and_no_traceback(tmp_path):
    run_service(["convert", "1", "USD", "2021-05-18"], service_env(tmp_path))
    result = subprocess.run(f"'{sys.executable}' '{BIN}' cache list | head -1", shell=True,
                            env=service_env(tmp_path), cwd=str(ROOT), capture_output=True,
                            text=True, timeout=60)
    assert len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_help_names_the_main_variables_and_points_to_the_full_table(tmp_path):
    shown = run_service(["--help"], service_env(tmp_path)).stdout
    section = shown.split("Environment:")[1].split("Output:")[0]
    named = set(re.findall(r"\b[A-Z][A-Z_]{4,}\b", section)) & set(VARIABLES.values())
    more = int(re.search(r"and (\d+) more", section).group(1))
    assert len(named) + more == len(VARIABLES)
    assert 'README.md, section "Configuration"' in section
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{variable}`" in readme for variable in VARIABLES.values())


def test_simulate_prints_the_variables_a_client_needs(tmp_path):
    proc = subprocess.Popen([sys.executable, str(BIN), "simulate", "--rate-api=0"],
                            env=service_env(tmp_path), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    hint = lines[1]
    assert re.search(r"EXRATE_URL=ws://127\.0\.0\.1:\d+", hint), lines
    assert re.search(r"FRANKFURTER_URL=http://127\.0\.0\.1:\d+/v1", hint)
    assert re.search(r"EXCHANGERATE_HOST_URL=http://127\.0\.0\.1:\d+", hint)


def _serve_hostile_text(tmp_path, **variables):
    """The service as a process with --show-messages, sent one request whose id carries
    line breakers and one message without an id, then dropped once and stopped; its whole
    output (stdout and stderr)."""
    with Upstream(request_rate=0) as up:
        proc = start_service(["--show-messages"], service_env(
            tmp_path, EXRATE_URL=up.url, EXRATE_HEARTBEAT_INTERVAL="0.2",
            EXRATE_HEARTBEAT_TIMEOUT="0.5", **variables))
        try:
            assert up.wait_for_connections(1, 20)
            rid = up.send_request(id=FORGED)
            assert up.wait_for_reply(rid, 10) is not None
            up.send_raw('{"type":"message","payload":"' + FORGED.replace("\n", "\\n") + '"}')
            up.drop()
            assert up.wait_for_connections(2, 20)
            gevent.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, output
    return output.decode("utf-8")


def test_hostile_text_through_show_messages_never_forges_a_text_line(tmp_path):
    output = _serve_hostile_text(tmp_path)
    lines = output.splitlines()  # splits at U+2028, U+0085 and \r too, as careless readers do
    assert any("send " in line and "\\u2028CRITICAL" in line for line in lines), output
    assert all(TIMESTAMP.match(line) or line.startswith("    ") for line in lines), output
    assert not any("forged" in line and "CRITICAL" in line.split("forged")[0][:40]
                   and TIMESTAMP.match(line) is None for line in lines)


def test_with_log_format_json_every_line_of_the_process_parses_as_one_event(tmp_path):
    output = _serve_hostile_text(tmp_path, LOG_FORMAT="json")
    events = [json.loads(line) for line in output.splitlines()]
    assert len(events) >= 8
    for event in events:
        assert {"timestamp", "level", "logger", "message"} <= set(event)
    sent = [e for e in events if e["logger"] == "exrate_green.messages"
            and e["message"].startswith("send ")]
    assert sent and "x\u2028CRITICAL exrate_green: forged\u0085ERROR" in sent[0]["message"]
    assert any(e["level"] == "WARNING" for e in events)  # the skipped message, the drop


def test_with_log_format_json_errors_on_stderr_are_json_too(tmp_path):
    for args, variables in ((["--bogus"], {}), ([], {"EXRATE_CACHE_TTL": "abc"}),
                            (["convert", "1", "ZWL", "2021-05-18"], {})):
        result = run_service(args, service_env(tmp_path, LOG_FORMAT="json", **variables))
        assert result.returncode != 0
        events = [json.loads(line) for line in result.stderr.splitlines()]
        assert events and events[-1]["level"] == "ERROR", result.stderr


def test_the_readme_module_map_names_every_module_of_the_package():
    readme = (ROOT / "README.md").read_text()
    tree = readme.split("## How it works")[1].split("```")[1]
    package = ROOT / "exrate_green"
    for path in sorted(package.iterdir()):
        if path.suffix == ".py" and path.name != "__init__.py":
            assert path.name in tree, f"{path.name} missing from the README's module map"
        elif path.is_dir() and (path / "__init__.py").exists():
            assert f"{path.name}/" in tree, f"{path.name}/ missing from the README's module map"


def test_the_demo_with_json_logs_writes_only_json_lines(tmp_path):
    result = run_service(["demo", "--duration=2", "--rate=20"],
                         service_env(tmp_path, LOG_FORMAT="json"), timeout_s=60)
    assert result.returncode == 0, result.stdout + result.stderr
    events = [json.loads(line) for line in (result.stdout + result.stderr).splitlines()]
    assert any("demo summary" in event["message"] for event in events)
