"""Bounded statistics: however long the simulator runs, these hold a fixed amount.

``Reservoir`` keeps a uniform random sample of a stream of numbers (Algorithm R) plus
its exact count and maximum; percentiles come from the sample, computed only when asked
(sorting 10,000 floats takes about 1 ms). ``Heartbeats`` keeps the client heartbeats'
count, their recent stamps and the gaps between them.
"""

import collections
import math
import random
from array import array

__all__ = ["BeatClock", "Heartbeats", "Reservoir"]


class Reservoir:
    """A fixed-size uniform sample of the values ``add``-ed, their count and maximum."""

    def __init__(self, size: int = 10_000, seed: int | str | None = None):
        if size <= 0:
            raise ValueError("a reservoir holds at least one sample")
        self.size = size
        self.count = 0
        self.max: float | None = None
        self._samples = array("d")
        self._random = random.Random(seed).random
        self._sorted: list[float] = []
        self._sorted_count = 0

    def __len__(self) -> int:
        """Samples held (at most ``size``)."""
        return len(self._samples)

    def add(self, value: float) -> None:
        """Count ``value``; it replaces a random sample with probability size/count."""
        self.count += 1
        if self.max is None or value > self.max:
            self.max = value
        samples = self._samples
        if len(samples) < self.size:
            samples.append(value)
            return
        slot = int(self._random() * self.count)
        if slot < self.size:
            samples[slot] = value

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile (nearest rank) of the sample; None while empty."""
        if not self._samples:
            return None
        if self._sorted_count != self.count:   # sort once per change, only when asked
            self._sorted, self._sorted_count = sorted(self._samples), self.count
        ordered = self._sorted
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


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
