"""Our own congestion is never taken for the upstream's failure (docs/congestion.md).

The upstream here is ``tests/ws_peer.py``, an independent WebSocket server in a
subprocess (plain sockets and native threads, no gevent): it can stop reading its socket
entirely, write a huge backlog in one ``sendall`` with its heartbeats queued behind it,
and cut a connection after taking exactly what its kernel acknowledged. The service runs
in this process (``running_service``) unless the test is about the process itself
(exit codes, signals, the stall watchdog): then ``bin/exrate-service`` runs as a
subprocess. Durations are scaled down from production (heartbeats every 0.1-0.2 s, a
timeout of 0.3-0.6 s) with the ratios that matter kept: a pause or a backlog lasts many
heartbeat timeouts.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

import exrate_green.rates.http  # noqa: F401  imported up front: importing requests is slow
from exrate_green.simulator import FakeRateApi, Upstream

from .support import ServiceProcess, running_service, summary_totals, wait_until

pytestmark = pytest.mark.timeout(120)

PEER = Path(__file__).resolve().parent / "ws_peer.py"


class Peer:
    """``ws_peer.py`` as a subprocess, driven one command at a time."""

    def __init__(self, heartbeat_s):
        self.proc = subprocess.Popen([sys.executable, str(PEER), str(heartbeat_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("PORT "), line
        self.url = f"ws://127.0.0.1:{int(line.split()[1])}"

    def ask(self, command):
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def report(self):
        return self.ask("report")

    def wait_for(self, predicate, timeout_s):
        deadline = time.monotonic() + timeout_s
        report = self.report()
        while not predicate(report) and time.monotonic() < deadline:
            gevent.sleep(0.05)
            report = self.report()
        return report

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_for_back_pressure(peer, timeout_s):
    """Wait until the peer's requests stop going out (its sends block: the service no
    longer reads, its buffers and outbox are full); True if they did within timeout_s.
    Stopped means no request sent for 0.5 s while the peer's rate asks for one every 10 ms."""
    deadline = time.monotonic() + timeout_s
    sent = peer.report()["sent"]
    while time.monotonic() < deadline:
        gevent.sleep(0.5)
        now = peer.report()["sent"]
        if now == sent:
            return True
        sent = now
    return False


def all_answered(report):
    return report["unanswered"] == 0 and report["answered"] > 0


def test_a_peer_that_stops_reading_for_seconds_loses_nothing_and_keeps_one_connection(tmp_path):
    with Peer(heartbeat_s=0.2) as peer, running_service(
            peer.url, tmp_path, heartbeat_interval_s=0.2, heartbeat_timeout_s=0.5) as service:
        assert wait_until(lambda: service.session and service.session.heartbeats_received, 5)
        peer.ask("pad 4000")  # 4 KB replies: the socket buffers fill within a second
        peer.ask("rate 600")
        gevent.sleep(1.0)
        peer.ask("stop_reading")
        blocked = []
        deadline = time.monotonic() + 4.0  # 8 heartbeat timeouts without reading us
        while time.monotonic() < deadline:
            session = service.session
            if session is not None:
                blocked.append((session.sock.writing, session.sock.unacked_bytes() or 0,
                                service.delivery.outbox_bytes))
            gevent.sleep(0.05)
        peer.ask("resume_reading")
        gevent.sleep(1.0)
        peer.ask("rate 0")
        report = peer.wait_for(all_answered, 20)
    # the scenario happened: our writes blocked with megabytes queued
    assert any(writing for writing, _, _ in blocked)
    assert max(unacked + outbox for _, unacked, outbox in blocked) > 1_000_000
    assert report["connections"] == 1 and service.stats.reconnects == 0, report
    assert report["unanswered"] == 0 and report["duplicates"] == 0, report
    assert service.stats.replies == report["answered"] == service.stats.requests
    print(f"\nFIGURES stopped reading 4 s: {report['answered']} answered, 1 connection, "
          f"max queued {max(u + o for _, u, o in blocked)} bytes, "
          f"back-pressure waits {service.stats.backpressure_waits}")


