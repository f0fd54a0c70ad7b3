"""deploy/: the alert rules, their unit tests and the dashboard, through a real Prometheus
toolchain (promtool) and against a real scrape of the service."""

import json
import re
import shutil
import subprocess

import pytest
import requests

from exrate_green.metrics import MetricsServer
from exrate_green.simulator import FakeRateApi, Upstream

from .support import FAST_BEATS, ROOT, running_service, wait_until

pytestmark = pytest.mark.timeout(90)

DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")
#: a metric name in a PromQL expression (the service's own and the process collector's)
METRIC = re.compile(r"\b(?:exrate|process)_[a-z_]+\b")


@pytest.fixture(scope="module")
def scrape():
    """The text of one /metrics scrape of the service answering the simulator's traffic
    through the fake rate API (so every family has samples)."""
    import tempfile
    with tempfile.TemporaryDirectory() as cache_dir, FakeRateApi() as api, \
            Upstream(request_rate=100, seed=3, heartbeat_interval_s=0.2) as up, \
            running_service(up.url, cache_dir, provider="frankfurter",
                            frankfurter_url=api.url + "/v1", **FAST_BEATS) as service:
        server = MetricsServer(service, 0, host="127.0.0.1").start()
        try:
            assert wait_until(lambda: up.report()["replies"] >= 50, 20)
            response = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        finally:
            server.stop()
    assert response.status_code == 200
    return response.text


def exported(text):
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def expressions():
    """Every PromQL expression of the rules and of the dashboard's panels."""
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    found = re.findall(r"^\s+expr: (.+)$", rules, re.MULTILINE)
    found += re.findall(r"^\s+expr: \|\n((?:\s{10,}.+\n)+)", rules, re.MULTILINE)
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    found += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return found


def test_every_metric_the_rules_and_the_dashboard_name_is_exported_by_a_real_scrape(scrape):
    named = {name for expr in expressions() for name in METRIC.findall(expr)}
    assert len(named) >= 15  # the reading above found the expressions
    assert named - exported(scrape) == set()


def test_the_dashboard_shows_what_an_operator_needs():
    text = " ".join(expressions())
    for wanted in ("rate(exrate_replies_total", "exrate_error_replies_total",
                   "histogram_quantile(0.99", "exrate_heartbeat_age_seconds",
                   "exrate_connects_total", "exrate_cache_hits_total",
                   "exrate_rate_api_calls_total", "exrate_circuit_breaker_state"):
        assert wanted in text


@needs_promtool
def test_promtool_finds_nothing_to_fix_in_a_real_scrape(scrape):
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


@needs_promtool
def test_every_alert_has_a_passing_promtool_unit_test():
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    tests = (DEPLOY / "prometheus" / "alerts_test.yml").read_text()
    alerts = re.findall(r"- alert: (\w+)", rules)
    assert {"ExrateNoUpstreamHeartbeat", "ExrateReconnectStorm", "ExrateErrorReplyRatioHigh",
            "ExrateRateApiBreakerOpen", "ExrateRepliesPossiblyLost",
            "ExrateRedisDown"} <= set(alerts)
    for alert in alerts:  # each one quiet at one time and firing at another
        assert tests.count(f"alertname: {alert}") >= 2, alert
    result = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"],
                            cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
