"""The frame parser: bytes from one direction of one connection in, events out.

``Parser(role)`` reads what the peer of ``role`` sends: role ``"client"`` reads server
frames (which must not be masked), role ``"server"`` reads client frames (which must be).
``feed(data)`` returns the events of every complete frame held so far, as 2-tuples:

    ("text", bytes)          a complete text message, fragments joined, UTF-8 checked
                             as its bytes arrive (a bad byte fails before the message ends)
    ("binary", bytes)        a complete binary message, fragments joined
    ("oversize", int)        a message over ``max_message_bytes`` (its size so far); its
                             bytes are discarded as they arrive, never buffered
    ("ping", bytes) / ("pong", bytes)
    ("close", Close)         the peer's close frame (code 1005 when it carried none)
    ("violation", Violation) the peer broke RFC 6455; fail the connection with its code

After a close or a violation, ``feed`` returns nothing more. Checks are done once per
frame on the first two header bytes (RSV bits, opcode, mask bit), so a violation is
reported as soon as its header arrives, whatever follows.
"""

import codecs
from typing import Any

from .frames import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Violation,
    apply_mask,
    parse_close_payload,
)

ROLES = ("client", "server")
_DATA_KINDS = {OP_TEXT: "text", OP_BINARY: "binary"}
_CONTROL_KINDS = {OP_PING: "ping", OP_PONG: "pong"}
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
Event = tuple[str, Any]  # (kind, bytes | int | Close | Violation): see the module docstring


