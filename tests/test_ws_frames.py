"""The sans-I/O frame layer: pure bytes in, events out, for both roles (no sockets)."""

import struct

import pytest

from exrate_green import ws
from exrate_green.ws import Close, Parser, Violation

PEER_MASKS = {"client": False, "server": True}  # what the peer of each role sends


def frame(role, opcode, payload, fin=True):
    """A frame as the peer of ``role`` sends it (clients mask, servers do not)."""
    return ws.build_frame(opcode, payload, mask=PEER_MASKS[role], fin=fin)


def raw(first, payload=b"", *, masked=False, length=None):
    """A hand-made frame: ``first`` header byte as given, for rules build_frame keeps."""
    length = len(payload) if length is None else length
    if masked:
        key = b"\x01\x02\x03\x04"
        return bytes((first, 0x80 | length)) + key + ws.apply_mask(key, payload)
    return bytes((first, length)) + payload


def violation_of(events):
    assert events[-1][0] == "violation", events
    return events[-1][1]


BOTH = pytest.mark.parametrize("role", ["client", "server"])


# -- building and round trips -----------------------------------------------------------

@BOTH
@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_a_frame_built_for_a_role_parses_back_for_its_peer(role, size):
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    parser = Parser(role, max_message_bytes=1 << 20)
    assert parser.feed(frame(role, ws.OP_BINARY, payload)) == [("binary", payload)]


def test_masking_twice_with_the_same_key_gives_the_data_back():
    key, data = b"\x9a\x01\xff\x3c", bytes(range(256)) * 3 + b"abc"
    masked = ws.apply_mask(key, data)
    assert masked != data
    assert ws.apply_mask(key, masked) == data
    assert masked[:4] == bytes(d ^ k for d, k in zip(data[:4], key))


def test_a_client_frame_is_masked_and_a_server_frame_is_not():
    assert ws.build_frame(ws.OP_TEXT, b"hi", mask=True)[1] & 0x80
    assert ws.build_frame(ws.OP_TEXT, b"hi", mask=False) == b"\x81\x02hi"


@BOTH
def test_a_batch_of_text_frames_parses_into_the_same_messages(role):
    messages = [b"x" * n for n in (0, 5, 125, 126, 300, 70_000)]
    data = ws.build_text_frames(messages, mask=PEER_MASKS[role])
    assert Parser(role).feed(data) == [("text", m) for m in messages]


@BOTH
def test_frames_split_at_every_byte_still_parse(role):
    data = frame(role, ws.OP_TEXT, "héllo".encode()) + frame(role, ws.OP_PING, b"p")
    parser, events = Parser(role), []
    for i in range(len(data)):
        events += parser.feed(data[i:i + 1])
    assert events == [("text", "héllo".encode()), ("ping", b"p")]


def test_a_close_payload_is_cut_on_a_character_boundary():
    payload = ws.build_close_payload(1001, "é" * 200)
    assert len(payload) <= 125
    assert ws.parse_close_payload(payload) == Close(1001, "é" * 61)


# -- fragmentation ----------------------------------------------------------------------

@BOTH
def test_fragments_are_joined_into_one_message(role):
    data = (frame(role, ws.OP_TEXT, b"one ", fin=False)
            + frame(role, ws.OP_CONTINUATION, b"two ", fin=False)
            + frame(role, ws.OP_CONTINUATION, b"three"))
    assert Parser(role).feed(data) == [("text", b"one two three")]


@BOTH
def test_control_frames_between_fragments_come_out_first(role):
    data = (frame(role, ws.OP_BINARY, b"\x00\x01", fin=False)
            + frame(role, ws.OP_PING, b"ping")
            + frame(role, ws.OP_PONG, b"")
            + frame(role, ws.OP_CONTINUATION, b"\x02"))
    assert Parser(role).feed(data) == [("ping", b"ping"), ("pong", b""),
                                       ("binary", b"\x00\x01\x02")]


def test_a_character_split_across_fragments_is_valid_utf8():
    euro = "€".encode()
    data = (frame("client", ws.OP_TEXT, euro[:1], fin=False)
            + frame("client", ws.OP_CONTINUATION, euro[1:2], fin=False)
            + frame("client", ws.OP_CONTINUATION, euro[2:]))
    assert Parser("client").feed(data) == [("text", euro)]


def test_invalid_utf8_in_a_first_fragment_fails_before_the_message_ends():
    parser = Parser("client")
    events = parser.feed(frame("client", ws.OP_TEXT, b"ok \xff", fin=False))
    assert violation_of(events).code == ws.CLOSE_INVALID_DATA


def test_a_message_ending_inside_a_character_is_invalid_utf8():
    data = (frame("client", ws.OP_TEXT, b"a", fin=False)
            + frame("client", ws.OP_CONTINUATION, "€".encode()[:2]))
    assert violation_of(Parser("client").feed(data)).code == 1007


