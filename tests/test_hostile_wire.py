"""Hostile input over the wire: the checked-in corpus, the frame codec, and big frames.

* ``tests/corpus/hostile.jsonl`` (written once by ``tests/corpus/make_hostile.py``, then
  fixed) is replayed over one connection to the service running in this process: every
  frame with a readable id gets exactly one reply of the expected type and reason, nothing
  else is answered, the connection stays up, heartbeats keep their cadence, and the hub
  is never blocked for 0.2 s (conftest's monitor watches the service too: it runs here).
  Entries that break RFC 6455 itself (invalid UTF-8 in a text message, reserved opcodes,
  RSV bits, ...) are not bad input but protocol violations: each one, replayed alone,
  fails the connection with 1002 or 1007 and the service reconnects at once.
* ``Connection``'s frame reader, under Hypothesis, over a real socket pair: any frame
  sequence gives data events within the size bound, then the sentinel or
  ``ConnectionClosed`` (after at most one close frame of ours), nothing else.
* Frames of 1-2 MiB and JSON nested a million deep, sent to the service as a subprocess:
  its memory stays flat (RSS), no heartbeat is late, its own hub monitor reports nothing.
"""

import base64
import json
import socket
import struct
import time
from pathlib import Path

import gevent
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exrate_green import ws
from exrate_green.connection import Connection
from exrate_green.errors import ConnectionClosed, ProtocolViolation
from exrate_green.simulator import Upstream

from .support import running_service, service_env, start_service, wait_until

CORPUS = Path(__file__).with_name("corpus") / "hostile.jsonl"
BEAT_S = 0.1
FAST = {"heartbeat_interval_s": BEAT_S, "heartbeat_timeout_s": 0.5}
VALID = {"marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 253.67,
         "currency": "USD", "date": "2021-05-18T21:32:42.324Z"}


def load_corpus():
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]


# Corpus entries that break RFC 6455 and the close code the client must fail with. The
# corpus was written when the client tolerated them; they are protocol violations now.
VIOLATIONS = {
    **{f"invalid-utf8-{i:02d}": 1007 for i in range(12)},
    "masked-server-frame": 1002, "rsv-bits-set": 1002,
    "new-message-inside-a-fragmented-one": 1002, "continuation-without-start": 1002,
    "continuation-fin-without-start": 1002,
    **{f"reserved-opcode-{c}": 1002 for c in "34567bcdef"},
    "ping-126-bytes-illegal": 1002, "ping-64KiB-illegal": 1002,
}


def conforming(corpus):
    return [e for e in corpus if e["name"] not in VIOLATIONS]


def spec_bytes(spec):
    if "text" in spec:
        return spec["text"].encode("utf-8", "surrogatepass")
    if "b64" in spec:
        return base64.b64decode(spec["b64"])
    prefix, unit, count, suffix = spec["build"]
    return (prefix + unit * count + suffix).encode()


