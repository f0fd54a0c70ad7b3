"""``cache warm`` and ``cache clear`` as an operator uses them: call counts against the fake
rate API, progress on a terminal and in a pipe, and a clear that asks before it wipes the
fleet's Redis. Real servers on 127.0.0.1 (the fake API, redis-server)."""

import datetime
import io
import json
import subprocess
import sys

import pytest

from exrate_green.cache.commands import run_cache_command
from exrate_green.config import Settings
from exrate_green.simulator import FakeRateApi
from exrate_green.warm import run_warm

from .redis_server import RedisServer
from .support import BIN, ROOT, service_env

pytestmark = pytest.mark.timeout(120)

TODAY = datetime.date(2026, 12, 7)


class Terminal(io.StringIO):
    """What a user's terminal is to the command: a text stream that is a TTY."""

    def isatty(self):
        return True


def settings_for(api, tmp_path, **overrides):
    values = {"provider": "frankfurter", "frankfurter_url": api.url + "/v1",
              "exchangerate_host_url": api.url, "cache_dir": tmp_path / "cache",
              "http_timeout_s": 5.0, **overrides}
    return Settings(**values)


def test_warming_three_months_from_frankfurter_takes_one_call_per_month(tmp_path):
    with FakeRateApi() as api:
        settings = settings_for(api, tmp_path)
        out = io.StringIO()
        assert run_warm(settings, "2021-01-01", "2021-03-31", out=out, today=TODAY) == 0
        assert api.calls == 3
        assert api.calls_by_endpoint["frankfurter.range"] == 3
        again = io.StringIO()
        assert run_warm(settings, "2021-01-01", "2021-03-31", out=again, today=TODAY) == 0
        assert api.calls == 3  # all fresh: nothing fetched again
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["[1/3] frankfurter 2021-01: 31 tables written",
                         "[2/3] frankfurter 2021-02: 28 tables written",
                         "[3/3] frankfurter 2021-03: 31 tables written"]
    assert lines[3].startswith("warmed 2021-01-01..2021-03-31: 3 fetched (90 tables written)")
    assert "3 already fresh" in again.getvalue()


def test_warming_a_provider_that_fetches_days_takes_one_call_per_day(tmp_path):
    with FakeRateApi() as api:
        settings = settings_for(api, tmp_path, provider="exchangerate.host", access_key="k")
        out = io.StringIO()
        assert run_warm(settings, "2021-05-10", "2021-05-14", out=out, as_json=True,
                        today=TODAY) == 0
        assert api.calls == 5
    summary = json.loads(out.getvalue())
    assert summary["fetched"] == 5 and summary["tables"] == 5 and summary["failed"] == 0


def test_warming_ecb_days_in_the_bundled_history_fetches_nothing(tmp_path):
    with FakeRateApi() as api:
        settings = settings_for(api, tmp_path, provider="ecb")
        out = io.StringIO()
        assert run_warm(settings, "2021-01-01", "2021-12-31", out=out, as_json=True,
                        today=TODAY) == 0
        assert api.calls == 0
    summary = json.loads(out.getvalue())
    assert summary["units"] == 0 and summary["bundled_days"] == 365


def test_warming_on_a_terminal_draws_a_progress_bar_in_place(tmp_path):
    with FakeRateApi() as api:
        out = Terminal()
        assert run_warm(settings_for(api, tmp_path), "2021-01-01", "2021-02-28", out=out,
                        today=TODAY) == 0
    text = out.getvalue()
    assert text.count("\r\x1b[K[") == 2 and "[" + "#" * 30 + "] 2/2" in text
    assert text.splitlines()[-1].startswith("warmed 2021-01-01..2021-02-28")


def test_a_failing_rate_api_fails_the_warm_run_but_keeps_what_it_fetched(tmp_path):
    with FakeRateApi() as api:
        api.fail_next(100, "500")
        out = io.StringIO()
        code = run_warm(settings_for(api, tmp_path, http_timeout_s=1.0), "2021-01-01",
                        "2021-01-31", out=out, today=TODAY)
    assert code == 1 and "failed:" in out.getvalue() and "1 failed" in out.getvalue()


