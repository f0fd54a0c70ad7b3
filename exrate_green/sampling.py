"""A bounded sample of a stream of numbers: whatever the rate, it holds a fixed amount.

``Reservoir`` keeps a uniform random sample (Algorithm R) plus the exact count and
maximum; percentiles come from the sample, sorted only when asked (10,000 floats sort in
about 1 ms). The service's latency summary and the simulator's report both use it.
"""

from __future__ import annotations

import math
import random
from array import array

__all__ = ["Reservoir", "percentile"]


class Reservoir:
    """A fixed-size uniform sample of the values ``add``-ed, their count and maximum."""

    def __init__(self, size: int = 10_000, seed: int | str | None = None) -> None:
        if size <= 0:
            raise ValueError("a reservoir holds at least one sample")
        self.size = size
        self.count = 0
        self.max: float | None = None
        self._samples = array("d")
        self._rng = random.Random(seed)
        self._sorted: list[float] = []
        self._sorted_count = 0

    def __len__(self) -> int:
        """Samples held (at most ``size``)."""
        return len(self._samples)

    def add(self, value: float, times: int = 1) -> None:
        """Count ``value`` ``times`` times (a batch of replies made together). Each
        replaces a random sample with probability size/count; for a batch the number
        that do is drawn once (hot path: one draw per batch, not per value)."""
        self.count += times
        if self.max is None or value > self.max:
            self.max = value
        samples = self._samples
        room = self.size - len(samples)
        if room > 0:
            taken = min(times, room)
            samples.extend([value] * taken)
            times -= taken
            if not times:
                return
        if times == 1:
            slot = int(self._rng.random() * self.count)
            if slot < self.size:
                samples[slot] = value
            return
        expected = times * self.size / self.count
        replaced = int(expected) + (self._rng.random() < expected % 1)
        for _ in range(min(replaced, times)):
            samples[self._rng.randrange(self.size)] = value

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile (nearest rank, ``p`` in 0-100) of the sample; None
        while empty."""
        if not self._samples:
            return None
        if self._sorted_count != self.count:  # sort once per change, only when asked
            self._sorted, self._sorted_count = sorted(self._samples), self.count
        return percentile(self._sorted, p / 100, ordered=True)

    def clear(self) -> None:
        """Forget everything (a new interval)."""
        self.count, self.max = 0, None
        self._samples = array("d")
        self._sorted, self._sorted_count = [], 0


def percentile(samples: list[float], fraction: float, *, ordered: bool = False) -> float | None:
    """The ``fraction`` quantile (0-1) of ``samples`` by nearest rank, None when empty."""
    if not samples:
        return None
    values = samples if ordered else sorted(samples)
    return values[min(len(values) - 1, max(0, math.ceil(fraction * len(values)) - 1))]