def ws_frame(opcode, payload, fin=True, rsv=0, mask=None, length_form=None):
    """A server-to-client frame, as RFC 6455 5.2 lays it out (masked only if ``mask``)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n, mask_bit = len(payload), 0x80 if mask else 0
    if length_form == 64 or (length_form is None and n > 65535):
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    elif length_form == 16 or (length_form is None and n > 125):
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BB", first, mask_bit | n)
    if mask:
        payload = ws.apply_mask(mask, payload)
        head += mask
    return head + payload


def wire_bytes(entry):
    frames = b"".join(
        ws_frame(f["opcode"], spec_bytes(f), fin=f["fin"], rsv=f["rsv"],
                 mask=base64.b64decode(f["mask"]) if f["mask"] else None,
                 length_form=f["length_form"])
        for f in entry["frames"])
    return frames * entry.get("repeat", 1)


def replay(up, entry):
    """Send one corpus entry; the ids of frames the simulator knows were sent register
    in its ledger (so a missing or second reply is counted there)."""
    if entry["kind"] == "wire":
        assert up.send_wire(wire_bytes(entry)) == 1
        return
    data, binary = spec_bytes(entry), entry["kind"] == "binary"
    if entry["id"] is None:
        assert up.send_raw(data, binary=binary) == 1
    else:
        up.send_raw_request(data, entry["id"], binary=binary)


# -- the corpus, replayed --------------------------------------------------------------------

def test_the_corpus_is_big_enough_and_well_formed():
    corpus = load_corpus()
    assert len(corpus) >= 200
    names = [e["name"] for e in corpus]
    assert len(names) == len(set(names))
    ids = [json.dumps(e["id"]) for e in corpus if e["id"] is not None]
    assert len(ids) == len(set(ids)) and len(ids) >= 100
    assert {e["kind"] for e in corpus} == {"text", "binary", "wire"}
    assert max(len(spec_bytes(e)) for e in corpus if "build" in e) > 2 * (1 << 20)
    assert VIOLATIONS.keys() <= set(names)


@pytest.mark.timeout(90)
def test_each_corpus_entry_that_breaks_rfc6455_fails_the_connection_and_reconnects(tmp_path):
    entries = [e for e in load_corpus() if e["name"] in VIOLATIONS]
    with Upstream(heartbeat_interval_s=BEAT_S) as up, \
            running_service(up.url, tmp_path, **FAST) as service:
        for n, entry in enumerate(entries, start=1):
            assert up.wait_for_connections(n, 5), entry["name"]
            assert wait_until(lambda: service.session and service.session.heartbeats_received, 3)
            replay(up, entry)
            assert up.wait_for_connections(n + 1, 3), entry["name"]
            assert up.client_closes()[-1][0] == VIOLATIONS[entry["name"]], entry["name"]
        assert len(up.client_closes()) == len(entries)  # one close frame each, never two
        assert service.stats.reconnects == len(entries)


@pytest.mark.timeout(60)
def test_replaying_the_corpus_answers_each_id_once_and_keeps_the_connection(tmp_path):
    corpus = conforming(load_corpus())
    with Upstream(heartbeat_interval_s=BEAT_S) as up, \
            running_service(up.url, tmp_path, **FAST) as service:
        assert up.wait_for_connections(1, 5)
        assert wait_until(lambda: service.session and service.session.heartbeats_received, 3)
        started = time.monotonic()
        for entry in corpus:
            replay(up, entry)
            gevent.sleep(0)
        expected = {json.dumps(e["id"]): e for e in corpus if e["id"] is not None}
        on_wire = [e for e in expected.values() if e["kind"] == "wire"]

        # Frames sent with send_wire are not in the simulator's ledger: their replies are
        # counted as "reply to unknown id", once each.
        def all_in():
            r = up.report()
            return r["unanswered"] == 0 and r["invalid"] >= len(on_wire)
        assert up.wait_until(all_in, 20), up.report()
        rid = up.send_request(VALID)
        assert up.wait_for_reply(rid, 5)["type"] == "message"
        replay_s = time.monotonic() - started
        gevent.sleep(3 * BEAT_S)  # room for a stray second reply to show up

        report = up.report()
        assert report["duplicates"] == 0
        assert report["replies"] == len(expected) - len(on_wire) + 1
        assert report["invalid"] == len(on_wire), report["problems"]
        assert all(p.startswith("reply to unknown id") for p in report["problems"])
        wrong = []
        for entry in expected.values():
            reply = up.wait_for_reply(entry["id"], 0)
            reason = reply.get("message", "") if reply else ""
            if (reply is None or reply["type"] != entry["reply"]
                    or entry.get("why", "") not in reason):
                wrong.append((entry["name"], reply and {k: str(v)[:120] for k, v in reply.items()}))
        assert not wrong, wrong

        assert up.connections == 1 and up.connected() == 1
        assert service.stats.reconnects == 0
        # In-process the simulator and the test share the hub with the service (the hub
        # monitor holds any one turn to 1 s); the subprocess test below measures the
        # service alone. Five intervals: no beat skipped for a hostile frame's sake beyond
        # what a busy 2-core machine's scheduling costs (a frame handled in one long turn
        # would cost the gap its whole time).
        assert report["client_heartbeat_max_gap_s"] < 5 * BEAT_S, report
        print(f"\ncorpus: {len(corpus)} frames ({len(expected)} with an id) replayed in "
              f"{replay_s:.2f} s; skipped={service.stats.skipped} errors={service.stats.errors} "
              f"replies={service.stats.replies}; heartbeat max gap "
              f"{report['client_heartbeat_max_gap_s'] * 1000:.0f} ms")


# -- the frame reader, property-based ---------------------------------------------------------

MAX_FRAME = 64
frames = st.lists(st.tuples(
    st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x7, 0x8, 0x9, 0xA, 0xB, 0xF]),   # opcode
    st.booleans(),                                                          # fin
    st.integers(min_value=0, max_value=7),                                  # rsv
    st.binary(max_size=200),                                                # payload
    st.one_of(st.none(), st.binary(min_size=4, max_size=4)),                # mask
    st.sampled_from([None, 16, 64]),                                        # length form
), max_size=12)
SENTINEL = b'{"sentinel":true}'


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_frame_reader_yields_bounded_events_or_connection_closed(frame_list):
    gevent.sleep(0)  # a switch per example: Hypothesis's own work never holds the hub long
    ours, theirs = socket.socketpair()
    conn = Connection(ours, max_frame_bytes=MAX_FRAME, close_wait_s=0.01)
    try:
        data = b"".join(ws_frame(op, payload, fin, rsv, mask, form)
                        for op, fin, rsv, payload, mask, form in frame_list)
        theirs.sendall(data + ws_frame(0x1, SENTINEL))
        events, ended = [], None
        with gevent.Timeout(2):
            try:
                while not events or events[-1] != ("text", SENTINEL):
                    events.extend(conn.receive())
            except ConnectionClosed as e:
                ended = e
        if ended is None:
            assert not any(op == 0x8 for op, *_ in frame_list), "a close frame must end it"
            assert conn._parser.buffered_bytes == 0  # nothing left after the last frame
        elif not isinstance(ended, ProtocolViolation):
            assert any(op == 0x8 for op, *_ in frame_list), "closed without a close frame"
        for kind, value in events:
            assert kind in ("text", "binary", "oversize")
            if kind == "oversize":
                assert value > MAX_FRAME
            else:
                assert type(value) is bytes and len(value) <= MAX_FRAME
        assert_one_close_at_most(theirs, ended)
    finally:
        conn.abort()
        theirs.close()


def assert_one_close_at_most(theirs, ended):
    """What the client wrote parses as client frames with at most one close, the last
    frame; after a violation it carries the violation's code."""
    theirs.setblocking(False)
    written = b""
    try:
        while chunk := theirs.recv(1 << 16):
            written += chunk
    except (BlockingIOError, ConnectionError):
        pass
    events = ws.Parser("server").feed(written)
    assert all(kind in ("pong", "close") for kind, _ in events), events
    closes = [detail for kind, detail in events if kind == "close"]
    assert len(closes) <= 1 and (not closes or events[-1][0] == "close")
    if isinstance(ended, ProtocolViolation):
        assert closes and closes[0].code == ended.code in (1002, 1007)


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(st.lists(st.one_of(
    # valid UTF-8 text, non-ASCII included (latin-1 characters take two bytes)
    st.tuples(st.just(0x1), st.binary(max_size=MAX_FRAME // 2).map(
        lambda b: b.decode("latin-1").encode())),
    st.tuples(st.just(0x2), st.binary(max_size=MAX_FRAME)),
    st.tuples(st.sampled_from([0x9, 0xA]), st.binary(max_size=125))), max_size=20))
