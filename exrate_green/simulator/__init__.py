"""Loopback simulators for tests, ``demo`` and ``bench``: the upstream and a rate API."""

from .fake_rates import FakeRateApi
from .upstream import Upstream

__all__ = ["FakeRateApi", "Upstream"]