class Parser:
    """Parses the frames one peer sends; see the module docstring for the events.

    ``controls`` is the number of non-data events (ping, pong, close, violation) the last
    ``feed`` returned, so a caller can skip looking for them in a batch of pure data.
    """

    def __init__(self, role: str, max_message_bytes: int = 1 << 20) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.role = role
        self.max_message_bytes = max_message_bytes
        self.controls = 0
        self.done = False  # a close or a violation was returned: nothing more is parsed
        self._masked = 0x80 if role == "server" else 0  # the mask bit the peer must set
        self._buf = bytearray()
        self._skip_bytes = 0  # left of an oversize frame's payload to discard
        self._kind: str | None = None  # kind of the fragmented message in progress, if any
        self._message: Any = None  # its fragments so far (None while an oversize one is skipped)
        self._decoder: Any = None  # incremental UTF-8 check of a fragmented text message
        self._partial: Any = None  # [decoder, bytes checked] of an incomplete text frame

    @property
    def buffered_bytes(self) -> int:
        """Bytes held: an incomplete frame, plus the fragments of a message in progress."""
        return len(self._buf) + (len(self._message) if self._message is not None else 0)

    def feed(self, data: bytes) -> list[Event]:
        """The events of every frame completed by ``data`` (see the module docstring)."""
        self.controls = 0
        if self.done:
            return []
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos = self._frames(buf, events)
        del buf[:pos]
        if pos:  # the frame at the start of the buffer changed: its partial check too
            self._partial = None
        if self.done:
            buf.clear()
        return events

    def _frames(self, buf: bytearray, events: list[Event]) -> int:
        """Parse the whole frames at the start of ``buf`` into ``events``; -> the bytes
        consumed. A whole final text frame with a 7- or 16-bit length, outside a fragmented
        message (the hot path: a busy upstream sends nothing else), is parsed inline here:
        a method call per frame would cost more than the rest of its parsing. Any other
        frame goes through ``_frame``, which also reports what the fast path let through
        (a wrong mask bit, invalid UTF-8)."""
        pos, end = 0, len(buf)
        masked, max_bytes = self._masked, self.max_message_bytes
        key_bytes = 4 if masked else 0
        while pos < end:
            if buf[pos] == 0x81 and end - pos >= 4 and self._kind is None \
                    and not self._skip_bytes:
                second = buf[pos + 1] ^ masked  # the length, or >= 0x80 if the mask bit is wrong
                if second == 126:
                    length, start = (buf[pos + 2] << 8) | buf[pos + 3], pos + 4 + key_bytes
                else:
                    length, start = second, pos + 2 + key_bytes
                stop = start + length
                # a 64-bit length, a wrong mask bit, an oversize or incomplete frame: _frame's
                if second <= 126 and length <= max_bytes and stop <= end:
                    payload = bytes(buf[start:stop])
                    if masked:
                        payload = apply_mask(bytes(buf[start - 4:start]), payload)
                    if payload.isascii() or _is_utf8(payload):
                        events.append(("text", payload))
                        pos = stop
                        continue
            after = self._frame(buf, pos, end, events)
            if after == pos or self.done:
                return after
            pos = after
        return pos

    def _frame(self, buf: bytearray, pos: int, end: int, events: list[Event]) -> int:
        """Parse the frame at ``pos`` (or skip what is left of an oversize one); -> where
        the next frame starts, or ``pos`` itself when this one is incomplete or broke a
        rule (a violation is then in ``events`` and ``done`` is set)."""
        if self._skip_bytes:
            return self._skip(pos, end)
        header = self._header(buf, pos, end, events)
        if header is None:
            return pos
        opcode, fin, length, mask_at, head = header
        # what RFC 6455 lets come now: READ the payload, SKIP it (oversize) or STOP (violation)
        if opcode >= 8:
            ruling = self._admit_control(events, fin, length)
        elif self._kind is None:
            ruling = self._admit_first(events, opcode, fin, length)
        else:
            ruling = self._admit_continuation(events, opcode, fin, length)
        if ruling is _STOP:
            return pos
        if ruling is _SKIP:
            self._skip_bytes = length
            return pos + head
        if end - pos < head + length:  # incomplete: check the text so far (fail fast)
            if self._bad_text_so_far(opcode, buf, pos, head, mask_at, end):
                self._fail(events, _INVALID_TEXT)
            return pos
        payload = self._payload(buf, pos + mask_at, pos + head, length)
        self._frame_complete(events, opcode, fin, payload)
        return pos + head + length

    def _skip(self, pos: int, end: int) -> int:
        """Discard what has arrived of an oversize frame's payload, never buffering it."""
        taken = min(self._skip_bytes, end - pos)
        self._skip_bytes -= taken
        return pos + taken

    # -- headers -------------------------------------------------------------------------

    def _header(self, buf: bytearray, pos: int, end: int, events: list[Event]
                ) -> tuple[int, int, int, int, int] | None:
        """``(opcode, fin, payload length, masking key offset, header bytes)`` of the frame
        at ``pos``, offsets from ``pos``; None when the header is incomplete or breaks a
        rule (then with a violation in ``events``). The first two bytes are checked as soon
        as they arrive, whatever follows."""
        if end - pos < 2:
            return None
        first, second = buf[pos], buf[pos + 1]
        opcode = first & 0x0F
        if first & 0x70 or (second & 0x80) != self._masked or opcode in _RESERVED:
            self._fail(events, self._header_violation(first, opcode))
            return None
        length, mask_at = second & 0x7F, 2
        if length == 126:
            if end - pos < 4:
                return None
            length, mask_at = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
        elif length == 127:
            if end - pos < 10:
                return None
            length, mask_at = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if length >> 63:
                self._fail(events, Violation(CLOSE_PROTOCOL_ERROR, "64-bit length with MSB set"))
                return None
        head = mask_at + 4 if self._masked else mask_at
        if end - pos < head:
            return None
        return opcode, first & 0x80, length, mask_at, head

    def _admit_control(self, events: list[Event], fin: int, length: int) -> object:
        """Control frames may come anywhere, but whole and with at most 125 bytes; ->
        ``_READ`` or ``_STOP`` (with the violation in ``events``)."""
        if fin and length <= MAX_CONTROL_PAYLOAD:
            return _READ
        self._fail(events, Violation(
            CLOSE_PROTOCOL_ERROR, "fragmented control frame" if not fin
            else f"control frame with a {length}-byte payload"))
        return _STOP

    def _admit_first(self, events: list[Event], opcode: int, fin: int, length: int) -> object:
        """The first frame of a message: text or binary, not a continuation; -> ``_READ``,
        ``_SKIP`` (over ``max_message_bytes``: reported, then discarded) or ``_STOP``."""
        if opcode == OP_CONTINUATION:
            self._fail(events, Violation(
                CLOSE_PROTOCOL_ERROR, "continuation frame with nothing to continue"))
            return _STOP
        if length > self.max_message_bytes:
            self._oversize(events, length, fin)
            return _SKIP
        return _READ

    def _admit_continuation(self, events: list[Event], opcode: int, fin: int, length: int
                            ) -> object:
        """Inside a fragmented message only continuations may come; the rest of an
        oversize message is discarded (``_SKIP``), and a message growing over the limit
        becomes one."""
        if opcode != OP_CONTINUATION:
            self._fail(events, Violation(
                CLOSE_PROTOCOL_ERROR, "new data frame inside a fragmented message"))
            return _STOP
        if self._message is None:  # the rest of an oversize message
            if fin:
                self._kind = None
            return _SKIP
        if len(self._message) + length > self.max_message_bytes:
            self._oversize(events, length, fin)
            return _SKIP
        return _READ

    # -- complete frames -----------------------------------------------------------------

    def _payload(self, buf: bytearray, key_at: int, start: int, length: int) -> bytes:
        """The ``length``-byte payload at ``start``, unmasked with the key at ``key_at``
        when the peer masks (the key sits just before the payload)."""
        payload = bytes(buf[start:start + length])
        if self._masked:
            payload = apply_mask(bytes(buf[key_at:start]), payload)
        return payload

    def _frame_complete(self, events: list[Event], opcode: int, fin: int, payload: bytes
                        ) -> None:
        if opcode == OP_TEXT and fin:  # one whole text message
            if payload.isascii() or _is_utf8(payload):
                events.append(("text", payload))
            else:
                self._fail(events, _INVALID_TEXT)
        elif opcode >= 8:
            self._control(events, opcode, payload)
        else:
            self._fragment(events, opcode, payload, fin)

    # -- data frames ---------------------------------------------------------------------

    def _oversize(self, events, length, fin):
        so_far = len(self._message) if self._message is not None else 0
        events.append(("oversize", so_far + length))
        self._message = self._decoder = None
        self._kind = None if fin else "oversize"

    def _fragment(self, events, opcode, payload, fin):
        if opcode != OP_CONTINUATION:  # the first frame of a message
            self._kind = _DATA_KINDS[opcode]
            if self._kind == "text" and not fin:
                self._decoder = _Utf8Decoder()
            if fin:
                events.append((self._kind, payload))
                self._kind = None
                return
            self._message = bytearray()
        if self._decoder is not None and not self._utf8_so_far(payload, fin):
            self._fail(events, _INVALID_TEXT)
            return
        self._message += payload
        if fin:
            events.append((self._kind, bytes(self._message)))
            self._kind = self._message = self._decoder = None

    def _utf8_so_far(self, payload, fin):
        """Fail fast: a fragment that cannot start valid UTF-8 fails before the message ends."""
        try:
            self._decoder.decode(payload, bool(fin))
        except UnicodeDecodeError:
            return False
        return True

    def _bad_text_so_far(self, opcode, buf, pos, head, mask_at, end):
        """True when the part received of an incomplete text frame cannot be valid UTF-8,
        so a bad byte fails the connection before the frame ends. Each byte is checked once
        here (the whole frame is checked again once complete)."""
        if opcode != OP_TEXT and (opcode != OP_CONTINUATION or self._decoder is None):
            return False
        if pos or self._partial is None:  # a frame not seen before (the last feed's is at 0)
            decoder = _Utf8Decoder()
            if self._decoder is not None:  # a continuation: start where the message is
                decoder.setstate(self._decoder.getstate())
            self._partial = [decoder, 0]
        decoder, checked = self._partial
        chunk = bytes(buf[pos + head + checked:end])
        if not chunk:
            return False
        if self._masked:
            turn = checked % 4  # the key as it lines up with the first unchecked byte
            key = bytes(buf[pos + mask_at:pos + head])
            chunk = apply_mask(key[turn:] + key[:turn], chunk)
        self._partial[1] = checked + len(chunk)
        try:
            decoder.decode(chunk, False)
        except UnicodeDecodeError:
            return True
        return False

    # -- control frames ------------------------------------------------------------------

    def _control(self, events, opcode, payload):
        self.controls += 1
        if opcode == OP_CLOSE:
            close = parse_close_payload(payload)
            if isinstance(close, Violation):
                self._fail(events, close)
            else:
                events.append(("close", close))
                self.done = True
        else:
            events.append((_CONTROL_KINDS[opcode], payload))

    # -- violations ----------------------------------------------------------------------

    def _header_violation(self, first: int, opcode: int) -> Violation:
        """The rule the first header byte (``first``, its ``opcode``) or the mask bit broke."""
        if first & 0x70:
            return Violation(CLOSE_PROTOCOL_ERROR, "RSV bits set without a negotiated extension")
        if opcode in _RESERVED:
            return Violation(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        if self._masked:
            return Violation(CLOSE_PROTOCOL_ERROR, "unmasked frame from a client")
        return Violation(CLOSE_PROTOCOL_ERROR, "masked frame from a server")

    def _fail(self, events, violation):
        self.controls += 1
        events.append(("violation", violation))
        self.done = True
        self._message = self._decoder = None


_RESERVED = frozenset(range(16)) - {OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING,
                                    OP_PONG}
_READ, _SKIP, _STOP = object(), object(), object()  # what _admit_* rule for a frame
_INVALID_TEXT = Violation(CLOSE_INVALID_DATA, "text message that is not valid UTF-8")


def _is_utf8(payload):
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True
