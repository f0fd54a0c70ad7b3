"""The currency-assignment simulator, driven by websocket-client as a stand-in service."""

import datetime
import re
import shutil
import ssl
import struct
import subprocess
import time
from decimal import Decimal

import orjson
import pytest
import websocket

from exrate_green.simulator import Upstream
from exrate_green.simulator.traffic import MARKET_SELECTIONS

pytestmark = pytest.mark.timeout(30)

DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
PAYLOAD = {"marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 253.67,
           "currency": "USD", "date": "2021-05-18T21:32:42.324Z"}


def now_z():
    now = datetime.datetime.now(datetime.UTC)
    return f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z"


@pytest.fixture
def upstream():
    with Upstream(heartbeat_interval_s=0.2, seed=7) as up:
        yield up


@pytest.fixture
def client(upstream):
    ws = websocket.create_connection(upstream.url, timeout=2)
    assert upstream.wait_for_connections(1, 2)
    yield ws
    ws.close(timeout=0.2)


def recv_msg(ws, kind="message"):
    """The next JSON frame of type kind, skipping heartbeats."""
    for _ in range(50):
        msg = orjson.loads(ws.recv())
        if msg["type"] == kind:
            return msg
    raise AssertionError(f"no {kind!r} frame")


def good_reply_text(rid, request_payload, stake_text="207.52054", date=None):
    """A correct reply written as text (so the stake's digits are exactly stake_text)."""
    fields = dict(request_payload, currency="EUR", date=date or now_z())
    body = orjson.dumps(fields).decode()
    stake_json = orjson.dumps(request_payload["stake"]).decode()
    body = body.replace(f'"stake":{stake_json}', f'"stake":{stake_text}', 1)
    return f'{{"type":"message","id":{rid},"payload":{body}}}'


# ---------------------------------------------------------------- heartbeats

def test_the_first_heartbeat_is_sent_on_connect():
    # An interval far longer than the wait: a heartbeat arriving at all was sent on
    # connect, not one interval later (no time bound on a busy machine needed).
    with Upstream(heartbeat_interval_s=60.0) as up:
        ws = websocket.create_connection(up.url, timeout=10)
        try:
            assert orjson.loads(ws.recv()) == {"type": "heartbeat"}
        finally:
            ws.close()
        assert up.report()["server_heartbeats"] == 1


def test_heartbeats_arrive_on_cadence(upstream):
    ws = websocket.create_connection(upstream.url, timeout=2)
    stamps = []
    for _ in range(11):
        assert orjson.loads(ws.recv()) == {"type": "heartbeat"}
        stamps.append(time.monotonic())
    ws.close()
    assert upstream.report()["server_heartbeats"] >= 11
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # None skipped (a gap of two intervals, 0.4 s) and none doubled (two frames in one
    # tick, a burst of catch-up beats: gaps of a millisecond). A beat a busy machine made
    # late shortens the next gap by as much (the schedule is absolute), so individual gaps
    # get only these bounds; the cadence is the mean's.
    assert all(0.01 < g < 0.4 for g in gaps), gaps
    # The schedule is drift-free: over ten gaps a late beat is shared out, so the mean
    # stays at the interval; a schedule that slept 0.2 s after each send plus work, or ran
    # at another interval, moves it out of this band.
    assert 0.18 < (stamps[-1] - stamps[0]) / len(gaps) < 0.23, gaps


def test_pause_heartbeats_stops_them_and_resume_restarts(upstream, client):
    recv_msg(client, "heartbeat")
    upstream.pause_heartbeats()
    client.settimeout(0.2)
    try:   # at most one heartbeat may have been in flight
        recv_msg(client, "heartbeat")
    except websocket.WebSocketTimeoutException:
        pass
    client.settimeout(0.6)
    with pytest.raises(websocket.WebSocketTimeoutException):
        client.recv()
    upstream.resume_heartbeats()
    client.settimeout(1)
    assert recv_msg(client, "heartbeat") == {"type": "heartbeat"}


def test_client_heartbeats_are_recorded_with_their_gaps(upstream, client):
    for _ in range(3):
        client.send('{"type":"heartbeat"}')
        time.sleep(0.1)
    assert upstream.wait_until(lambda: len(upstream.client_heartbeats()) == 3, 2)
    stamps = upstream.client_heartbeats()
    assert stamps == sorted(stamps)
    report = upstream.report()
    assert report["client_heartbeats"] == 3
    assert report["invalid"] == 0
    assert 0.05 < report["client_heartbeat_max_gap_s"] < 1.0


# ---------------------------------------------------------------- requests and replies

