"""The closing handshake's state (RFC 6455 5.5.1, 7.1): sans-I/O, for either role.

``Closing`` remembers whether our close frame was sent (after it, no frame may follow:
not a pong, not a reply), what ended the peer's side (its close frame, or a violation of
the protocol it committed), and says what to answer:

* a valid close frame from the peer is answered once, echoing its code (1000 when it
  carried none), unless our own close frame went first (then it *is* the answer);
* a violation is answered with one close frame carrying its code (1002, or 1007 for
  invalid UTF-8), never an invalid code echoed back.
"""

from __future__ import annotations

from typing import NamedTuple

from .frames import CLOSE_NO_STATUS, CLOSE_NORMAL, Close, Violation

__all__ = ["Closing", "Ending"]


class Ending(NamedTuple):
    """How the peer's side ended and what we answer: ``code``/``reason`` of our close
    frame, ``cause`` (for the log), and the ``violation`` if the peer broke the protocol."""

    code: int
    reason: str
    cause: str
    violation: Violation | None


class Closing:
    """One connection's closing handshake."""

    def __init__(self) -> None:
        self.sent_cause: str | None = None  # why we sent our close frame; None: not sent
        self.peer: Close | Violation | None = None  # read, not yet acted on

    @property
    def sent(self) -> bool:
        """True once our close frame is sent: nothing may follow it."""
        return self.sent_cause is not None

    def send(self, cause: str) -> bool:
        """We are about to send our close frame; False if one was sent already."""
        if self.sent_cause is not None:
            return False
        self.sent_cause = cause
        return True

    def received(self, event: Close | Violation) -> None:
        """The peer's close frame, or the violation that ends its side (the first wins)."""
        if self.peer is None:
            self.peer = event

    def ending(self) -> Ending | None:
        """What the peer's side ended with and what to answer; None while it goes on."""
        peer = self.peer
        if peer is None:
            return None
        if isinstance(peer, Violation):
            cause = (f"protocol violation by upstream: {peer.reason}; "
                     f"failed the connection with close {peer.code}")
            return Ending(peer.code, peer.reason, cause, peer)
        # repr escapes line breaks: the reason is logged, it must not forge log lines
        reason = repr(peer.reason[:123])[1:-1]
        cause = f"upstream sent close frame {peer.code}" + (f" ({reason})" if reason else "")
        code = CLOSE_NORMAL if peer.code == CLOSE_NO_STATUS else peer.code
        return Ending(code, "", cause, None)