def test_a_burst_backlog_far_longer_than_the_heartbeat_timeout_keeps_the_link(tmp_path):
    n, timeout_s = 100_000, 0.3
    with Peer(heartbeat_s=0.1) as peer, running_service(
            peer.url, tmp_path, heartbeat_interval_s=0.1, heartbeat_timeout_s=timeout_s) as service:
        assert wait_until(lambda: service.session and service.session.heartbeats_received, 5)
        assert peer.wait_for(lambda r: r["answered"] == 0, 1)  # warm: the day's table
        peer.ask("send 1")
        peer.wait_for(all_answered, 5)
        started = time.monotonic()
        peer.ask(f"send {n}")  # one sendall; the peer's heartbeats queue behind it
        report = peer.wait_for(lambda r: r["answered"] == n + 1, 90)
        took_s = time.monotonic() - started
    assert took_s > 3 * timeout_s, f"the backlog took only {took_s:.2f} s: not a test"
    assert report["connections"] == 1 and service.stats.reconnects == 0, report
    assert report["unanswered"] == 0 and report["duplicates"] == 0, report
    print(f"\nFIGURES burst of {n}: answered in {took_s:.2f} s "
          f"({took_s / timeout_s:.0f} heartbeat timeouts), 1 connection")


def test_an_abrupt_drop_redelivers_what_the_peer_never_acknowledged(tmp_path):
    n = 1500
    with Peer(heartbeat_s=0.2) as peer, running_service(
            peer.url, tmp_path, heartbeat_interval_s=0.2, heartbeat_timeout_s=0.6) as service:
        assert wait_until(lambda: service.session and service.session.heartbeats_received, 5)
        peer.ask("pad 2000")
        peer.ask("stop_reading")
        peer.ask(f"send {n}")  # 3 MB of replies into a peer that reads nothing
        assert wait_until(lambda: service.stats.requests == n, 10), service.stats.requests
        gevent.sleep(0.5)  # what can be written is written
        unacked = service.session.sock.unacked_bytes()
        assert unacked > 500_000, unacked  # the kernel holds a good part of them
        peer.ask("cut")  # takes what its kernel acknowledged, then resets
        peer.ask("resume_reading")  # for the next connection
        report = peer.wait_for(all_answered, 20)
    assert report["connections"] == 2, report
    assert report["unanswered"] == 0, report  # not one reply lost in the dead kernel
    assert report["duplicates"] == 0, report
    # the unacknowledged tail (about 2,200 bytes a reply) came back on the new connection
    assert service.stats.redelivered >= unacked // 2200 - 5, (service.stats.redelivered, unacked)
    print(f"\nFIGURES abrupt drop: {unacked} bytes unacknowledged at the cut, "
          f"{service.stats.redelivered} replies redelivered, 0 lost, "
          f"{report['duplicates']} duplicates")


def test_a_write_without_progress_for_the_send_timeout_abandons_the_link_and_loses_nothing(
        tmp_path):
    n = 2500
    with Peer(heartbeat_s=0.2) as peer, running_service(
            peer.url, tmp_path, heartbeat_interval_s=0.2, heartbeat_timeout_s=0.6,
            send_timeout_s=1.5) as service:
        assert wait_until(lambda: service.session and service.session.heartbeats_received, 5)
        peer.ask("pad 2000")
        peer.ask("stop_reading")
        peer.ask(f"send {n}")  # 5 MB of replies: more than the kernel takes
        assert wait_until(lambda: service.session and service.session.sock.writing, 10)
        blocked_at = time.monotonic()
        first = service.session
        assert wait_until(lambda: service.session is not first, 5)
        abandoned_after = time.monotonic() - blocked_at
        read = service.stats.requests  # the rest died unread in the abandoned socket
        peer.ask("resume_reading")
        report = peer.wait_for(lambda r: r["answered"] >= read, 20)
    assert 1.0 < abandoned_after < 3.0, abandoned_after
    assert report["connections"] >= 2 and read > 1000, (report, read)
    # every request read was answered: nothing written into the stalled link was lost
    assert report["answered"] == read and report["unanswered"] == n - read, (report, read)
    print(f"\nFIGURES send timeout 1.5 s: abandoned {abandoned_after:.2f} s after the write "
          f"blocked; {read} read, {report['answered']} answered, "
          f"{report['duplicates']} duplicates")


