"""RFC 6455 frames: opcodes, close codes, masking, building frames for either role.

Pure functions on bytes; no socket, no state. Parsing lives in ``parser.py`` because it
needs state (a frame may arrive in pieces, a message in fragments).
"""

import os
import struct
from typing import NamedTuple

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
DATA_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))
CONTROL_OPCODES = frozenset((OP_CLOSE, OP_PING, OP_PONG))
MAX_CONTROL_PAYLOAD = 125  # bytes (RFC 6455 5.5)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005  # never on the wire: "the close frame carried no code"
CLOSE_ABNORMAL = 1006  # never on the wire: "the connection dropped without a close frame"
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_MANDATORY_EXTENSION = 1010
CLOSE_INTERNAL_ERROR = 1011


class Close(NamedTuple):
    """A close frame's content: ``code`` (1005 when it carried none) and ``reason``."""

    code: int
    reason: str


class Violation(NamedTuple):
    """A broken RFC 6455 rule: the close ``code`` to fail the connection with
    (1002, or 1007 for invalid UTF-8) and a human ``reason``."""

    code: int
    reason: str


def is_valid_close_code(code: int) -> bool:
    """True for a code a peer may send (RFC 6455 7.4 and the IANA registry): 1000-1003,
    1007-1014, 3000-4999. 1004-1006 and 1015 are reserved, never sent on the wire."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def apply_mask(mask: bytes, data: bytes) -> bytes:
    """XOR ``data`` with the repeating 4-byte ``mask`` as one big-integer operation
    (masking and unmasking are the same operation)."""
    length = len(data)
    if not length:
        return b""
    key = mask * (length // 4) + mask[:length % 4]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
        length, "little")


def build_header(opcode: int, length: int, *, fin: bool = True, masked: bool = False) -> bytes:
    """The frame header up to (not including) the masking key, for a ``length``-byte payload."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 65536:
        return struct.pack("!BBH", first, mask_bit | 126, length)
    return struct.pack("!BBQ", first, mask_bit | 127, length)


def build_frame(opcode: int, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """One frame. ``mask=True`` for the client role (RFC 6455 5.3: clients mask every frame,
    with a fresh random key), ``mask=False`` for the server role."""
    head = build_header(opcode, len(payload), fin=fin, masked=mask)
    if not mask:
        return head + payload
    key = masking_keys(1)
    return head + key + apply_mask(key, payload)


def frame_bytes(payload_bytes: int, *, masked: bool = True) -> int:
    """Bytes a final frame carrying ``payload_bytes`` takes on the wire (masked: the
    client role, 4 bytes of key)."""
    key = 4 if masked else 0
    if payload_bytes < 126:
        return payload_bytes + 2 + key
    if payload_bytes < 65536:
        return payload_bytes + 4 + key
    return payload_bytes + 10 + key


def build_text_frames(messages: list[bytes], *, mask: bool) -> bytes:
    """Each bytes object of ``messages`` (UTF-8 text) as a final text frame, all in one
    bytes object for one ``sendall``; the masking keys come from ``masking_keys``."""
    if not mask:
        return b"".join([build_header(OP_TEXT, len(m)) + m for m in messages])
    keys = masking_keys(len(messages))
    return b"".join([
        _masked_text(m, keys[4 * i:4 * i + 4]) for i, m in enumerate(messages)])


#: bytes of randomness drawn from the OS at a time for masking keys (1,024 keys): one
#: getrandom call per 1,024 frames instead of one per write
_KEY_POOL_BYTES = 4096
_key_pool = b""


def masking_keys(count: int) -> bytes:
    """``count`` masking keys (4 bytes each) from the OS's CSPRNG (RFC 6455 5.3 asks for
    unpredictable keys), drawn ahead in blocks. Never yields: greenlets cannot interleave."""
    global _key_pool
    wanted = 4 * count
    if wanted > len(_key_pool):
        _key_pool += os.urandom(max(_KEY_POOL_BYTES, wanted))
    keys, _key_pool = _key_pool[:wanted], _key_pool[wanted:]
    return keys


def _masked_text(payload: bytes, key: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        head = bytes((0x81, 0x80 | length))
    elif length < 65536:
        head = _TEXT_16(0x81, 0xFE, length)
    else:
        head = _TEXT_64(0x81, 0xFF, length)
    return head + key + apply_mask(key, payload)


_TEXT_16 = struct.Struct("!BBH").pack
_TEXT_64 = struct.Struct("!BBQ").pack


def build_close_payload(code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
    """A close frame's payload: the 2-byte code, then the reason cut to fit 125 bytes
    (on a character boundary, so the reason stays valid UTF-8)."""
    if code == CLOSE_NO_STATUS:
        return b""
    encoded = reason.encode()[:MAX_CONTROL_PAYLOAD - 2]
    encoded = encoded.decode("utf-8", "ignore").encode()
    return struct.pack("!H", code) + encoded


def parse_close_payload(payload: bytes) -> Close | Violation:
    """The ``Close`` a close frame carries, or the ``Violation`` it commits (a 1-byte
    payload or an invalid code: 1002; a reason that is not UTF-8: 1007)."""
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        return Violation(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        return Violation(CLOSE_PROTOCOL_ERROR, f"close frame with invalid code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        return Violation(CLOSE_INVALID_DATA, "close frame with a reason that is not UTF-8")
    return Close(code, reason)