def test_whole_frames_arrive_in_order_and_pings_are_answered(frame_list):
    gevent.sleep(0)
    ours, theirs = socket.socketpair()
    conn = Connection(ours, max_frame_bytes=MAX_FRAME, close_wait_s=0.01)
    try:
        theirs.sendall(b"".join(ws_frame(op, p) for op, p in frame_list) + ws_frame(0x1, SENTINEL))
        events = []
        with gevent.Timeout(2):
            while not events or events[-1] != ("text", SENTINEL):
                events.extend(conn.receive())
        kinds = {0x1: "text", 0x2: "binary"}
        assert events[:-1] == [(kinds[op], p) for op, p in frame_list if op in kinds]
        pings = [p for op, p in frame_list if op == 0x9]
        expected = b"".join(len(p).to_bytes(1, "big") for p in pings)
        got = b""
        theirs.setblocking(False)
        try:
            got = theirs.recv(1 << 16)
        except BlockingIOError:
            pass
        # each pong: 0x8A, 0x80|len, 4-byte mask, masked payload
        lengths, pos = b"", 0
        while pos < len(got):
            assert got[pos] == 0x8A
            n = got[pos + 1] & 0x7F
            lengths += bytes([n])
            pos += 6 + n
        assert lengths == expected
    finally:
        conn.abort()
        theirs.close()


