"""Dense traffic is read in fewer, larger batches; sparse traffic is read at once.

A real socket pair: a native thread writes frame-sized chunks into one end, spaced with a
real sleep (finer than the hub's timers), and the reader reads the other end through
``MeteredSocket``. Above ``DENSE_BYTES_PER_S`` the reader pauses before
reading an empty socket again (so each read carries more); below it, it never pauses.
Counts of reads, not timings, say which happened.
"""

import socket

import pytest
from gevent import monkey

from exrate_green.link import RATE_WINDOW_S, MeteredSocket

pytestmark = pytest.mark.timeout(30)

CHUNK = b"x" * 400  # about two request frames
native_sleep = monkey.get_original("time", "sleep")
start_thread = monkey.get_original("_thread", "start_new_thread")


def _read_all(gap_s: float, chunks: int) -> tuple[int, int, MeteredSocket]:
    """(reads, bytes) when a native thread sends ``chunks`` CHUNKs ``gap_s`` apart."""
    left, right = socket.socketpair()
    metered = MeteredSocket(right, send_timeout_s=5.0)
    raw = left._sock  # the real socket: the writer is a native thread, not a greenlet
    raw.setblocking(True)

    def write():
        try:
            for _ in range(chunks):
                raw.sendall(CHUNK)
                native_sleep(gap_s)
        finally:
            raw.shutdown(socket.SHUT_WR)

    start_thread(write, ())
    reads = total = 0
    while True:
        data = metered.recv(1 << 16)
        if not data:
            break
        reads += 1
        total += len(data)
    metered.close()
    left.close()
    return reads, total, metered


def test_dense_traffic_is_read_in_fewer_larger_batches():
    # a chunk every 0.1 ms (~4 MB/s, if the sleeps are that fine; at worst a few times
    # slower, still past the threshold): after the first rate window most reads pause
    # and take several chunks at once
    reads, total, metered = _read_all(0.0001, 5000)
    chunks = total // len(CHUNK)
    assert chunks == 5000
    assert metered._dense
    assert reads < chunks / 2, (reads, chunks)  # at least two chunks a read on average


def test_sparse_traffic_is_read_as_it_comes():
    # a chunk every 2 ms (200 KB/s, ~1,000 requests/s): never dense, every chunk read on
    # its own, never held back
    reads, total, metered = _read_all(0.002, int(4 * RATE_WINDOW_S / 0.002))
    chunks = total // len(CHUNK)
    assert chunks == int(4 * RATE_WINDOW_S / 0.002)
    assert not metered._dense
    assert reads >= chunks * 0.9, (reads, chunks)