def test_back_pressure_on_a_slow_rate_api_never_trips_the_stall_watchdog(tmp_path):
    stall_s = 1.0
    with FakeRateApi(latency_s=3.0) as api, Upstream(
            heartbeat_interval_s=0.2, request_rate=300, seed=9) as up:
        service = ServiceProcess(tmp_path, up.url, EXRATE_PROVIDER="frankfurter",
                          FRANKFURTER_URL=api.frankfurter_url, EXRATE_MAX_IN_FLIGHT=50,
                          EXRATE_STALL_EXIT=stall_s, EXRATE_HTTP_TIMEOUT=10,
                          EXRATE_HEARTBEAT_INTERVAL=0.2, EXRATE_HEARTBEAT_TIMEOUT=0.6)
        try:
            assert up.wait_for_connections(1, 15), service.output
            # six stall periods, each fetch 3 s away: two whole rounds of back-pressure,
            # each three times the stall bound (nine periods proved no more)
            gevent.sleep(6.0)
            alive = service.proc.poll() is None
            report = up.report()
        finally:
            service.kill()
    out = service.output
    assert alive, out[-3000:]
    assert "made no progress" not in out, out[-3000:]
    assert report["replies"] > 50 and report["connections"] == 1, report
    print(f"\nFIGURES back-pressure 6 s, rate API 3 s away, stall_exit_s {stall_s}: alive, "
          f"{report['replies']} replies, {report['connections']} connection")


def test_sigterm_against_a_peer_that_stopped_reading_exits_within_the_grace(tmp_path):
    grace_s, margin_s = 2.0, 1.0
    with Peer(heartbeat_s=0.2) as peer:
        service = ServiceProcess(tmp_path, peer.url, EXRATE_SHUTDOWN_GRACE=grace_s,
                          EXRATE_HEARTBEAT_INTERVAL=0.2, EXRATE_HEARTBEAT_TIMEOUT=0.6)
        try:
            assert peer.wait_for(lambda r: r["connections"] == 1, 15)["connections"] == 1
            peer.ask("pad 4000")
            peer.ask("rate 600")
            gevent.sleep(1.0)
            peer.ask("stop_reading")
            # Our socket buffers and outbox fill until the service stops reading: then the
            # peer's own sends block and its count of requests sent stands still. Waited
            # for (up to 20 s), not assumed after a fixed 2 s a busy machine may not keep.
            assert wait_for_back_pressure(peer, 20), peer.report()
            service.proc.send_signal(signal.SIGTERM)
            code, exit_s = service.wait(grace_s + 10)
            report = peer.report()
        finally:
            service.kill()
    out = service.output
    assert code == 0, out[-3000:]
    assert exit_s < grace_s + margin_s, exit_s
    totals = summary_totals(out)
    requests, replies, delivered, dropped, lost = (int(totals[name]) for name in (
        "requests", "replies", "delivered", "dropped", "possibly_lost"))
    assert dropped + lost > 0, out[-2000:]  # what could not be written or acknowledged
    assert requests == replies + dropped, (requests, replies, dropped)  # each one accounted
    assert report["client_closes"] == [], report  # it read nothing, not even a close frame
    print(f"\nFIGURES SIGTERM, peer not reading: exit 0 after {exit_s:.2f} s (grace "
          f"{grace_s} s); requests {requests}, written {replies}, delivered {delivered}, "
          f"dropped {dropped}, possibly lost {lost}")
