"""Drive a WebSocket client through the Autobahn fuzzingserver's client cases.

usage:
  autobahn_client.py --url URL --agent NAME [--cases PATTERNS] [--library LIB]
                     [--case-timeout-s S] [--max-message-bytes N]

The fuzzingserver protocol: ``/getCaseCount`` answers the number of cases; for each case
``/runCase?case=N&agent=NAME`` opens a connection on which the server plays the case and
the client echoes every text and binary message until the server closes;
``/updateReports?agent=NAME`` writes the reports. Each case is bounded by
``--case-timeout-s`` seconds: a client that does not fail the connection on a protocol
violation would otherwise wait for the server to give up.

--library exrate-green      the project's own ``exrate_green.connection.Connection``
--library websocket-client  plain websocket-client (``create_connection``, UTF-8 checked),
                            closing with 1002 / 1007 on the errors it raises, for comparison
--cases 1,2.1,9.*           run only the cases whose id is a pattern or starts with
                            ``pattern.`` (ids come from ``/getCaseInfo``); default: all
--max-message-bytes N       the client's message limit (the performance group 9 sends
                            16 MiB messages; the default, 1 MiB, is the service's own)

Exit status 0 when every case ran (whatever its verdict: the report says that), 1 when
the server could not be reached.
"""

from gevent import monkey; monkey.patch_all()  # noqa: E702, I001  first: before socket/ssl load

import argparse
import fnmatch
import json
import os
import sys
import time
from collections.abc import Callable
from urllib.parse import quote

import gevent
import websocket

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exrate_green.connection import Connection
from exrate_green.errors import ConnectionClosed

OP_BINARY = 0x2
CONNECT_TIMEOUT_S = 10.0
DEFAULT_MESSAGE_BYTES = 1 << 20

EchoCase = Callable[[str, float, int], None]


# -- the two clients under test ------------------------------------------------------------

def echo_with_connection(url: str, case_timeout_s: float, max_message_bytes: int) -> None:
    """Echo with the project's Connection until it raises ConnectionClosed."""
    conn = Connection.open(url, timeout_s=CONNECT_TIMEOUT_S, max_frame_bytes=max_message_bytes)
    try:
        with gevent.Timeout(case_timeout_s):
            while True:
                for kind, data in conn.receive():
                    if kind == "text":
                        conn.send([data])
                    elif kind == "binary":
                        _send_binary(conn, data)
    except ConnectionClosed:
        pass
    finally:
        conn.abort()


def _send_binary(conn: Connection, data: bytes) -> None:
    send_binary = getattr(conn, "send_binary", None)
    if send_binary is not None:
        send_binary(data)
    else:  # connections before send_binary existed
        conn.send_frame(OP_BINARY, data)


def echo_with_websocket_client(url: str, case_timeout_s: float, max_message_bytes: int) -> None:
    """Echo with plain websocket-client, closing as its documentation suggests on errors.

    websocket-client raises on a protocol violation or invalid UTF-8 and leaves the close
    to the application; it has no message limit, so ``max_message_bytes`` is unused.
    """
    ws = websocket.create_connection(url, timeout=case_timeout_s, skip_utf8_validation=False)
    status = websocket.STATUS_NORMAL
    try:
        with gevent.Timeout(case_timeout_s):
            while True:
                opcode, data = ws.recv_data()
                if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    ws.send(data, opcode)
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    return
    except websocket.WebSocketPayloadException:
        status = websocket.STATUS_INVALID_PAYLOAD
    except websocket.WebSocketProtocolException:
        status = websocket.STATUS_PROTOCOL_ERROR
    except (websocket.WebSocketConnectionClosedException, OSError):
        pass
    finally:
        try:
            ws.close(status, timeout=1)  # does nothing once a close frame was answered
        except (websocket.WebSocketException, OSError):
            pass
        ws.shutdown()


LIBRARIES: dict[str, EchoCase] = {
    "exrate-green": echo_with_connection,
    "websocket-client": echo_with_websocket_client,
}


# -- the fuzzingserver protocol -------------------------------------------------------------

def read_text(url: str) -> str | None:
    """The first text message of a server that sends one and closes (getCaseCount/Info)."""
    conn = Connection.open(url, timeout_s=CONNECT_TIMEOUT_S)
    text = None
    try:
        with gevent.Timeout(CONNECT_TIMEOUT_S):
            while True:
                for kind, data in conn.receive():
                    if kind == "text" and text is None:
                        text = data.decode("utf-8")
    except ConnectionClosed:
        pass
    finally:
        conn.abort()
    return text


def case_count(base: str) -> int:
    text = read_text(f"{base}/getCaseCount")
    if text is None:
        raise ConnectionClosed("the fuzzingserver sent no case count")
    return int(json.loads(text))


def case_id(base: str, number: int) -> str:
    text = read_text(f"{base}/getCaseInfo?case={number}")
    return json.loads(text)["id"] if text else "?"


def selected(case: str, patterns: list[str]) -> bool:
    return not patterns or any(
        case == p or case.startswith(p + ".") or fnmatch.fnmatchcase(case, p) for p in patterns)


def run_case(echo: EchoCase, base: str, number: int, agent: str,
             case_timeout_s: float, max_message_bytes: int) -> str:
    """Play one case; the verdict is the server's, this returns how the client's side ended."""
    url = f"{base}/runCase?case={number}&agent={quote(agent)}"
    try:
        echo(url, case_timeout_s, max_message_bytes)
    except gevent.Timeout:
        return f"TIMED OUT after {case_timeout_s:g} s"
    except (ConnectionClosed, websocket.WebSocketException, OSError) as e:
        return f"could not run: {e}"
    return "done"


def update_reports(base: str, agent: str) -> None:
    url = f"{base}/updateReports?agent={quote(agent)}"
    conn = Connection.open(url, timeout_s=CONNECT_TIMEOUT_S)
    try:
        with gevent.Timeout(120):  # the server writes every report before it closes
            while True:
                conn.receive()
    except ConnectionClosed:
        pass
    finally:
        conn.abort()


# -- entry point ----------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the fuzzingserver, ws://HOST:PORT")
    parser.add_argument("--agent", required=True, help="the name the report uses")
    parser.add_argument("--library", choices=sorted(LIBRARIES), default="exrate-green")
    parser.add_argument("--cases", default="", help="comma-separated case id patterns")
    parser.add_argument("--case-timeout-s", type=float, default=30.0)
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MESSAGE_BYTES)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    base = args.url.rstrip("/")
    patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    echo = LIBRARIES[args.library]
    try:
        count = case_count(base)
    except (ConnectionClosed, ValueError) as e:
        print(f"cannot read the case count from {base}: {e}", file=sys.stderr)
        return 1
    ran = 0
    for number in range(1, count + 1):
        case = case_id(base, number)
        if not selected(case, patterns):
            continue
        started = time.monotonic()
        ending = run_case(echo, base, number, args.agent,
                          args.case_timeout_s, args.max_message_bytes)
        ran += 1
        print(f"{args.agent} case {case} ({number}/{count}): {ending} "
              f"in {time.monotonic() - started:.2f} s", flush=True)
    update_reports(base, args.agent)
    print(f"{args.agent}: ran {ran} of {count} cases; reports updated", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
