"""An independent WebSocket server for the wire tests: python-websockets on asyncio.

Run as a subprocess (never on the tests' gevent hub): ``python tests/websockets_upstream.py``.
It prints ``PORT n``, then one JSON line per connection saying what it saw. The path
chooses the script:

  /conversation    ping, a fragmented text and a fragmented binary message, then read the
                   client's two echoes and close with 1000
  /close/CODE      send one text message, then close with CODE
"""

import asyncio
import json
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def conversation(ws, seen):
    pong = await ws.ping(b"are you there")
    await asyncio.wait_for(pong, 2)
    seen["pong"] = True
    await ws.send(['{"type":', '"fragmented",', '"text":"h\u00e9llo"}'])  # three fragments
    await ws.send([b"\x00\x01", b"", b"\x02\x03"])
    seen["echoes"] = [await asyncio.wait_for(ws.recv(), 2) for _ in range(2)]
    seen["echoes"] = [e if isinstance(e, str) else e.hex() for e in seen["echoes"]]
    await ws.close(1000, "done")


async def close_with(ws, code):
    await ws.send('{"type":"heartbeat"}')
    await ws.close(code, f"closing with {code}")


async def handler(ws):
    path = ws.request.path
    seen = {"path": path}
    try:
        if path == "/conversation":
            await conversation(ws, seen)
        elif path.startswith("/close/"):
            await close_with(ws, int(path.rsplit("/", 1)[1]))
        await ws.wait_closed()
    except (ConnectionClosed, TimeoutError) as e:
        seen["error"] = repr(e)
    received = ws.protocol.close_rcvd
    seen["close_rcvd"] = [received.code, received.reason] if received else None
    seen["close_rcvd_then_sent"] = ws.protocol.close_rcvd_then_sent
    print(json.dumps(seen), flush=True)


async def main():
    async with serve(handler, "127.0.0.1", 0, ping_interval=None, close_timeout=2) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"PORT {port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF


if __name__ == "__main__":
    asyncio.run(main())