# -- big frames against the service as a process ---------------------------------------------

def _drain(proc, lines):
    for raw in iter(proc.stdout.readline, b""):
        lines.append(raw.decode("utf-8", "replace"))


@pytest.mark.timeout(90)
def test_big_frames_and_deep_nesting_keep_memory_flat_and_heartbeats_on_time(tmp_path):
    mib = 1 << 20
    big = [
        ("x" * (2 * mib)).encode(),                                     # oversize text
        "[" * (mib - 16),                                               # nesting, a million deep
        '{"a":' * ((mib - 16) // 5),
        "7" * (mib - 16),                                               # a million-digit number
        "[" + "{}," * ((mib - 16) // 3) + "{}]",                        # 350k objects
    ]
    echo = ('{"type":"message","id":%d,"payload":' + json.dumps(VALID)[:-1]
            + ',"pad":"' + "z" * (900 * 1024) + '"}}')
    with Upstream(heartbeat_interval_s=BEAT_S) as up:
        env = service_env(tmp_path, EXRATE_URL=up.url, EXRATE_PROVIDER="ecb", LOG_LEVEL="WARNING",
                          EXRATE_HEARTBEAT_INTERVAL=BEAT_S, EXRATE_HEARTBEAT_TIMEOUT=0.5)
        proc = start_service([], env)
        lines = []
        reader = gevent.spawn(_drain, proc, lines)
        try:
            assert up.wait_for_connections(1, 15), "".join(lines)
            service = psutil.Process(proc.pid)
            rid = up.send_request(VALID)
            assert up.wait_for_reply(rid, 10)["type"] == "message"

            def round_of_big_frames(n):
                for _ in range(n):
                    for frame in big:
                        up.send_raw(frame)
                    up.send_raw(b"\0" * (2 * mib), binary=True)
                    rid = 5_000_000 + len(sent)
                    up.send_raw_request(echo % rid, rid)
                    sent.append(rid)
                    assert up.wait_for_reply(rid, 10) is not None  # paced: one round in flight
                gevent.sleep(0.2)

            sent = []
            round_of_big_frames(3)   # warm-up: allocator arenas reach their working size
            rss_warm = service.memory_info().rss
            t0 = time.monotonic()
            round_of_big_frames(20)
            rss_after = service.memory_info().rss
            rounds_s = time.monotonic() - t0
            rid = up.send_request(VALID)
            assert up.wait_for_reply(rid, 10)["type"] == "message"
            report = up.report()
            mib_sent = 20 * (sum(len(f) for f in big) + 2 * mib + len(echo)) / mib
        finally:
            proc.terminate()
            code = proc.wait(timeout=20)
            reader.join(timeout=5)
    output = "".join(lines)
    assert code == 0, output[-3000:]
    assert up.connections == 1, output[-3000:]
    assert report["unanswered"] == 0 and report["duplicates"] == 0 and report["invalid"] == 0
    assert all(up.wait_for_reply(rid, 0)["type"] == "message" for rid in sent)
    growth_mib = (rss_after - rss_warm) / mib
    assert growth_mib < 16, (rss_warm, rss_after)
    # Five intervals (0.5 s): 2 MiB frames are read and skipped in bounded slices; one
    # handled in a single turn holds the hub for its whole size and shows here (the
    # service's own monitor, next, reports only turns past 1 s). Tighter bounds (+250 ms)
    # measured a machine whose two cores also run the simulator and the test.
    assert report["client_heartbeat_max_gap_s"] < 5 * BEAT_S, report
    assert "appears to be blocked" not in output, output[-3000:]  # the service's own monitor
    print(f"\nbig frames: {mib_sent:.0f} MiB in {rounds_s:.1f} s; service RSS "
          f"{rss_warm / mib:.1f} -> {rss_after / mib:.1f} MiB; heartbeat max gap "
          f"{report['client_heartbeat_max_gap_s'] * 1000:.0f} ms")