# -- violations -------------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10])
def test_an_rsv_bit_is_a_protocol_error(role, rsv):
    data = raw(0x81 | rsv, b"hi", masked=PEER_MASKS[role])
    assert violation_of(Parser(role).feed(data)).code == 1002


@BOTH
@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_a_reserved_opcode_is_a_protocol_error(role, opcode):
    violation = violation_of(Parser(role).feed(raw(0x80 | opcode, masked=PEER_MASKS[role])))
    assert violation == Violation(1002, f"reserved opcode {opcode:#x}")


@BOTH
def test_a_fragmented_control_frame_is_a_protocol_error(role):
    data = raw(ws.OP_PING, b"p", masked=PEER_MASKS[role])  # FIN clear
    assert violation_of(Parser(role).feed(data)) == Violation(1002, "fragmented control frame")


@BOTH
def test_a_control_frame_over_125_bytes_is_a_protocol_error(role):
    data = ws.build_header(ws.OP_PING, 126, masked=PEER_MASKS[role])
    # the header alone is enough: the payload is never waited for
    events = Parser(role).feed(data + (b"\0\0\0\0" if PEER_MASKS[role] else b""))
    assert violation_of(events).code == 1002


@BOTH
def test_a_continuation_with_nothing_to_continue_is_a_protocol_error(role):
    events = Parser(role).feed(frame(role, ws.OP_CONTINUATION, b"x"))
    assert violation_of(events) == Violation(1002, "continuation frame with nothing to continue")


@BOTH
def test_a_new_data_frame_inside_a_fragmented_message_is_a_protocol_error(role):
    data = frame(role, ws.OP_TEXT, b"a", fin=False) + frame(role, ws.OP_TEXT, b"b")
    events = Parser(role).feed(data)
    assert violation_of(events) == Violation(1002, "new data frame inside a fragmented message")


def test_a_masked_server_frame_is_a_protocol_error():
    events = Parser("client").feed(raw(0x81, b"hi", masked=True))
    assert violation_of(events) == Violation(1002, "masked frame from a server")


def test_an_unmasked_client_frame_is_a_protocol_error():
    events = Parser("server").feed(raw(0x81, b"hi"))
    assert violation_of(events) == Violation(1002, "unmasked frame from a client")


@BOTH
def test_invalid_utf8_in_a_text_message_is_invalid_data(role):
    events = Parser(role).feed(frame(role, ws.OP_TEXT, b"caf\xc3"))
    assert violation_of(events).code == ws.CLOSE_INVALID_DATA


@BOTH
def test_a_64_bit_length_with_its_top_bit_set_is_a_protocol_error(role):
    data = struct.pack("!BBQ", 0x82, 0x7F | (0x80 if PEER_MASKS[role] else 0), 1 << 63)
    assert violation_of(Parser(role).feed(data + b"\0" * 4)).code == 1002


# -- close frames -----------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                  1012, 1013, 1014, 3000, 3999, 4000, 4999])
def test_a_close_frame_with_a_valid_code_is_a_close(role, code):
    events = Parser(role).feed(frame(role, ws.OP_CLOSE, ws.build_close_payload(code, "bye")))
    assert events == [("close", Close(code, "bye"))]


@BOTH
@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999,
                                  5000, 65535])
def test_a_close_frame_with_an_invalid_code_is_a_protocol_error(role, code):
    events = Parser(role).feed(frame(role, ws.OP_CLOSE, struct.pack("!H", code)))
    assert violation_of(events) == Violation(1002, f"close frame with invalid code {code}")


@BOTH
def test_an_empty_close_frame_means_no_status(role):
    assert Parser(role).feed(frame(role, ws.OP_CLOSE, b"")) == [("close", Close(1005, ""))]


@BOTH
def test_a_one_byte_close_payload_is_a_protocol_error(role):
    events = Parser(role).feed(frame(role, ws.OP_CLOSE, b"\x03"))
    assert violation_of(events) == Violation(1002, "close frame with a 1-byte payload")


@BOTH
def test_a_close_reason_that_is_not_utf8_is_invalid_data(role):
    events = Parser(role).feed(frame(role, ws.OP_CLOSE, b"\x03\xe8\xff\xfe"))
    assert violation_of(events).code == 1007


@BOTH
def test_nothing_is_parsed_after_a_close_or_a_violation(role):
    text = frame(role, ws.OP_TEXT, b"after")
    closing = Parser(role)
    assert closing.feed(frame(role, ws.OP_TEXT, b"before") + frame(role, ws.OP_CLOSE, b"")
                        + text) == [("text", b"before"), ("close", Close(1005, ""))]
    assert closing.feed(text) == [] and closing.done
    failing = Parser(role)
    events = failing.feed(frame(role, ws.OP_TEXT, b"before")
                          + frame(role, ws.OP_CONTINUATION, b"x") + text)
    assert events[0] == ("text", b"before") and len(events) == 2
    assert failing.feed(text) == [] and failing.buffered_bytes == 0


# -- oversize ---------------------------------------------------------------------------

