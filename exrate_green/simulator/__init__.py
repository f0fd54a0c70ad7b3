"""Loopback simulators for tests and ``demo``: the upstream and a rate API.

The upstream is split by job: ``server`` (``Upstream``), ``wire`` (frame I/O),
``traffic`` (requests and pacing), ``ledger`` (request ids), ``judging`` (reply
validation and the score), ``samples`` (bounded statistics).
"""

from .fake_rates import FakeRateApi
from .server import Upstream

__all__ = ["FakeRateApi", "Upstream"]
