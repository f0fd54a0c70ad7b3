"""A real ``redis-server`` for the tests: loopback, a free port, no persistence.

    with RedisServer(tmp_path) as server:
        url = server.url
        server.kill()                          # SIGKILL, as a crashed or restarted Redis
        server.start()                         # again, on the same port

Tests that need one skip with a clear reason when ``redis-server`` is not installed.
"""

import contextlib
import shutil
import socket
import ssl
import subprocess
import time

import gevent
import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` (a free one by default), data in ``directory``
    (no RDB, no AOF), optionally with ``password`` (``requirepass``); ``tls=True`` serves
    TLS only (``rediss://``) with a self-signed certificate, as Heroku's Key-Value Store."""

    def __init__(self, directory, *, port=None, password=None, tls=False):
        if not shutil.which(REDIS_SERVER):
            pytest.skip(f"redis-server is not installed ({REDIS_SERVER} not found; "
                        f"Debian: apt-get install redis-server)")
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.process = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def _tls_args(self):
        import trustme
        ca = trustme.CA()
        cert = ca.issue_cert("redis.internal")  # not 127.0.0.1: the name does not match
        paths = {name: self.directory / f"redis-{name}.pem" for name in ("cert", "key", "ca")}
        cert.cert_chain_pems[0].write_to_path(paths["cert"])
        cert.private_key_pem.write_to_path(paths["key"])
        ca.cert_pem.write_to_path(paths["ca"])
        return ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                "--tls-cert-file", str(paths["cert"]), "--tls-key-file", str(paths["key"]),
                "--tls-ca-cert-file", str(paths["ca"])]

    def start(self, timeout_s=10.0):
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), "--protected-mode", "no"]
        args += self._tls_args() if self.tls else ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            gevent.sleep(0.02)
        return self

    def kill(self):
        """SIGKILL: the server vanishes mid-run, connections reset."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def _answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.tls:
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                    s = context.wrap_socket(s)
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
                return reply.startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.kill()