@BOTH
def test_an_oversize_message_is_discarded_as_it_arrives_never_buffered(role):
    limit = 1 << 20
    parser = Parser(role, max_message_bytes=limit)
    data = frame(role, ws.OP_TEXT, b"a" * (3 << 20)) + frame(role, ws.OP_TEXT, b"next")
    events, most_held = [], 0
    for at in range(0, len(data), 64 * 1024):
        events += parser.feed(data[at:at + 64 * 1024])
        most_held = max(most_held, parser.buffered_bytes)
    assert events == [("oversize", 3 << 20), ("text", b"next")]
    assert most_held < 64 * 1024 + 14


@BOTH
def test_an_oversize_fragmented_message_is_discarded_to_its_last_fragment(role):
    parser = Parser(role, max_message_bytes=1000)
    data = (frame(role, ws.OP_BINARY, b"a" * 600, fin=False)
            + frame(role, ws.OP_CONTINUATION, b"b" * 600, fin=False)
            + frame(role, ws.OP_PING, b"still here")
            + frame(role, ws.OP_CONTINUATION, b"c" * 600)
            + frame(role, ws.OP_BINARY, b"ok"))
    events = []
    for at in range(0, len(data), 100):
        events += parser.feed(data[at:at + 100])
        assert parser.buffered_bytes < 800
    assert events == [("oversize", 1200), ("ping", b"still here"), ("binary", b"ok")]


def test_a_new_message_inside_a_discarded_oversize_one_is_still_a_protocol_error():
    parser = Parser("client", max_message_bytes=10)
    data = frame("client", ws.OP_TEXT, b"a" * 20, fin=False) + frame("client", ws.OP_TEXT, b"b")
    events = parser.feed(data)
    assert events[0] == ("oversize", 20)
    assert violation_of(events).code == 1002


def test_controls_counts_the_non_data_events_of_the_last_feed():
    parser = Parser("client")
    parser.feed(frame("client", ws.OP_TEXT, b"a") + frame("client", ws.OP_PING, b""))
    assert parser.controls == 1
    parser.feed(frame("client", ws.OP_TEXT, b"b"))
    assert parser.controls == 0


def test_an_unknown_role_is_refused():
    with pytest.raises(ValueError):
        Parser("proxy")


# -- fail fast on text that has not all arrived -------------------------------------------

@BOTH
def test_invalid_utf8_fails_before_the_rest_of_its_frame_arrives(role):
    data = frame(role, ws.OP_TEXT, b"valid start \xf0\x28 then" + b" more" * 1000)
    parser = Parser(role)
    events = parser.feed(data[:40])  # the header, the bad bytes, not the rest
    assert violation_of(events).code == 1007


@BOTH
def test_invalid_utf8_fails_before_a_continuation_frame_ends(role):
    first = frame(role, ws.OP_TEXT, b"caf" + "é".encode()[:1], fin=False)
    rest = frame(role, ws.OP_CONTINUATION, b"\x41" + b"x" * 500)  # \xc3 then A: invalid
    parser = Parser(role)
    assert parser.feed(first) == []
    assert violation_of(parser.feed(rest[:20])).code == 1007


@BOTH
def test_valid_text_fed_in_every_split_is_delivered_whole(role):
    text = ("€uro ünïcödé 𝄞 " * 20).encode()
    data = (frame(role, ws.OP_TEXT, text[:7], fin=False)
            + frame(role, ws.OP_CONTINUATION, text[7:]) + frame(role, ws.OP_TEXT, text))
    for step in (1, 2, 3, 5, 7, 64):
        parser, events = Parser(role), []
        for at in range(0, len(data), step):
            events += parser.feed(data[at:at + step])
        assert events == [("text", text), ("text", text)], step


def test_a_frame_started_in_the_same_feed_as_the_last_one_ended_is_checked_afresh():
    ends_mid_character = frame("client", ws.OP_TEXT, "né".encode())
    next_text = frame("client", ws.OP_TEXT, b"ok" * 100)
    parser = Parser("client")
    cut = len(ends_mid_character) - 1  # the partial check holds half of "é"
    assert parser.feed(ends_mid_character[:cut]) == []
    events = parser.feed(ends_mid_character[cut:] + next_text[:10])
    assert events == [("text", "né".encode())]
    assert parser.feed(next_text[10:]) == [("text", b"ok" * 100)]


def test_a_frame_starting_a_feed_after_one_completed_exactly_is_checked_afresh():
    ends_mid_character = frame("client", ws.OP_TEXT, "né".encode())
    next_text = frame("client", ws.OP_TEXT, b"ok" * 100)
    parser = Parser("client")
    cut = len(ends_mid_character) - 1
    assert parser.feed(ends_mid_character[:cut]) == []
    assert parser.feed(ends_mid_character[cut:]) == [("text", "né".encode())]
    assert parser.feed(next_text[:10]) == []
    assert parser.feed(next_text[10:]) == [("text", b"ok" * 100)]
