"""Bounded statistics: however long the simulator runs, these hold a fixed amount.

``Reservoir`` (shared with the service: ``exrate_green.sampling``) keeps a uniform
random sample of a stream of numbers (Algorithm R) plus
its exact count and maximum; percentiles come from the sample, computed only when asked
(sorting 10,000 floats takes about 1 ms). ``Heartbeats`` keeps the client heartbeats'
count, their recent stamps and the gaps between them.
"""

import collections

from ..sampling import Reservoir

__all__ = ["BeatClock", "Heartbeats", "Reservoir"]


class BeatClock:
    """One connection's heartbeat gaps: open -> first heartbeat, then between heartbeats
    (seconds, ``time.monotonic()``)."""

    __slots__ = ("last", "max_gap")

    def __init__(self, opened: float):
        self.last = opened
        self.max_gap: float | None = None

    def beat(self, t: float) -> float:
        """Record a heartbeat at ``t``; -> the gap it ended."""
        gap, self.last = t - self.last, t
        if self.max_gap is None or gap > self.max_gap:
            self.max_gap = gap
        return gap

    def longest(self, now: float | None = None) -> float | None:
        """The longest gap so far, counting the wait since the last heartbeat up to ``now``
        (a live connection); None when there is no gap yet."""
        waiting = None if now is None else now - self.last
        gaps = [g for g in (self.max_gap, waiting) if g is not None]
        return max(gaps) if gaps else None


class Heartbeats:
    """Client heartbeats of every connection: a count, the last ``RECENT`` stamps, a
    reservoir of gaps, and the longest gap of the connections that ended."""

    RECENT = 1024

    def __init__(self) -> None:
        self.count = 0
        self.recent: collections.deque[float] = collections.deque(maxlen=self.RECENT)
        self.gaps = Reservoir(2048)
        self.ended_max_gap: float | None = None

    def beat(self, clock: BeatClock, t: float) -> None:
        self.count += 1
        self.recent.append(t)
        self.gaps.add(clock.beat(t))

    def ended(self, clock: BeatClock) -> None:
        """A connection ended: keep its longest gap (the wait after its last beat excluded)."""
        gap = clock.longest()
        if gap is not None and (self.ended_max_gap is None or gap > self.ended_max_gap):
            self.ended_max_gap = gap

    def max_gap(self, live: list[BeatClock], now: float) -> float | None:
        """The longest gap on any connection, ended or live (live ones counted to ``now``)."""
        candidates = [self.ended_max_gap] + [clock.longest(now) for clock in live]
        gaps = [g for g in candidates if g is not None]
        return max(gaps) if gaps else None