def test_correct_reply_is_ok_with_latency(upstream, client):
    rid = upstream.send_request(dict(PAYLOAD))
    msg = recv_msg(client)
    assert msg == {"type": "message", "id": rid, "payload": PAYLOAD}
    client.send(good_reply_text(rid, PAYLOAD))
    reply = upstream.wait_for_reply(rid, 2)
    assert reply["payload"]["stake"] == 207.52054
    report = upstream.report()
    assert report["problems"] == []
    assert (report["requests"], report["replies"], report["ok"], report["invalid"],
            report["unanswered"]) == (1, 1, 1, 0, 0)
    assert 0 < report["latency_p50_ms"] == report["latency_max_ms"] < 1000
    assert upstream.sent_on(rid) == 1


def test_error_reply_is_counted_not_invalid(upstream, client):
    rid = upstream.send_request(dict(PAYLOAD, currency="ZWL"))
    recv_msg(client)
    client.send(orjson.dumps({
        "type": "error", "id": rid,
        "message": "Unable to convert stake. Error: unsupported currency 'ZWL'"}))
    assert upstream.wait_for_reply(rid, 2)["type"] == "error"
    report = upstream.report()
    assert (report["error_replies"], report["ok"], report["invalid"]) == (1, 0, 0)
    assert report["error_reasons"] == {"unsupported currency 'ZWL'": 1}


def test_unanswered_requests_are_reported(upstream, client):
    rids = [upstream.send_request() for _ in range(3)]
    assert rids == sorted(rids) and len(set(rids)) == 3
    assert upstream.wait_for_reply(rids[0], 0.2) is None
    assert upstream.report()["unanswered"] == 3


BAD_REPLIES = {
    "changed field": (lambda rid: good_reply_text(rid, dict(PAYLOAD, odds=2.3)), "'odds' changed"),
    "integer odds": (lambda rid: good_reply_text(rid, dict(PAYLOAD, odds=2)), "'odds' changed"),
    "missing field": (lambda rid: good_reply_text(rid, {k: v for k, v in PAYLOAD.items()
                                                        if k != "marketId"}), "'marketId' missing"),
    "six decimals": (lambda rid: good_reply_text(rid, PAYLOAD, stake_text="207.520541"),
                     "more than 5 decimals"),
    "stake as string": (lambda rid: good_reply_text(rid, PAYLOAD, stake_text='"207.52"'),
                        "not a JSON number"),
    "not EUR": (lambda rid: good_reply_text(rid, PAYLOAD).replace('"EUR"', '"USD"'), "not 'EUR'"),
    "bad date": (lambda rid: good_reply_text(rid, PAYLOAD, date="2021-05-18 21:32:42"),
                 "is not YYYY-MM-DD"),
    "request date echoed": (lambda rid: good_reply_text(rid, PAYLOAD, date=PAYLOAD["date"]),
                            "not the reply time"),
    "unknown id": (lambda rid: good_reply_text(rid + 1000, PAYLOAD), "unknown id"),
    "bad error text": (lambda rid: f'{{"type":"error","id":{rid},"message":"oops"}}',
                       "must start with"),
}


@pytest.mark.parametrize("case", BAD_REPLIES, ids=list(BAD_REPLIES))
def test_bad_reply_is_reported_invalid(upstream, client, case):
    make, problem = BAD_REPLIES[case]
    rid = upstream.send_request(dict(PAYLOAD))
    recv_msg(client)
    client.send(make(rid))
    assert upstream.wait_until(lambda: upstream.report()["invalid"], 2) == 1
    report = upstream.report()
    assert report["ok"] == 0
    assert len(report["problems"]) == 1 and problem in report["problems"][0], report["problems"]


def test_duplicate_reply_is_reported(upstream, client):
    rid = upstream.send_request(dict(PAYLOAD))
    recv_msg(client)
    client.send(good_reply_text(rid, PAYLOAD))
    client.send(good_reply_text(rid, PAYLOAD))
    assert upstream.wait_until(lambda: upstream.report()["duplicates"], 2) == 1
    report = upstream.report()
    assert (report["replies"], report["ok"], report["invalid"]) == (1, 1, 1)
    assert "duplicate reply to id" in report["problems"][0]


def test_eur_request_must_keep_its_stake(upstream, client):
    eur = dict(PAYLOAD, currency="EUR", stake=18.2)
    good = upstream.send_request(eur)
    bad = upstream.send_request(eur)
    recv_msg(client), recv_msg(client)
    client.send(good_reply_text(good, eur, stake_text="18.2"))
    client.send(good_reply_text(bad, eur, stake_text="18.21"))
    assert upstream.wait_until(lambda: upstream.report()["replies"] == 2, 2)
    report = upstream.report()
    assert (report["ok"], report["invalid"]) == (1, 1)
    assert "EUR stake changed" in report["problems"][0]


