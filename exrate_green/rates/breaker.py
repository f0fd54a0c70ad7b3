"""A circuit breaker per rate provider: a provider that keeps failing is left alone a while.

Closed: every fetch may call. After ``threshold`` consecutive failed fetches it opens for a
cool-down (30 s, doubled after each failed probe up to 5 min). While open no call is made
and callers get ``ProviderDown`` at once. When the cool-down ends ONE fetch is let through
(the probe): its success closes the breaker, its failure opens it again for twice as long.
A refusal that waiting will not fix soon (exchangerate.host's exhausted monthly quota, a
bad access key) opens it for ``ProviderRefused.hold_s`` (an hour) with the API's reason.

The clock is injected (``clock``, seconds, monotonic): nothing here sleeps or schedules,
every state change happens when a caller asks, so tests drive it with a fake clock.
"""

import logging
import math
import time
from collections.abc import Callable

from ..backoff import Backoff
from ..errors import RateUnavailable

log = logging.getLogger("exrate_green.rates")

CLOSED, OPEN, PROBING = "closed", "open", "probing"
#: consecutive failed fetches that open the breaker
FAILURE_THRESHOLD = 5
#: first cool-down, seconds; doubled after each failed probe
FIRST_COOL_DOWN_S = 30.0
#: longest cool-down, seconds
MAX_COOL_DOWN_S = 300.0
#: how long a quota or key refusal keeps the provider closed to calls, seconds
REFUSAL_HOLD_S = 3600.0


class ProviderDown(RateUnavailable):
    """The provider's breaker is open: no call was made."""


class ProviderRefused(RateUnavailable):
    """The provider refused in a way retrying soon cannot fix (quota spent, bad key).

    ``why`` is the full text; ``short`` the few words the breaker repeats while it is open
    ("monthly request quota exhausted"); ``hold_s`` how long to leave the provider alone.
    """

    def __init__(self, why: str, short: str, hold_s: float = REFUSAL_HOLD_S):
        super().__init__(why)
        self.short = short
        self.hold_s = hold_s


class CircuitBreaker:
    """The breaker of the provider called ``name``; see the module docstring.

    ``state`` is "closed", "open" or "probing" (open, with the one probe call in flight).
    ``failures`` counts consecutive failed fetches; ``opened`` how often it opened.
    """

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic,
                 threshold: int = FAILURE_THRESHOLD, first_cool_down_s: float = FIRST_COOL_DOWN_S,
                 max_cool_down_s: float = MAX_COOL_DOWN_S):
        self.name = name
        self.clock = clock
        self.threshold = threshold
        #: the cool-down after the n-th opening in a row: 30 s doubling to 5 min, no jitter
        #: (one process; the fleet is spread by its own timings)
        self.cool_down = Backoff(first_cool_down_s, max_cool_down_s, jitter=0.0)
        self._openings = 1  # openings in a row (failed probes + 1), for the cool-down
        self.state = CLOSED
        self.failures = 0
        self.opened = 0
        self.why = ""  # what opened it, in a few words ("" after a run of failures)
        self._open_until = 0.0

    # -- asking ---------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self.state == CLOSED

    def retry_in_s(self) -> float:
        """Seconds until the next probe may start (0 when closed or due)."""
        if self.state == CLOSED:
            return 0.0
        return max(self._open_until - self.clock(), 0.0)

    def check(self) -> None:
        """Raise ``ProviderDown`` if a fetch now would be refused; never takes the probe.

        Used when a request arrives: a fetch queued while the cool-down is over may become
        the probe, so only a cool-down still running (or a probe in flight) refuses.
        """
        if self.state == PROBING or (self.state == OPEN and self.retry_in_s() > 0):
            raise self._down()

    def acquire(self) -> None:
        """Permission for one call, right before it is made; ``ProviderDown`` if refused.

        Closed: granted. Open with the cool-down over: granted once, as the probe.
        """
        if self.state == CLOSED:
            return
        if self.state == OPEN and self.retry_in_s() <= 0:
            self.state = PROBING
            log.info("%s: cool-down over, one probe call", self.name)
            return
        raise self._down()

    def may_retry(self) -> bool:
        """Whether a failing fetch may make another attempt: only while nothing has failed
        lately. A provider that failed a whole fetch gets one attempt per fetch until it
        answers again, so a dead API sees a handful of calls, not every retry of every one."""
        return self.state == CLOSED and self.failures == 0

    # -- telling --------------------------------------------------------------------------

    def succeeded(self) -> None:
        if self.state != CLOSED:
            log.warning("%s answered again: circuit closed", self.name)
        self.state, self.failures, self.why = CLOSED, 0, ""
        self._openings = 1

    def no_verdict(self) -> None:
        """The call permitted by ``acquire`` was not made: a probe slot is handed back."""
        if self.state == PROBING:
            self.state = OPEN

    def failed(self, error: RateUnavailable) -> None:
        """A fetch failed with ``error``; may open the breaker."""
        if isinstance(error, ProviderRefused):
            self._open(error.hold_s, error.short)
            return
        if self.state == PROBING:
            self._openings += 1
            self._open(self.cool_down.delay_s(self._openings), "")
            return
        if self.state == OPEN:
            return  # a call started before it opened: the cool-down already runs
        self.failures += 1
        if self.failures >= self.threshold:
            self._open(self.cool_down.delay_s(self._openings), "")

    def _open(self, duration_s: float, why: str) -> None:
        self.state, self.why = OPEN, why
        self._open_until = self.clock() + duration_s
        self.opened += 1
        log.warning("%s is down%s after %d failed fetch(es): no call for %.0f s",
                    self.name, f" ({why})" if why else "", max(self.failures, 1), duration_s)

    def _down(self) -> ProviderDown:
        because = f" ({self.why})" if self.why else ""
        if self.state == PROBING:
            return ProviderDown(f"{self.name} is down{because}, retrying now")
        return ProviderDown(f"{self.name} is down{because}, "
                            f"retrying in {math.ceil(self.retry_in_s())} s")
