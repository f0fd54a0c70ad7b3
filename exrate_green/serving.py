"""The pure step from a batch of incoming frames to what must be done about it.

``step`` does no I/O, never yields and reads no clock: the day, the reply timestamp and
the rate book's ``peek`` (a lookup in memory) are passed in, as ``protocol`` takes
``today``. It says what the batch asks for; ``dispatch.Dispatch`` acts on it: it counts,
logs the skipped messages, posts the hot replies, and (after the session registered the
heartbeats) holds the requests that wait for a rate table, the reader stopping for room
when there is none (back-pressure).
"""

import datetime
from collections.abc import Callable, Iterable
from typing import Any

from . import protocol
from .errors import ProtocolError, RateError
from .protocol import Request
from .rates.table import RateTable

#: ``peek(day, currency)``: the table in memory that answers at once, else None (no I/O)
Peek = Callable[[datetime.date, str], RateTable | None]

#: the error reply to a request sent in a binary frame
BINARY_REFUSED = "binary frames are not supported: send the request as a text frame"

__all__ = ["BINARY_REFUSED", "Peek", "Step", "answer", "step"]


class Step:
    """What one batch of frames asks for, in the order the frames came.

    * ``replies``: the replies made now (hot rate, or an error reply), to post at once;
    * ``waiting``: the requests whose rate table is not in memory (to hold until it comes);
    * ``heartbeats``: upstream heartbeats seen;
    * ``requests``: messages counted as requests (each gets exactly one reply, now or later);
    * ``errors``: the ``ExrateError.kind`` of each error reply in ``replies``;
    * ``skipped``: what each message without an id that was skipped was (for the log);
    * ``failures``: (message, exception) of messages a bug kept from being served (each
      counts as skipped);
    * ``started``: the clock reading when the batch was taken (set by the caller; the
      step reads no clock).
    """

    __slots__ = ("replies", "waiting", "heartbeats", "requests", "errors", "skipped",
                 "failures", "started")

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.waiting: list[Request] = []
        self.heartbeats = 0
        self.requests = 0
        self.errors: list[str] = []
        self.skipped: list[str] = []
        self.failures: list[tuple[bytes, Exception]] = []
        self.started = 0.0


def step(events: Iterable[tuple[str, Any]], *, today: datetime.date, stamp: str,
         peek: Peek) -> Step:
    """What the batch ``events`` ((kind, data) from ``Connection.receive``) asks for, with
    ``today`` the UTC day (dates after it are refused), ``stamp`` the replies' timestamp
    and ``peek`` the rate book's lookup in memory."""
    result = Step()
    replies, waiting, errors = result.replies, result.waiting, result.errors
    parse, make_reply = protocol.parse, answer  # locals: this loop is the hot path
    for kind, data in events:
        if kind != "text":
            _refuse_frame(kind, data, today, result)
            continue
        try:
            request = parse(data, today)
            if request is None:
                result.heartbeats += 1
                continue
            result.requests += 1
            table = peek(request.day, request.currency)
            if table is None:
                waiting.append(request)
                continue
            replies.append(make_reply(request, table, stamp, errors))
        except ProtocolError as e:
            if e.request_id is None:
                result.skipped.append(f"{e.reason}: {protocol.excerpt(data)}")
            else:
                result.requests += 1  # a request, if a bad one: it gets a reply
                errors.append(e.kind)
                replies.append(protocol.error_reply(e.request_id, e.reason))
        except Exception as e:  # a bug must cost one message, never the connection
            result.failures.append((data, e))
    return result


def answer(request: Request, table: RateTable, stamp: str, errors: list[str]) -> bytes:
    """The reply to ``request`` from ``table``: converted, or an error reply whose
    ``kind`` is appended to ``errors``."""
    try:
        stake_eur = protocol.convert(request.stake, table.rate(request.currency))
        return protocol.reply(request, stake_eur, stamp)
    except (ProtocolError, RateError) as e:
        errors.append(e.kind)
        return protocol.error_reply(request.id, e.reason)


def _refuse_frame(kind: str, data: Any, today: datetime.date, result: Step) -> None:
    """Binary and oversize frames are never served; a binary one with an id is answered
    with an error. (``data`` is the frame's size in bytes for an oversize one.)"""
    request_id = None
    if kind == "binary":
        try:
            request = protocol.parse(data, today)
            request_id = request.id if request is not None else None
        except ProtocolError as e:
            request_id = e.request_id
    if request_id is None:
        size = data if kind == "oversize" else len(data)
        result.skipped.append(f"{kind} frame of {size} bytes")
        return
    result.requests += 1  # a request, if in the wrong frame type: it gets a reply
    result.errors.append("invalid_request")
    result.replies.append(protocol.error_reply(request_id, BINARY_REFUSED))
