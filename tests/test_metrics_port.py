"""The metrics port as something that may be exposed: build info, every error reason from
the start, /healthz with the cache tiers (Redis up and down), and held, slow, malformed and
flooding clients, and a low descriptor limit. Real servers and raw sockets on 127.0.0.1."""

import resource
import signal
import socket
import subprocess
import sys
import time

import gevent
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from exrate_green import __version__
from exrate_green.errors import ERROR_REASONS
from exrate_green.metrics import EXPOSITION_TTL_S, MetricsServer
from exrate_green.metrics_guard import bind_metrics_port, raise_fd_limit
from exrate_green.simulator import FakeRateApi, Upstream

from .redis_server import RedisServer
from .support import BIN, FAST_BEATS, ROOT, running_service, service_env, wait_until

pytestmark = pytest.mark.timeout(90)


def samples(port):
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def healthz(port):
    response = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    return response.status_code, response.json()


def raw_request(port, data, timeout_s=10.0):
    """Send ``data`` on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def served(tmp_path):
    """A service connected to the simulator, and its metrics server with small bounds."""
    with Upstream(request_rate=0, heartbeat_interval_s=0.2) as up, \
            running_service(up.url, tmp_path, **FAST_BEATS) as service:
        server = MetricsServer(service, 0, host="127.0.0.1", max_connections=8,
                               idle_timeout_s=1.0, requests_per_s=20)
        server.start()
        try:
            assert up.wait_for_connections(1, 10)
            yield server
        finally:
            server.stop()


def test_build_info_and_every_error_reason_are_exported_before_any_traffic(served):
    figures = samples(served.port)
    build = [labels for (name, labels) in figures if name == "exrate_build_info"]
    assert len(build) == 1 and ("version", __version__) in build[0]
    for reason in ERROR_REASONS:
        assert figures[("exrate_error_replies_total", (("reason", reason),))] == 0
    assert figures[("exrate_cache_tier_up", (("tier", "disk"),))] == 1


def test_healthz_carries_the_version_and_each_tiers_state(served):
    assert wait_until(lambda: healthz(served.port)[0] == 200, 10)
    status, body = healthz(served.port)
    assert body["status"] == "ok" and body["version"] == __version__
    assert body["tiers"] == {"memory": "ok", "disk": "ok"}


def test_a_dead_redis_shows_as_degraded_on_healthz_and_the_service_still_answers_200(tmp_path):
    with RedisServer(tmp_path) as redis, Upstream(request_rate=0, heartbeat_interval_s=0.2) as up, \
            running_service(up.url, tmp_path / "cache", redis_url=redis.url,
                            **FAST_BEATS) as service:
        server = MetricsServer(service, 0, host="127.0.0.1").start()
        try:
            assert wait_until(lambda: healthz(server.port)[0] == 200, 10)
            assert healthz(server.port)[1]["tiers"]["redis"] == "ok"
            redis.kill()
            # the probe runs at most every 5 s: wait for it to notice
            assert wait_until(lambda: healthz(server.port)[1]["tiers"]["redis"] == "degraded",
                              15, interval_s=0.5)
            status, body = healthz(server.port)
            figures = samples(server.port)
        finally:
            server.stop()
    assert status == 200 and body["status"] == "degraded"
    assert figures[("exrate_cache_tier_up", (("tier", "redis"),))] == 0


def test_held_connections_past_the_bound_cost_the_service_no_descriptor(served):
    pool = served.server.pool
    held = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(40)]
    try:
        most = 0
        for _ in range(50):
            most = max(most, len(pool))
            gevent.sleep(0.01)
        assert most == 8  # the bound, not 40
        # idle ones are closed after the idle timeout: a scrape gets through
        assert samples(served.port)[("exrate_build_info", (("python", sys.version.split()[0]),
                                                           ("version", __version__)))] == 1
    finally:
        for sock in held:
            sock.close()


def test_a_request_head_trickling_in_is_cut_off_at_the_idle_timeout(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        sent, closed = 0, False
        for _ in range(100):  # a header byte every 0.1 s would take 10 s
            try:
                sock.sendall(b"X")
                sent += 1
            except OSError:
                closed = True
                break
            gevent.sleep(0.1)
            sock.setblocking(False)
            try:
                if sock.recv(4096) is not None:
                    closed = True
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
    assert closed and sent < 60


def test_malformed_requests_get_400_and_one_log_line_with_a_count_and_no_traceback(
        served, caplog, capfd):
    headers = b"".join(b"X-%d: y\r\n" % n for n in range(101))
    answers = [raw_request(served.port, b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
               for _ in range(30)]
    answers += [raw_request(served.port, b"\x16\x03\x01 not http at all\r\n\r\n")
                for _ in range(10)]
    assert all(answer.startswith(b"HTTP/1.1 400") for answer in answers)
    assert served.server.malformed.total == 40
    lines = [r for r in caplog.records if "malformed requests" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_a_flood_of_scrapes_computes_the_exposition_about_once_a_second(served):
    app = served.app
    before, started = app.expositions, time.monotonic()
    answered = []

    # 120 scrapes (20 each from 6 clients; 240 before proved the same in twice the time):
    # at the budget's 20/s they take ~6 s, so about 6-8 expositions, where computing one
    # per scrape would make 120.
    def scraper():
        with requests.Session() as session:
            for _ in range(20):
                answered.append(session.get(f"http://127.0.0.1:{served.port}/metrics",
                                            timeout=20).status_code)

    gevent.joinall([gevent.spawn(scraper) for _ in range(6)], timeout=60)
    elapsed_s = time.monotonic() - started
    assert answered.count(200) == 120
    assert app.expositions - before <= elapsed_s / EXPOSITION_TTL_S + 2
    assert served.server.budget.waits > 0  # 120 requests at 20/s: most waited their turn


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one():
    script = ("import resource; from exrate_green.metrics_guard import raise_fd_limit; "
              "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    target = min(hard, 4096)

    def low():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, target))

    result = subprocess.run([sys.executable, "-c", script], cwd=str(ROOT), text=True,
                            capture_output=True, preexec_fn=low, timeout=30)
    assert result.stdout.split() == [str(target), str(target)], result.stderr
    assert raise_fd_limit() >= 256


def test_a_taken_port_raises_oserror_when_bound():
    first = bind_metrics_port("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            bind_metrics_port("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()


def test_under_a_low_descriptor_limit_held_metrics_clients_never_starve_rate_fetches(tmp_path):
    """soft = hard = 256 descriptors, 400 clients held on the metrics port, and traffic
    that needs rate fetches: every request answered, no 'Too many open files'."""
    def low():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with FakeRateApi() as api, Upstream(request_rate=0, heartbeat_interval_s=0.2) as up:
        port = _free_port()
        env = service_env(tmp_path, EXRATE_URL=up.url, EXRATE_METRICS_PORT=port,
                          EXRATE_METRICS_HOST="127.0.0.1", EXRATE_PROVIDER="frankfurter",
                          FRANKFURTER_URL=api.url + "/v1", EXRATE_HEARTBEAT_INTERVAL="0.2",
                          EXRATE_HEARTBEAT_TIMEOUT="0.5")
        proc = subprocess.Popen([sys.executable, str(BIN)], env=env, cwd=str(ROOT),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=low)
        held = []
        try:
            assert up.wait_for_connections(1, 20)
            for _ in range(400):
                try:
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=0.2))
                except OSError:
                    break  # the backlog is full: the kernel refuses, we never see them
            ids = [up.send_request(payload={"marketId": 1, "selectionId": 2, "odds": 2.0,
                                            "stake": 10, "currency": "USD",
                                            "date": f"20{year:02d}-0{month}-15T00:00:00Z"})
                   for year in (10, 12, 14, 16, 18) for month in (1, 3, 5, 7, 9)]
            replies = [up.wait_for_reply(rid, 20) for rid in ids]
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        finally:
            for sock in held:
                sock.close()
            if proc.poll() is None:
                proc.kill()
    text = output.decode()
    assert all(reply is not None and reply.get("type") == "message" for reply in replies), \
        [r for r in replies if not r or r.get("type") != "message"][:3]
    assert "Too many open files" not in text and "Traceback" not in text
    assert api.calls == 25  # one per month asked for


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
