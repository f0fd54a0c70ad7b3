"""Link faults, 30 cycles of each kind, with requests flowing (docs/design.md 2).

The service runs in this process against the simulator, with heartbeats every 50 ms and
a 250 ms watchdog (production: 1 s / 2 s) so that thirty silent stalls fit in seconds.
The simulator sends 300 requests/s on whichever connection is up, with dates over 18
months, and the rates come from the fake Frankfurter API with 30 ms of latency: at any
moment some conversions wait for a rate, so a fault catches replies in flight. Each cycle
lets traffic flow for 10-40 ms, injects one fault, waits for the service to reconnect,
and proves the new link serves (a probe request answered on it). After the cycles:

* every cycle recovered, each within its bound (figures printed: ``pytest -n 0 -s``);
* live greenlets (counted in ``gc.get_objects()``) and open file descriptors are back to
  their baseline: nothing leaks per connection;
* every request the service received was answered exactly once: replies written plus
  replies dropped (counted, and zero here: every reconnect is far inside the 30 s window)
  equal requests received; the simulator saw no duplicate and no reply to an unknown id;
  requests it sent that went unanswered are only those the dying TCP connections swallowed
  (sent as the link died, or answered into a socket the simulator had already closed),
  a handful, accounted for below;
* there never were two connections at once.
"""

import datetime
import gc
import random
import time

import gevent
import greenlet
import psutil
import pytest

from exrate_green.simulator import FakeRateApi, Upstream

from .support import running_service, wait_until

pytestmark = pytest.mark.faults

# 30 cycles of each kind: each cycle is one independent fault with requests in flight, and
# what the cycles prove scales with the count: a greenlet or descriptor leaked per
# connection shows as 30 over the baseline, a reply lost or doubled per fault as 30 in the
# accounting, a slow recovery in any one cycle fails the bound. A hundred (before) proved
# the same at three times the cost (~75 s of the suite on 2 cores).
CYCLES = 30
BEAT_S, TIMEOUT_S = 0.05, 0.25
FAST = {"heartbeat_interval_s": BEAT_S, "heartbeat_timeout_s": TIMEOUT_S}
RATE = 300  # requests per second from the simulator
API_LATENCY_S = 0.03


def live_greenlets():
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead)


def open_fds():
    return psutil.Process().num_fds()


def pct(samples, p):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class Cycler:
    """Drives fault cycles against one service and keeps the numbers."""

    def __init__(self, up, service):
        self.up, self.service = up, service
        self.recovery_s, self.detect_s, self.silence_s, self.parked_s = [], [], [], []
        self.rng = random.Random(5)

    def flow(self):
        """Let requests flow on the current link for a while before the next fault."""
        gevent.sleep(self.rng.uniform(0.01, 0.04))

    def serving(self):
        return (self.service.session is not None and self.service.session.heartbeats_received > 0)

    def settle(self):
        assert wait_until(self.serving, 5), "no heartbeat on the first connection"
        # Grow the HTTP pool to its bound (16 kept connections) before the baseline, so
        # that file descriptors measure leaks, not the pool filling up.
        first = datetime.date(2020, 1, 1)
        jobs = [gevent.spawn(self.service.book.get, first + datetime.timedelta(days=i))
                for i in range(40)]
        gevent.joinall(jobs, timeout=10, raise_error=True)
        gevent.sleep(0.5)

    def quiesce(self):
        """No requests, none in flight: the state the baseline and the end are measured in."""
        self.up.pause_requests()
        service = self.service
        assert wait_until(lambda: not service.dispatch.waiting and not service.delivery.kept, 5)
        gevent.sleep(0.3)  # the last replies reach the simulator, idle greenlets end
        gc.collect()

    def wait_reconnected(self, accepted_before, old_session, t0, timeout_s=5):
        """Wait for the next accepted connection, then prove it serves with a probe."""
        assert self.up.wait_until(lambda: self.up.connections > accepted_before, timeout_s), \
            f"no reconnect after {timeout_s} s (cycle {len(self.recovery_s) + 1})"
        assert wait_until(lambda: self.service.session is not old_session and self.serving(),
                          timeout_s, interval_s=0.002)
        rid = self.up.send_request()
        reply = self.up.wait_for_reply(rid, 5)
        assert reply is not None and reply["id"] == rid, f"probe {rid} unanswered"
        self.recovery_s.append(time.monotonic() - t0)

    def wait_session_ended(self, session, timeout_s):
        assert wait_until(lambda: self.service.session is not session, timeout_s, interval_s=0.002)


