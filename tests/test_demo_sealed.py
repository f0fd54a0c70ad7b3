"""The demo (and ``simulate``) is sealed: a real Redis, a user's cache directory, real rate
API URLs and a real key in the environment are neither read nor written.

The demo runs as a subprocess with ``REDIS_URL`` pointing at a real ``redis-server`` that
holds data of its own, ``EXRATE_CACHE_DIR`` at a directory of the user's files, and the
rate-API URLs at raw loopback listeners that count connections.
"""

import os

import pytest
import redis

from .raw_api import RawApi, response
from .redis_server import RedisServer
from .support import run_service, service_env, start_service, wait_until

pytestmark = pytest.mark.timeout(90)

REAL_KEY = "real-key-of-the-user-0123456789"
USER_DATA = {b"exrate-green:table:frankfurter/2021-05-18": b"the user's own value",
             b"orders:42": b"not ours at all"}


def snapshot(directory):
    """(relative path, size, mtime ns) of every file and directory below ``directory``."""
    found = []
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.stat(path)
            found.append((os.path.relpath(path, directory), info.st_size, info.st_mtime_ns))
    return sorted(found)


@pytest.fixture
def user_world(tmp_path):
    """A real Redis with the user's data, a cache directory with the user's files, and
    real-looking rate APIs that must never be called."""
    (tmp_path / "redis").mkdir()
    cache_dir = tmp_path / "user-cache"
    cache_dir.mkdir()
    (cache_dir / "notes.txt").write_text("mine")
    (cache_dir / "cache.db").write_bytes(b"the user's own cache.db, not SQLite")
    never = lambda target: response({"message": "must not be called"})  # noqa: E731
    with RedisServer(tmp_path / "redis") as server, RawApi(never) as frankfurter, \
            RawApi(never) as exchangerate_host:
        client = redis.Redis.from_url(server.url)
        for key, value in USER_DATA.items():
            client.set(key, value)
        yield {"server": server, "client": client, "cache_dir": cache_dir,
               "apis": (frankfurter, exchangerate_host),
               "env": service_env(tmp_path, REDIS_URL=server.url, EXRATE_CACHE_DIR=cache_dir,
                                  EXCHANGE_ACCESS_KEY=REAL_KEY,
                                  FRANKFURTER_URL=frankfurter.origin + "/v1",
                                  EXCHANGERATE_HOST_URL=exchangerate_host.origin)}


def untouched(world, before_files, connections_before):
    client = world["client"]
    assert {k: client.get(k) for k in USER_DATA} == USER_DATA
    assert client.dbsize() == len(USER_DATA)
    # our own client's one connection is the only one ever made
    assert int(client.info("stats")["total_connections_received"]) == connections_before
    assert snapshot(world["cache_dir"]) == before_files
    assert [api.connections for api in world["apis"]] == [0, 0]


@pytest.mark.parametrize("provider", ["frankfurter", "exchangerate.host"])
def test_the_demo_reads_and_writes_nothing_of_the_users(user_world, provider):
    before_files = snapshot(user_world["cache_dir"])
    connections = int(user_world["client"].info("stats")["total_connections_received"])
    result = run_service(["demo", f"--provider={provider}", "--duration=2", "--rate=30"],
                         user_world["env"], 60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"demo summary (provider {provider})" in result.stdout
    assert REAL_KEY not in result.stdout + result.stderr
    untouched(user_world, before_files, connections)


def test_simulate_reads_and_writes_nothing_of_the_users(user_world):
    before_files = snapshot(user_world["cache_dir"])
    connections = int(user_world["client"].info("stats")["total_connections_received"])
    proc = start_service(["simulate", "--rate-api=0", "--requests=5"], user_world["env"])
    try:
        ready = wait_until(lambda: proc.poll() is not None or b"ws://" in proc.stdout.peek(), 20)
        assert ready and proc.poll() is None   # serving, waiting for a client
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stdout.close()
    untouched(user_world, before_files, connections)
