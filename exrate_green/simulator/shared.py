"""What an ``Upstream`` shares with its connections, as narrow parts (docs/design.md 1, 2).

A connection (``peer.Peer``) is given a ``Shared``, never the ``Upstream``: the settings it
reads, the fault switches the server's controls set, the counters and books it adds to,
and one callback to say something changed. So ``peer`` does not import ``server``, and the
server is the only one that sets its switches.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from .judging import Judge
from .ledger import Ledger
from .samples import Heartbeats
from .traffic import RequestMaker

__all__ = ["ClientCloses", "Counters", "PeerSettings", "Shared", "Switches"]


@dataclasses.dataclass(frozen=True)
class PeerSettings:
    """How every connection behaves, fixed when the server starts.

    heartbeat_interval_s: seconds between heartbeats; None sends none.
    request_rate: automatic requests per second (0: none), at fixed intervals or, with
        ``poisson``, exponentially distributed ones; ``seed`` (None: random) sets them.
    max_requests: stop the automatic requests after this many in all (None: never).
    """

    heartbeat_interval_s: float | None
    request_rate: float
    poisson: bool
    seed: Any
    max_requests: int | None


@dataclasses.dataclass
class Switches:
    """The fault switches: the server's fault controls set them, every connection reads
    them at its next heartbeat, request batch or read."""

    heartbeats_paused: bool = False
    requests_paused: bool = False
    slow_until: float = 0.0  # time.monotonic() at which a slow-read fault ends

    def reading_slowly(self, now: float) -> bool:
        """True while a slow-read fault lasts (``now``: time.monotonic())."""
        return bool(self.slow_until) and now < self.slow_until


@dataclasses.dataclass
class Counters:
    """What the connections sent, summed over all of them, for the report."""

    auto_requests: int = 0      # automatic requests sent
    server_heartbeats: int = 0  # heartbeats sent
    send_failures: int = 0      # requests not sent: the connection was gone


class ClientCloses:
    """The close frames clients sent: all counted, the first ``keep`` kept as
    ``(code or None, reason)`` (memory stays bounded however many come)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.count = 0
        self.first: list[tuple[int | None, str]] = []

    def record(self, code: int | None, reason: str) -> None:
        """A client sent a close frame with ``code`` (None: no status) and ``reason``."""
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append((code, reason))


@dataclasses.dataclass(frozen=True)
class Shared:
    """Everything a connection needs from its server, part by part; ``changed()`` wakes
    whoever waits on the server (call it after each batch of frames read)."""

    settings: PeerSettings
    switches: Switches
    counters: Counters
    maker: RequestMaker
    ledger: Ledger
    judge: Judge
    heartbeats: Heartbeats
    closes: ClientCloses
    changed: Callable[[], None]