@pytest.mark.parametrize("start, end, says", [
    ("2021-02-01", "2021-01-01", "END (2021-01-01) is before START (2021-02-01)"),
    ("2021-01-01", "2030-01-01", "is after today"),
    ("yesterday", "2021-01-01", "START and END must be days (YYYY-MM-DD)"),
])
def test_a_bad_window_is_one_line_and_exit_2(tmp_path, start, end, says):
    result = subprocess.run([sys.executable, str(BIN), "cache", "warm", start, end],
                            env=service_env(tmp_path), cwd=str(ROOT), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr


def test_warm_in_a_pipe_prints_plain_lines(tmp_path):
    with FakeRateApi() as api:
        env = service_env(tmp_path, EXRATE_PROVIDER="frankfurter",
                          FRANKFURTER_URL=api.url + "/v1")
        result = subprocess.run([sys.executable, str(BIN), "cache", "warm", "2021-01-01",
                                 "2021-02-28"], env=env, cwd=str(ROOT), capture_output=True,
                                text=True, timeout=60)
        assert api.calls == 2
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    assert result.stdout.splitlines()[0] == "[1/2] frankfurter 2021-01: 31 tables written"


def _tiers_listed(settings):
    out = io.StringIO()
    assert run_cache_command(settings, "list", as_json=True, out=out) == 0
    return sorted({row["tier"] for row in json.loads(out.getvalue())})


def test_cache_clear_asks_before_deleting_redis_keys_and_takes_tier_and_yes(tmp_path, capsys):
    with RedisServer(tmp_path) as redis, FakeRateApi() as api:
        settings = settings_for(api, tmp_path, redis_url=redis.url)
        assert run_warm(settings, "2021-01-01", "2021-01-31", out=io.StringIO(),
                        today=TODAY) == 0
        assert _tiers_listed(settings) == ["disk", "redis"]
        # not a terminal, no --yes: refused, nothing deleted
        assert run_cache_command(settings, "clear", out=io.StringIO(),
                                 answer=io.StringIO("y\n")) == 2
        assert "confirm with --yes" in capsys.readouterr().err
        assert _tiers_listed(settings) == ["disk", "redis"]
        # a terminal that says no
        assert run_cache_command(settings, "clear", out=io.StringIO(),
                                 answer=Terminal("n\n")) == 2
        assert _tiers_listed(settings) == ["disk", "redis"]
        # this machine's disk only: no question
        out = io.StringIO()
        assert run_cache_command(settings, "clear", tier="disk", out=out) == 0
        assert out.getvalue() == "disk: removed 31 cached tables\n"
        assert _tiers_listed(settings) == ["redis"]
        # a terminal that says yes
        out = io.StringIO()
        assert run_cache_command(settings, "clear", out=out, answer=Terminal("yes\n")) == 0
        assert "redis: removed 31 cached tables" in out.getvalue()
        assert _tiers_listed(settings) == []


def test_cache_clear_yes_deletes_redis_keys_without_asking(tmp_path):
    with RedisServer(tmp_path) as redis, FakeRateApi() as api:
        env = service_env(tmp_path, EXRATE_PROVIDER="frankfurter", REDIS_URL=redis.url,
                          FRANKFURTER_URL=api.url + "/v1")
        run = [sys.executable, str(BIN), "cache"]
        warmed = subprocess.run(run + ["warm", "2021-01-01", "2021-01-31"], env=env,
                                cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        assert warmed.returncode == 0, warmed.stderr
        refused = subprocess.run(run + ["clear"], env=env, cwd=str(ROOT), text=True,
                                 capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert refused.returncode == 2 and "--yes" in refused.stderr
        cleared = subprocess.run(run + ["clear", "--tier=redis", "--yes"], env=env,
                                 cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout == "redis: removed 31 cached tables\n"
