"""/metrics and /healthz scraped while the service runs against the simulator."""

import signal
import socket

import gevent
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from exrate_green.metrics import MetricsServer
from exrate_green.simulator import FakeRateApi, Upstream

from .support import FAST_BEATS, running_service, service_env, start_service, wait_until

pytestmark = pytest.mark.timeout(60)


def scrape(port):
    """{(name, labels as a sorted tuple): value} of every sample /metrics serves."""
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def health(port):
    response = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    return response.status_code, response.json()


def test_the_scraped_figures_match_what_the_simulator_saw(tmp_path):
    with Upstream(request_rate=200, seed=7, heartbeat_interval_s=0.2) as up, \
            running_service(up.url, tmp_path, **FAST_BEATS) as service:
        server = MetricsServer(service, 0, host="127.0.0.1").start()
        try:
            assert wait_until(lambda: up.report()["requests"] >= 300, 15)
            up.send_raw('{"type":"message","id":999999,"payload":{"stake":"x"}}')
            up.pause_requests()
            assert wait_until(lambda: up.report()["unanswered"] == 0, 10)
            report, figures = up.report(), scrape(server.port)
        finally:
            server.stop()
    assert figures[("exrate_requests_total", ())] == report["requests"] + 1
    assert figures[("exrate_replies_total", ())] == report["replies"] + 1
    errors = {labels[0][1]: value for (name, labels), value in figures.items()
              if name == "exrate_error_replies_total"}
    assert sum(errors.values()) == report["error_replies"] + 1
    assert errors["invalid_request"] == 1  # the bad payload above
    assert errors["unsupported_currency"] > 0  # the simulator sends ZWL, UAH, BTC
    assert figures[("exrate_reply_latency_seconds_count", ())] == report["replies"] + 1
    assert figures[("exrate_reply_latency_seconds_bucket", (("le", "+Inf"),))] == \
        report["replies"] + 1
    assert 0 < figures[("exrate_reply_latency_seconds_sum", ())] < report["replies"]
    assert figures[("exrate_connects_total", ())] == report["connections"] == 1
    assert figures[("exrate_connected", ())] == 1
    assert figures[("exrate_heartbeat_age_seconds", ())] < FAST_BEATS["heartbeat_timeout_s"]
    # a heartbeat may be on the wire in either direction when we scrape
    assert abs(figures[("exrate_heartbeats_received_total", ())]
               - report["server_heartbeats"]) <= 1
    assert abs(figures[("exrate_heartbeats_sent_total", ())] - report["client_heartbeats"]) <= 1
    assert figures[("exrate_rate_api_calls_total", (("provider", "ecb"),))] == 0  # bundled
    assert figures[("exrate_cache_hits_total", (("tier", "memory"),))] > 0
    assert figures[("exrate_dropped_replies_total", ())] == 0
    assert figures[("process_resident_memory_bytes", ())] > 0


def test_rate_api_calls_are_counted_by_provider_as_the_api_saw_them(tmp_path):
    with FakeRateApi() as api, Upstream(heartbeat_interval_s=0.2) as up, \
            running_service(up.url, tmp_path, provider="frankfurter",
                            frankfurter_url=api.frankfurter_url, **FAST_BEATS) as service:
        server = MetricsServer(service, 0, host="127.0.0.1").start()
        try:
            assert up.wait_for_connections(1, 5)
            for months in ((3, 4, 5), (5,)):  # then May again: from memory
                ids = [up.send_request({"marketId": 1, "selectionId": 2, "odds": 2.5,
                                        "stake": 10, "currency": "USD",
                                        "date": f"2021-0{month}-18"}) for month in months]
                assert all(up.wait_for_reply(rid, 10) for rid in ids)
            figures = scrape(server.port)
        finally:
            server.stop()
    assert api.calls >= 1
    assert figures[("exrate_rate_api_calls_total", (("provider", "frankfurter"),))] == api.calls
    hits = figures[("exrate_cache_hits_total", (("tier", "memory"),))]
    assert hits >= 1


