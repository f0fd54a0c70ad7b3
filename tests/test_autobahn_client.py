"""tools/autobahn_client.py against a stand-in that speaks the fuzzingserver's protocol.

The real fuzzingserver needs Python 2.7 and minutes (tools/autobahn/run.py runs it); this
stand-in, a python-websockets server in a subprocess, serves the same four endpoints with
three small cases: an echo case (text, binary, a fragmented text message), a case in which
the server never speaks nor closes (the client's time bound must end it), and a last echo
case (the run goes on after a timed-out case). It records what each endpoint saw.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(ROOT, "tools", "autobahn_client.py")

STAND_IN = r'''
import json, sys, time
from urllib.parse import parse_qs, urlparse
from websockets.sync.server import serve
from websockets.exceptions import ConnectionClosed

CASES = ["1.1", "1.2", "2.1"]
log = open(sys.argv[1], "a", buffering=1)

def record(**event):
    log.write(json.dumps(event) + "\n")

def echo_case(ws, case):
    sent = ["h\u00e9llo", b"\x00\xff\x10", "frag-ment-ed"]
    ws.send(sent[0])
    ws.send(sent[1])
    ws.send(["frag-", "ment-", "ed"])  # one text message in three frames
    got = [ws.recv(timeout=5) for _ in sent]
    record(endpoint="runCase", case=case, echoed=got == sent)
    ws.close(1000)

def silent_case(ws, case):
    started = time.monotonic()
    try:
        ws.recv(timeout=60)
    except (ConnectionClosed, TimeoutError):
        pass
    record(endpoint="runCase", case=case, silent_s=time.monotonic() - started)

def handler(ws):
    url = urlparse(ws.request.path)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    if url.path == "/getCaseCount":
        ws.send(json.dumps(len(CASES)))
    elif url.path == "/getCaseInfo":
        ws.send(json.dumps({"id": CASES[int(query["case"]) - 1], "description": ""}))
    elif url.path == "/runCase":
        case = CASES[int(query["case"]) - 1]
        record(endpoint="runCase-start", case=case, agent=query["agent"])
        (silent_case if case == "1.2" else echo_case)(ws, case)
        return
    elif url.path == "/updateReports":
        record(endpoint="updateReports", agent=query["agent"])
    ws.close(1000)

with serve(handler, "127.0.0.1", 0) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
'''


@pytest.fixture
def stand_in(tmp_path):
    """(url, path of the events log) of a running stand-in fuzzingserver."""
    events = tmp_path / "events.jsonl"
    server = subprocess.Popen([sys.executable, "-c", STAND_IN, str(events)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        yield f"ws://127.0.0.1:{port}", events
    finally:
        server.kill()
        server.wait(10)
        server.stdout.close()


def run_client(url, *args):
    started = time.monotonic()
    result = subprocess.run([sys.executable, CLIENT, "--url", url, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    return result, time.monotonic() - started


def read_events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("library", ["exrate-green", "websocket-client"])
def test_every_case_is_echoed_in_order_and_a_silent_case_ends_at_its_time_bound(
        stand_in, library):
    url, events_path = stand_in
    result, took_s = run_client(url, "--agent", f"agent {library}", "--library", library,
                                "--case-timeout-s", "1")
    assert result.returncode == 0, result.stderr
    events = read_events(events_path)
    ran = [(e["case"], e["agent"]) for e in events if e["endpoint"] == "runCase-start"]
    assert ran == [(case, f"agent {library}") for case in ("1.1", "1.2", "2.1")]
    verdicts = {e["case"]: e for e in events if e["endpoint"] == "runCase"}
    assert verdicts["1.1"]["echoed"] and verdicts["2.1"]["echoed"]
    assert 0.8 < verdicts["1.2"]["silent_s"] < 10  # ended by the client's 1 s bound
    assert events[-1] == {"endpoint": "updateReports", "agent": f"agent {library}"}
    assert "TIMED OUT" in result.stdout and took_s < 30


def test_only_the_cases_matching_the_patterns_run(stand_in):
    url, events_path = stand_in
    result, _ = run_client(url, "--agent", "some", "--cases", "2")
    assert result.returncode == 0, result.stderr
    ran = [e["case"] for e in read_events(events_path) if e["endpoint"] == "runCase-start"]
    assert ran == ["2.1"]


def test_an_unreachable_server_is_an_error_not_an_empty_run():
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, _ = run_client(f"ws://127.0.0.1:{port}", "--agent", "some")
    assert result.returncode == 1
    assert "cannot read the case count" in result.stderr
