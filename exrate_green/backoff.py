"""One backoff policy for everything that retries: reconnects, rate fetches, the circuit
breaker's cool-down and the Redis tier's rest after a failure.

A ``Backoff`` holds the policy (as urllib3's ``Retry`` does); ``delay_s(failures)`` says
how long to wait after that many consecutive failures. The policy is a value: callers keep
their own failure count.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff, capped, with jitter.

    After ``failures`` consecutive failures the wait is ``first_s * factor ** (n - 1)``
    seconds capped at ``cap_s``, where ``n`` counts the failures past ``free`` (the first
    ``free`` failures are retried at once). ``jitter`` is the fraction of the step drawn
    at random (0.5: 50-100 % of the step), so a fleet does not retry in lockstep.
    """

    first_s: float
    cap_s: float
    factor: float = 2.0
    jitter: float = 0.5
    free: int = 0

    def step_s(self, failures: int) -> float:
        """The wait after ``failures`` failures, before jitter (seconds)."""
        n = failures - self.free
        if n <= 0:
            return 0.0
        # min() before the power would overflow for a long outage: compare exponents
        if self.factor > 1 and self.first_s > 0:
            limit = self.cap_s / self.first_s
            exponent = n - 1
            if exponent > 64 or self.factor ** exponent >= limit:
                return self.cap_s
        return min(self.cap_s, self.first_s * self.factor ** (n - 1))

    def delay_s(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after ``failures`` consecutive failures, with jitter."""
        step = self.step_s(failures)
        return step * (1.0 - self.jitter * rng()) if step else 0.0