def test_a_failing_rate_api_shows_as_failures_error_replies_and_an_open_breaker(tmp_path):
    with FakeRateApi() as api, Upstream(heartbeat_interval_s=0.2) as up, \
            running_service(up.url, tmp_path, provider="frankfurter", http_timeout_s=1.0,
                            frankfurter_url=api.frankfurter_url, **FAST_BEATS) as service:
        api.fail_next(10_000, "500")
        server = MetricsServer(service, 0, host="127.0.0.1").start()
        try:
            assert up.wait_for_connections(1, 5)
            ids = [up.send_request({"marketId": 1, "selectionId": 2, "odds": 2.5, "stake": 10,
                                    "currency": "USD", "date": f"2020-{month:02d}-18"})
                   for month in range(1, 8)]
            replies = [up.wait_for_reply(rid, 15) for rid in ids]
            figures = scrape(server.port)
        finally:
            server.stop()
    assert all(reply and reply["type"] == "error" for reply in replies), replies
    frankfurter = (("provider", "frankfurter"),)
    assert figures[("exrate_rate_api_calls_total", frankfurter)] == api.calls > 0
    assert figures[("exrate_rate_api_failures_total", frankfurter)] >= 5
    assert figures[("exrate_error_replies_total", (("reason", "rate_unavailable"),))] == 7
    open_state = (("provider", "frankfurter"), ("state", "open"))
    assert figures[("exrate_circuit_breaker_state", open_state)] == 1
    closed_state = (("provider", "frankfurter"), ("state", "closed"))
    assert figures[("exrate_circuit_breaker_state", closed_state)] == 0
    assert figures[("exrate_cache_misses_total", (("tier", "disk"),))] >= 1


def test_healthz_is_200_while_connected_and_503_with_a_reason_once_heartbeats_stop(tmp_path):
    with Upstream(heartbeat_interval_s=0.2) as up, \
            running_service(up.url, tmp_path, **FAST_BEATS) as service:
        server = MetricsServer(service, 0, host="127.0.0.1").start()
        try:
            assert wait_until(lambda: health(server.port)[0] == 200, 5)
            status, body = health(server.port)
            assert body["status"] == "ok" and body["connected"] is True
            assert body["heartbeat_age_s"] < FAST_BEATS["heartbeat_timeout_s"]
            up.pause_heartbeats()
            assert wait_until(lambda: health(server.port)[0] == 503, 5)
            status, body = health(server.port)
            assert body["status"] == "unavailable" and "heartbeat" in body["reason"]
            # it stays unhealthy while the upstream is silent, reconnects included
            assert wait_until(lambda: up.connections >= 2, 5)
            samples = []
            for _ in range(10):
                samples.append(health(server.port)[0])
                gevent.sleep(0.1)
            assert set(samples) == {503}, samples
            up.resume_heartbeats()
            assert wait_until(lambda: health(server.port)[0] == 200, 5)
            assert scrape(server.port)[("exrate_reconnects_total", ())] >= 1
        finally:
            server.stop()


def test_healthz_says_why_while_the_upstream_is_down(tmp_path):
    with running_service("ws://127.0.0.1:9/", tmp_path, **FAST_BEATS) as service:
        server = MetricsServer(service, 0, host="127.0.0.1").start()
        try:
            assert wait_until(lambda: service.stats.connect_failures >= 2, 10)
            status, body = health(server.port)
            figures = scrape(server.port)
        finally:
            server.stop()
    assert status == 503 and body["connected"] is False
    assert body["reason"].startswith("not connected (last: connect failed")
    assert figures[("exrate_connect_failures_total", ())] >= 2
    assert figures[("exrate_connect_attempts_total", ())] >= 2
    assert figures[("exrate_connects_total", ())] == 0
    assert ("exrate_heartbeat_age_seconds", ()) not in figures


def test_anything_but_the_two_paths_is_404(tmp_path):
    with running_service("ws://127.0.0.1:9/", tmp_path) as service:
        server = MetricsServer(service, 0, host="127.0.0.1").start()
        try:
            response = requests.get(f"http://127.0.0.1:{server.port}/", timeout=5)
        finally:
            server.stop()
    assert response.status_code == 404


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_ports(pid):
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_the_service_serves_metrics_on_exrate_metrics_port_and_stops_with_it(tmp_path):
    port = free_port()
    with Upstream() as up:
        process = start_service([], service_env(tmp_path, EXRATE_URL=up.url,
                                                EXRATE_METRICS_PORT=port))
        try:
            assert up.wait_for_connections(1, 15)
            assert wait_until(lambda: _healthz_status(port) == 200, 10)
            assert listening_ports(process.pid) == {port}
            process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: process.poll() is not None, 15)
        finally:
            process.kill()
            output = process.stdout.read().decode()
    assert process.returncode == 0, output
    assert f"metrics and health on 0.0.0.0 port {port} (every interface)" in output


def test_without_exrate_metrics_port_nothing_listens(tmp_path):
    with Upstream() as up:
        process = start_service([], service_env(tmp_path, EXRATE_URL=up.url))
        try:
            assert up.wait_for_connections(1, 15)
            assert wait_until(lambda: up.client_heartbeats(), 5)
            assert listening_ports(process.pid) == set()
        finally:
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: process.poll() is not None, 15)
            process.kill()
            process.stdout.read()


def _healthz_status(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code
    except requests.ConnectionError:
        return None
