"""The service's counters: plain typed attributes, read by the summary line and ``/metrics``.

One ``Stats`` lives as long as the process. Each part of the core counts its own events
in it and nothing else: ``dispatch`` the requests, error replies and latency; ``delivery``
a reply's life (replies, delivered, redelivered, dropped, possibly lost); ``session`` the
heartbeats and back-pressure; ``service`` the connections. The metrics collector reads
these attributes by name, so a renamed counter is a type error, not a silent gap.
"""

from __future__ import annotations

import bisect
import collections

from .errors import ERROR_REASONS
from .sampling import Reservoir

__all__ = ["LATENCY_BUCKETS_S", "Stats"]

#: upper bounds (seconds) of the reply latency histogram's buckets; one more counts the rest
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                     5.0, 10.0)
#: latency samples kept per summary interval (sorted in ~3 ms)
LATENCY_SAMPLES = 20_000


class Stats:
    """Counters since start (plain ints), and a latency sample since the last summary.

    A reply is counted once in ``replies`` when the kernel first takes it, then once in
    ``delivered`` when the peer's TCP acknowledges its bytes, or else (the connection
    died first) it is sent again on the next connection (``redelivered``, each time), or
    ``dropped`` (never written: no connection in time, shutdown), or ``possibly_lost``
    (written, never acknowledged, and not sent again: shutdown, or too old to resend).
    """

    def __init__(self) -> None:
        # dispatch: what was read
        self.requests = 0  # requests read, bad ones included (each gets one reply)
        self.errors = 0  # error replies made
        self.skipped = 0  # messages without an id, logged and skipped
        #: error replies by ``ExrateError.kind`` (every known kind present from the start)
        self.errors_by_kind: collections.Counter[str] = collections.Counter(
            dict.fromkeys(ERROR_REASONS, 0))
        # delivery: a reply's life
        self.replies = self.delivered = self.redelivered = 0
        self.dropped = self.possibly_lost = 0
        # session and service: the link
        self.connects = self.reconnects = 0
        self.connect_attempts = self.connect_failures = 0
        self.heartbeats_sent = self.heartbeats_received = 0
        self.backpressure_waits = 0  # times the reader stopped for room
        # latency, since start for the histogram: replies per LATENCY_BUCKETS_S bucket
        # (not cumulative: the scrape adds them up) and the sum of their latencies
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        #: reply latencies (seconds) since the last summary, a bounded sample
        self.latency_sample = Reservoir(LATENCY_SAMPLES)

    def error(self, kind: str) -> None:
        """Count one error reply of ``kind`` (an ``ExrateError.kind``)."""
        self.errors += 1
        self.errors_by_kind[kind] += 1

    def record(self, latency_s: float, count: int = 1) -> None:
        """Latency (seconds) of ``count`` replies made together."""
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += count
        self.latency_sum_s += latency_s * count
        self.latency_sample.add(latency_s, count)

    def take_latency_percentiles(self) -> tuple[float | None, float | None]:
        """(p50, p99) seconds of the interval since the last call; starts a new one."""
        sample = self.latency_sample
        p50, p99 = sample.percentile(50), sample.percentile(99)
        sample.clear()
        return p50, p99