def test_frames_that_are_not_replies_are_invalid(upstream, client):
    client.send("not json")
    client.send_binary(b"\x00\x01")
    client.send('{"type":"hello"}')
    assert upstream.wait_until(lambda: upstream.report()["invalid"] == 3, 2)
    problems = upstream.report()["problems"]
    assert ["not JSON" in problems[0], "binary" in problems[1], "unknown frame" in problems[2]] \
        == [True, True, True]
    assert upstream.connected() == 1   # never a dropped connection


def test_raw_payload_and_explicit_id(upstream, client):
    rid = upstream.send_request(payload='{"stake":NaN,"currency":"USD"}', id="abc")
    assert rid == "abc"
    texts = [client.recv() for _ in range(3)]
    assert '{"type":"message","id":"abc","payload":{"stake":NaN,"currency":"USD"}}' in texts
    client.send('{"type":"error","id":"abc","message":"Unable to convert stake. Error: '
                'stake must be a finite number"}')
    assert upstream.wait_for_reply("abc", 2)["type"] == "error"
    assert upstream.report()["invalid"] == 0
    assert upstream.send_request() == 1   # explicit ids do not move the counter


def test_send_raw_text_and_binary(upstream, client):
    assert upstream.send_raw("hello") == 1
    assert upstream.send_raw(b"\xff\xfe", binary=True) == 1
    got = []
    while len(got) < 2:
        opcode, data = client.recv_data()
        if data != b'{"type":"heartbeat"}':
            got.append((opcode, data))
    assert got == [(websocket.ABNF.OPCODE_TEXT, b"hello"),
                   (websocket.ABNF.OPCODE_BINARY, b"\xff\xfe")]


def test_send_request_without_client_raises(upstream):
    with pytest.raises(ConnectionError):
        upstream.send_request()


# ---------------------------------------------------------------- faults and lifecycle

def test_drop_makes_client_recv_fail_without_close_frame(upstream, client):
    recv_msg(client, "heartbeat")
    assert upstream.drop() == 1
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        for _ in range(10):   # heartbeats already in flight may still arrive
            opcode, _ = client.recv_data(control_frame=True)
            assert opcode != websocket.ABNF.OPCODE_CLOSE, "drop() must not send a close frame"
    assert upstream.wait_until(lambda: upstream.connected() == 0, 2)
    assert upstream.client_closes() == []


def test_close_sends_close_frame_with_code(upstream, client):
    assert upstream.close(1001, "going away") == 1
    for _ in range(10):
        opcode, frame = client.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
    assert struct.unpack("!H", frame.data[:2])[0] == 1001
    assert frame.data[2:] == b"going away"
    assert upstream.wait_until(lambda: upstream.connected() == 0, 2)
    assert upstream.client_closes() == [(1000, "")]   # websocket-client's answer
    with pytest.raises(ConnectionError):
        upstream.send_request()


def test_client_close_is_answered_and_recorded(upstream):
    ws = websocket.create_connection(upstream.url, timeout=2)
    assert upstream.wait_for_connections(1, 2)
    ws.close(status=4000, reason=b"bye", timeout=1)
    assert upstream.wait_until(lambda: upstream.connected() == 0, 2)
    assert upstream.client_closes() == [(4000, "bye")]


def test_a_ping_from_the_client_gets_its_pong(upstream, client):
    client.ping(b"are you there")
    for _ in range(10):   # heartbeats may come first
        opcode, frame = client.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_PONG:
            break
    assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"are you there")


def test_a_client_that_breaks_the_protocol_is_a_problem_closed_with_1002(upstream, client):
    bad = websocket.ABNF(fin=1, rsv1=1, opcode=websocket.ABNF.OPCODE_TEXT,
                         data=b'{"type":"heartbeat"}')
    client.send_frame(bad)   # RSV1 set, no extension negotiated
    codes = []
    for _ in range(10):
        opcode, frame = client.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            codes.append(struct.unpack("!H", frame.data[:2])[0])
            break
    assert codes == [1002]
    assert upstream.wait_until(lambda: upstream.connected() == 0, 2)
    problems = upstream.problems()
    assert len(problems) == 1 and "RSV" in problems[0], problems
    assert upstream.report()["client_heartbeats"] == 0


