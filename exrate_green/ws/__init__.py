"""A sans-I/O RFC 6455 frame layer: bytes in, events out, frames built for either role.

No socket here: the client connection (``exrate_green.connection``), the simulator and the
tools do the I/O and call this. The split follows python-websockets' ``frames.py`` /
``protocol.py``: pure frame codec below, one stateful parser per direction above it.

API
---
Constants: ``OP_CONTINUATION OP_TEXT OP_BINARY OP_CLOSE OP_PING OP_PONG`` and the close
codes ``CLOSE_NORMAL`` (1000) ... ``CLOSE_INTERNAL_ERROR`` (1011), ``MAX_CONTROL_PAYLOAD``.

Building (``frames``):
    build_frame(opcode, payload, *, mask, fin=True) -> bytes
        ``mask=True`` for the client role (fresh random key), ``False`` for the server role.
    build_text_frames(messages: list[bytes], *, mask) -> bytes
        many final text frames in one bytes object, for one ``sendall``.
    build_header(opcode, length, *, fin=True, masked=False) -> bytes
    frame_bytes(payload_bytes, *, masked=True) -> int   (a final frame's size on the wire)
    build_close_payload(code=1000, reason="") -> bytes   (reason cut to fit 125 bytes)
    apply_mask(mask: bytes, data: bytes) -> bytes        (mask and unmask: one big-int XOR)

Reading:
    parse_close_payload(payload) -> Close(code, reason) | Violation(code, reason)
    is_valid_close_code(code) -> bool   (1000-1003, 1007-1014, 3000-4999)
    Event = tuple[str, Any]   the (kind, detail) pairs below
    Parser(role, max_message_bytes=1 MiB)   role "client" reads server frames,
                                            role "server" reads client frames
        .feed(data: bytes) -> list of events (2-tuples):
            ("text", bytes) ("binary", bytes)   complete messages, fragments joined,
                                                text checked as UTF-8, failing fast: a bad
                                                byte fails before its frame or message ends
            ("oversize", int)                   a message over max_message_bytes, discarded
                                                as it arrives, never buffered
            ("ping", bytes) ("pong", bytes)
            ("close", Close)                    code 1005 when the frame carried none
            ("violation", Violation)            code 1002, or 1007 for invalid UTF-8
        After a close or a violation it returns nothing more (``.done`` is True).
        .controls      number of non-data events the last feed returned
        .buffered_bytes  bytes held (an incomplete frame, fragments of a message)

Closing (``closing``): ``Closing()`` holds one connection's closing handshake: ``send(cause)``
before our close frame (False if one went already: nothing may follow it), ``received(event)``
for the peer's close or violation, ``ending()`` -> ``Ending(code, reason, cause, violation)``,
what to answer.

Violations detected: RSV bits (no extension is ever negotiated), reserved opcodes,
fragmented control frames, control frames over 125 bytes, a continuation with nothing to
continue, a new data frame inside a fragmented message, masking wrong for the role, a
64-bit length with its top bit set, an invalid close payload (1 byte, invalid code, a
reason that is not UTF-8), a text message that is not UTF-8. An oversize text message is
discarded unchecked.
"""

from .closing import Closing, Ending
from .frames import (
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_INVALID_DATA,
    CLOSE_MANDATORY_EXTENSION,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    Violation,
    apply_mask,
    build_close_payload,
    build_frame,
    build_header,
    build_text_frames,
    frame_bytes,
    is_valid_close_code,
    parse_close_payload,
)
from .parser import Event, Parser

__all__ = [
    "CLOSE_ABNORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_INVALID_DATA",
    "CLOSE_MANDATORY_EXTENSION",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_NO_STATUS",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "MAX_CONTROL_PAYLOAD",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Close",
    "Closing",
    "Ending",
    "Event",
    "Parser",
    "Violation",
    "apply_mask",
    "build_close_payload",
    "build_frame",
    "build_header",
    "build_text_frames",
    "frame_bytes",
    "is_valid_close_code",
    "parse_close_payload",
]
