"""A rate API on a raw loopback socket, for tests where the bytes matter.

``RawApi(answer)`` listens on 127.0.0.1 (TLS with ``tls=``, an ``ssl.SSLContext``) and
answers every request with ``answer(target)``: the whole HTTP response as bytes, where
``target`` is the request's path and query (``/v1/2010-12-15?base=EUR``). Every request
is recorded (``requests``: the request line and headers as text) and every accepted
connection counted (``connections``), so a test can show a server was never reached.
"""

import gzip
import json
import socket

import gevent
from gevent.server import StreamServer


class RawApi:
    def __init__(self, answer, *, tls=None):
        self.answer = answer
        self.requests: list[str] = []
        self.connections = 0
        kwargs = {"ssl_context": tls} if tls is not None else {}
        self.server = StreamServer(("127.0.0.1", 0), self._handle, **kwargs)

    @property
    def origin(self) -> str:
        scheme = "https" if self.server.ssl_enabled else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc_info):
        self.server.stop(timeout=1)

    def _handle(self, sock, _address):
        self.connections += 1
        head = b""
        with gevent.Timeout(5, False):
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        text = head.decode("latin-1")
        self.requests.append(text)
        target = text.split(" ", 2)[1] if text.count(" ") >= 2 else "/"
        try:
            sock.sendall(self.answer(target))
        except OSError:
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def response(body, status="200 OK", headers=(), *, gzipped=False) -> bytes:
    """A complete HTTP/1.1 response; ``body`` is bytes, or an object sent as JSON."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", "Connection: close"]
    if gzipped:
        body = gzip.compress(body)
        lines.append("Content-Encoding: gzip")
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def redirect(location, status="302 Found") -> bytes:
    return response(b"", status, [("Location", location)])