def inject_abrupt(c):
    session, accepted, t0 = c.service.session, c.up.connections, time.monotonic()
    assert c.up.drop() == 1
    c.wait_reconnected(accepted, session, t0)


def inject_stall(c):
    session, accepted, t0 = c.service.session, c.up.connections, time.monotonic()
    c.up.pause_heartbeats()  # the socket stays open; only heartbeats stop
    try:
        c.wait_session_ended(session, 3)
        ended = time.monotonic()
        c.detect_s.append(ended - t0)
        c.silence_s.append(ended - session.last_heartbeat_at)  # same clock: time.monotonic
        c.parked_s.append(session.sock.silent_s())  # the silence the watchdog counts
    finally:
        c.up.resume_heartbeats()
    c.wait_reconnected(accepted, session, t0)


def make_close(code):
    def inject_close(c):
        session, accepted, t0 = c.service.session, c.up.connections, time.monotonic()
        assert c.up.close(code, "fault test") == 1
        c.wait_reconnected(accepted, session, t0)
    return inject_close


def make_refused(down_s):
    def inject_refused(c):
        session, accepted = c.service.session, c.up.connections
        c.up.refuse_connections()  # the port closes: connecting fails with ECONNREFUSED
        c.up.drop()
        t_down = time.monotonic()
        c.wait_session_ended(session, 3)
        gevent.sleep(max(0.0, down_s - (time.monotonic() - t_down)))
        t0 = time.monotonic()
        c.up.accept_connections()
        c.wait_reconnected(accepted, session, t0, timeout_s=15)
    return inject_refused


def run_cycles(tmp_path, inject, cycles, bound_s, **overrides):
    with FakeRateApi(latency_s=API_LATENCY_S) as api, \
            Upstream(heartbeat_interval_s=BEAT_S, request_rate=RATE, seed=11) as up, \
            running_service(up.url, tmp_path, provider="frankfurter",
                            frankfurter_url=api.frankfurter_url,
                            **{**FAST, **overrides}) as service:
        c = Cycler(up, service)
        c.settle()
        c.quiesce()
        greenlets_before, fds_before = live_greenlets(), open_fds()
        up.resume_requests()
        started = time.monotonic()
        for _ in range(cycles):
            if inject is not inject_stall:  # a stall lets requests flow for 250 ms anyway
                c.flow()
            inject(c)
        elapsed = time.monotonic() - started

        c.quiesce()
        c.closes = up.client_closes()
        assert wait_until(lambda: live_greenlets() <= greenlets_before, 3), \
            (live_greenlets(), greenlets_before)
        assert wait_until(lambda: open_fds() <= fds_before, 3), (open_fds(), fds_before)
        greenlets_after, fds_after = live_greenlets(), open_fds()

        r, s = up.report(), service.stats
        assert len(c.recovery_s) == cycles
        assert max(c.recovery_s) < bound_s, sorted(c.recovery_s)[-5:]
        assert s.reconnects == cycles and r["connections"] == cycles + 1
        assert r["max_connected"] == 1, "two connections at once"
        # every request received was answered exactly once (or counted as dropped)
        assert s.dropped == 0 and not service.delivery.kept
        assert s.requests == s.replies + s.dropped, (s.requests, s.replies, s.dropped)
        assert r["duplicates"] == 0 and r["invalid"] == 0, r["problems"]
        never_received = r["requests"] - s.requests
        lost_replies = s.replies - r["replies"]
        assert never_received >= 0 and lost_replies >= 0
        assert r["unanswered"] == never_received + lost_replies
        assert r["unanswered"] <= 3 * cycles, r  # a few per cycle at most, at 300 req/s
        figures = {
            "cycles": cycles, "elapsed_s": round(elapsed, 1),
            "recovery_p50_ms": round(pct(c.recovery_s, 0.5) * 1000, 1),
            "recovery_max_ms": round(max(c.recovery_s) * 1000, 1),
            "requests": r["requests"], "received": s.requests, "answered": r["replies"],
            "rate_api_calls": api.calls,
            "redelivered": s.redelivered, "dropped": s.dropped,
            "lost_in_dying_tcp": r["unanswered"], "never_received": never_received,
            "written_into_dead_socket": lost_replies,
            "greenlets": f"{greenlets_before}->{greenlets_after}",
            "fds": f"{fds_before}->{fds_after}",
        }
        if c.detect_s:
            figures["detect_p50_ms"] = round(pct(c.detect_s, 0.5) * 1000, 1)
            figures["detect_max_ms"] = round(max(c.detect_s) * 1000, 1)
            figures["parked_at_abandon_ms"] = (f"{min(c.parked_s) * 1000:.0f}-"
                                               f"{max(c.parked_s) * 1000:.0f}")
            figures["silence_at_abandon_ms"] = (f"{min(c.silence_s) * 1000:.0f}-"
                                                f"{max(c.silence_s) * 1000:.0f}")
        print(f"\nFIGURES {inject.__name__}: {figures}")
        return c