def test_stop_ends_connections():
    up = Upstream(heartbeat_interval_s=0.2).start()
    try:
        clients = [websocket.create_connection(up.url, timeout=2) for _ in range(2)]
        assert up.wait_until(lambda: up.connected() == 2, 2)
        assert up.report()["max_connected"] == 2
    finally:
        t0 = time.monotonic()
        up.stop()
    assert time.monotonic() - t0 < 1.5   # clients that never answer the close frame
    assert up.connected() == 0
    for ws in clients:
        codes = []
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            for _ in range(10):   # heartbeats, then the close frame, then nothing
                opcode, frame = ws.recv_data_frame(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    codes.append(struct.unpack("!H", frame.data[:2])[0])
        assert codes == [1001]
    with pytest.raises(OSError):
        websocket.create_connection(up.url, timeout=1)


def test_ids_rise_across_connections_and_record_the_connection(upstream):
    a = websocket.create_connection(upstream.url, timeout=2)
    assert upstream.wait_for_connections(1, 2)
    first = upstream.send_request()
    b = websocket.create_connection(upstream.url, timeout=2)
    assert upstream.wait_for_connections(2, 2)
    second = upstream.send_request()   # goes to the newest connection
    assert (first, second) == (1, 2)
    assert (upstream.sent_on(first), upstream.sent_on(second), upstream.sent_on(99)) == (1, 2, None)
    request_a = recv_msg(a)
    assert request_a["id"] == 1 and recv_msg(b)["id"] == 2
    # a reply on another connection than the request's (redelivery) is valid and counted
    payload = request_a["payload"]
    b.send(good_reply_text(first, payload, stake_text=orjson.dumps(payload["stake"]).decode()))
    assert upstream.wait_for_reply(first, 2) is not None
    report = upstream.report()
    assert (report["replies"], report["ok"], report["redelivered"]) == (1, 1, 1), report
    a.close()
    b.close()


# ---------------------------------------------------------------- automatic requests

def test_request_rate_paces_requests_with_rising_ids():
    with Upstream(request_rate=50, seed=3) as up:
        ws = websocket.create_connection(up.url, timeout=2)
        t0 = time.monotonic()
        msgs = []
        while time.monotonic() - t0 < 1.0:
            msg = orjson.loads(ws.recv())
            if msg["type"] == "message":
                msgs.append(msg)
        ws.close()
        assert 45 <= len(msgs) <= 55, len(msgs)
        assert [m["id"] for m in msgs] == list(range(1, len(msgs) + 1))
        assert up.report()["requests"] >= len(msgs)
        assert up.report()["unanswered"] == up.report()["requests"]


def test_poisson_requests_vary_their_gaps():
    with Upstream(request_rate=100, poisson=True, seed=5, heartbeat_interval_s=None) as up:
        ws = websocket.create_connection(up.url, timeout=2)
        t0 = time.monotonic()
        stamps = []
        while time.monotonic() - t0 < 1.0:
            ws.recv()
            stamps.append(time.monotonic())
        ws.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert 60 <= len(stamps) <= 140, len(stamps)
    assert cv > 0.6, cv   # exponential gaps have cv ~1, fixed pacing ~0


def test_generated_payloads_look_like_the_recordings():
    up = Upstream(seed=11)
    payloads = [up.make_payload() for _ in range(3000)]
    again = Upstream(seed=11)
    assert payloads[:20] == [again.make_payload() for _ in range(20)]   # seeded: reproducible
    assert {(p["marketId"], p["selectionId"]) for p in payloads} == set(MARKET_SELECTIONS)
    currencies = [p["currency"] for p in payloads]
    assert set(currencies) == {"EUR", "USD", "GBP", "PLN", "CZK", "HRK", "UAH", "ZWL", "BTC"}
    assert max(set(currencies), key=currencies.count) == "EUR"
    assert all(1.02 <= p["odds"] <= 9.01 for p in payloads)
    assert any(isinstance(p["odds"], int) for p in payloads)
    for p in payloads:
        text = orjson.dumps(p["stake"]).decode()
        assert -Decimal(text).as_tuple().exponent <= 5, text
        assert 18.2 <= p["stake"] <= 9983.6
        assert DATE_RE.fullmatch(p["date"])
        assert "2021-01-01" <= p["date"][:10] <= "2022-06-30"
    assert any(-Decimal(orjson.dumps(p["stake"]).decode()).as_tuple().exponent == 5
               for p in payloads)


# ---------------------------------------------------------------- wss

@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl CLI needed for a test cert")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_wss(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=20)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with Upstream(ssl_context=ctx, heartbeat_interval_s=0.2) as up:
        assert up.url.startswith("wss://127.0.0.1:")
        ws = websocket.create_connection(up.url, timeout=2, sslopt={"cert_reqs": ssl.CERT_NONE})
        assert orjson.loads(ws.recv()) == {"type": "heartbeat"}
        rid = up.send_request(dict(PAYLOAD))
        assert recv_msg(ws)["id"] == rid
        ws.send(good_reply_text(rid, PAYLOAD))
        assert up.wait_for_reply(rid, 2) is not None
        assert up.report()["ok"] == 1
        up.drop()
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError,
                            ssl.SSLError)):
            for _ in range(10):
                ws.recv()
