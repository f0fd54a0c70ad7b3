"""Loopback simulators for tests, ``demo`` and ``bench``."""

from .upstream import Upstream

__all__ = ["Upstream"]