@pytest.mark.timeout(60)
def test_abrupt_disconnects(tmp_path):
    run_cycles(tmp_path, inject_abrupt, CYCLES, bound_s=1.0)


@pytest.mark.timeout(90)
def test_silent_stalls_are_detected_by_the_watchdog(tmp_path):
    c = run_cycles(tmp_path, inject_stall, CYCLES, bound_s=1.5)
    # Abandoned once the upstream was silent for more than the timeout, never before (an
    # exact bound: the watchdog's own rule), and well before a second timeout would have
    # run out (a watchdog that missed its check, counted two timeouts or only fired on the
    # socket's close would show 500 ms or more). The slack up to 2x is the checker's
    # scheduling on a busy 2-core machine, which moves a check by tens of ms, sometimes
    # more; a tighter bound (+100 ms) measured the machine, not the watchdog. Silence is
    # the time the reader was free to read (parked on an empty socket:
    # docs/congestion.md); the wall-clock gap also holds the reader's own work on the
    # requests that kept coming meanwhile, which in this process shares the hub with the
    # simulator and the rate API.
    assert min(c.parked_s) > TIMEOUT_S, sorted(c.parked_s)[:5]
    assert max(c.parked_s) < 2 * TIMEOUT_S, sorted(c.parked_s)[-5:]
    assert min(c.silence_s) > TIMEOUT_S, sorted(c.silence_s)[:5]
    assert max(c.silence_s) < 2 * TIMEOUT_S, sorted(c.silence_s)[-5:]
    assert max(c.detect_s) < 2 * TIMEOUT_S + BEAT_S, sorted(c.detect_s)[-5:]


@pytest.mark.parametrize("code", [1000, 1001, 1011])
@pytest.mark.timeout(60)
def test_close_frames(tmp_path, code):
    with_code = make_close(code)
    with_code.__name__ = f"inject_close_{code}"
    c = run_cycles(tmp_path, with_code, CYCLES, bound_s=1.0)
    answered = [closed for closed, _ in c.closes if closed == code]
    assert len(answered) == CYCLES  # the closing handshake was answered every time


@pytest.mark.timeout(120)
def test_refused_while_the_upstream_is_down_briefly(tmp_path):
    # Down for 0.1 s, thirty times: the first retry is immediate and fails, so each
    # recovery waits out one backoff step (0.125-0.25 s) or two.
    inject = make_refused(0.1)
    inject.__name__ = "inject_refused_100ms"
    run_cycles(tmp_path, inject, CYCLES, bound_s=1.5)


@pytest.mark.timeout(120)
def test_refused_while_the_upstream_is_down_for_5_s(tmp_path):
    # Scaled down to 2 cycles (each costs 5 s of outage and up to 8 s of backoff). With the
    # production backoff cap (10 s), the retry after the outage comes within the step in
    # force: at most 8 s. The second outage repeats it after a success in between (the
    # backoff starting over); a third (before) added no new case for another ~8 s.
    inject = make_refused(5.0)
    inject.__name__ = "inject_refused_5s"
    run_cycles(tmp_path, inject, 2, bound_s=8.5)


@pytest.mark.timeout(30)
def test_requests_just_ahead_of_a_close_frame_are_answered(tmp_path):
    # The simulator writes three requests and its close frame back to back, so the service
    # reads all four in one batch: the requests came while the link was up and must be
    # answered (before the service's own close frame), not lost with the batch.
    with Upstream(heartbeat_interval_s=BEAT_S) as up, \
            running_service(up.url, tmp_path, **FAST) as service:
        assert up.wait_for_connections(1, 5)
        assert wait_until(lambda: service.session and service.session.heartbeats_received, 3)
        for _ in range(5):
            accepted = up.connections
            ids = [up.send_request() for _ in range(3)]
            assert up.close(1000, "bye") == 1  # no yield in between: one batch
            assert up.wait_for_connections(accepted + 1, 3)
            for rid in ids:
                reply = up.wait_for_reply(rid, 3)
                assert reply is not None, f"request {rid}, ahead of the close frame, unanswered"
                assert up.sent_on(rid) == accepted
        report = up.report()
        assert report["unanswered"] == 0 and report["duplicates"] == 0, report
