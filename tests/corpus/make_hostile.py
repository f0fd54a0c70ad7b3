"""Writes hostile.jsonl, the corpus of malformed messages replayed by tests/test_hostile_wire.py.

Run once (``python tests/corpus/make_hostile.py``) and commit the output; the corpus is
then fixed, and reviewed like code: each line says what the service must do with the frame.

One JSON object per line:

* ``name``: unique, says what is hostile about it;
* the frame: ``kind`` is ``text`` (a text frame) or ``binary`` (a binary frame) whose bytes
  are ``text`` (UTF-8), ``b64`` (base64), or ``build`` = [prefix, unit, count, suffix] for
  the big ones, which are ``prefix + unit * count + suffix`` (so the corpus stays small
  while frames reach 1-2 MiB); or ``kind`` is ``wire``: ``frames`` lists hand-made frames
  written to the socket as they are (fragments, control frames, reserved opcodes), each
  {opcode, fin, rsv, mask (4 bytes, base64, or null), length_form (null: the shortest
  length encoding; 16 or 64 force that one)} plus its payload as above, the whole list
  sent ``repeat`` times (default 1);
* ``id``: the request id the frame carries and must be answered on, or null: then the
  frame must get no reply at all (it is logged and skipped, or is a heartbeat or a
  control frame);
* ``reply``: ``"message"`` or ``"error"`` (the reply's type) when ``id`` is set;
* ``why``: optional, a substring the error reply's reason must contain.
"""

import base64
import json
from pathlib import Path

OUT = Path(__file__).with_name("hostile.jsonl")

VALID = {"marketId": 123456, "selectionId": 987654, "odds": 2.2, "stake": 253.67,
         "currency": "USD", "date": "2021-05-18T21:32:42.324Z"}
VALID_TEXT = json.dumps(VALID, separators=(",", ":"))

entries = []
_next_id = [9_100_000]


def new_id():
    _next_id[0] += 1
    return _next_id[0]


def bytes_spec(text=None, data=None, build=None):
    if text is not None:
        return {"text": text}
    if data is not None:
        return {"b64": base64.b64encode(data).decode()}
    return {"build": build}


def add(name, *, text=None, data=None, build=None, frames=None, kind="text", id=None, reply=None,
        why=None):
    entry = {"name": name, "kind": kind}
    if frames is not None:
        entry["frames"] = frames
    else:
        entry.update(bytes_spec(text, data, build))
    entry["id"] = id
    if id is not None:
        assert reply in ("message", "error"), name
        entry["reply"] = reply
    if why:
        entry["why"] = why
    entries.append(entry)


def request_text(rid, payload_text):
    return '{"type":"message","id":' + json.dumps(rid) + ',"payload":' + payload_text + "}"


def payload(**changes):
    body = dict(VALID)
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()


def with_field(name, raw_json):
    """The valid payload's text with field ``name`` set to the raw JSON text ``raw_json``."""
    body = {k: json.dumps(v) for k, v in VALID.items()}
    body[name] = raw_json
    return "{" + ",".join(f'"{k}":{v}' for k, v in body.items()) + "}"


def ws_frame(opcode, payload=b"", fin=True, mask=None, rsv=0, length_form=None, build=None):
    """A hand-made server-to-client frame, as a corpus spec (see the module docstring)."""
    frame = {"opcode": opcode, "fin": fin, "rsv": rsv,
             "mask": base64.b64encode(mask).decode() if mask else None, "length_form": length_form}
    frame.update(bytes_spec(build=build) if build else
                 bytes_spec(text=payload.decode()) if payload.isascii() else bytes_spec(data=payload))
    return frame


# --- A. not JSON, not an object, no readable id: no reply --------------------------------

for i, text in enumerate([
        "", " ", "\n", "not json", "{", "}", "[", "]", "[1,2]", "null", "true", "false", "0",
        "-1", "1e999", '"heartbeat"', '{"type":"heartbeat"', "{'type':'message','id':1}",
        "{type:\"message\",id:2}", "None", "True", "NaN", "Infinity", "[]" * 10, "{}",
        '{"":""}', '{"type":null}', '{"type":"HEARTBEAT"}', '{"type":"heartbeat "}',
        "\u0000\u0001\u0002", "\ufeff" + request_text(17, VALID_TEXT),
        "// a comment\n" + request_text(18, VALID_TEXT),
        "/* c */" + request_text(19, VALID_TEXT),
        request_text(20, VALID_TEXT) + "garbage",
        request_text(21, VALID_TEXT) + request_text(22, VALID_TEXT),
        request_text(23, VALID_TEXT)[:-1] + ",}",
        '{"type":"message","id":24 "payload":' + VALID_TEXT + "}",
        '{"type":"message","id":0x19,"payload":' + VALID_TEXT + "}",
        '{"type":"message","id":007,"payload":' + VALID_TEXT + "}",
        '{"type":"message","id":+8,"payload":' + VALID_TEXT + "}",
        '{"type":"message","id":.5,"payload":' + VALID_TEXT + "}",
        '{"type":"message","id":1,"payload":{"currency":"US\nD"}}',
        '{"type":"message","id":1,"payload":{"currency":"US\tD"}}',
        '{"type":"message","id":1,"payload":{"currency":"\\x55SD"}}',
        '{"type":"message","id":1,"payload":{"currency":"\\u00"}}',
        ]):
    add(f"not-json-or-no-id-{i:02d}", text=text)

full = request_text(25, VALID_TEXT)
for cut in range(1, len(full), max(1, len(full) // 25)):
    add(f"truncated-at-{cut:03d}", text=full[:cut])

for i, data in enumerate([
        b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
        b"\xf8\x88\x80\x80\x80", b"\x80", b'{"type":"message","id":26,"payload":{"currency":"\xff"}}',
        b'{"type":"message","id":27,"payload":{"currency":"\xe2\x82"}}',
        b'{"type":"message","id":28,"payload":{"currency":"\xed\xa0\x80SD"}}',
        b'{"type":"message","id":29\xff,"payload":{}}']):
    add(f"invalid-utf8-{i:02d}", data=data)

# Heartbeats, however decorated, are never answered.
for i, text in enumerate(['{"type":"heartbeat","id":30}', '{"type":"heartbeat","payload":{}}',
                          '{"type":"heartbeat","extra":[1,{"a":null}]}',
                          '{"id":31,"type":"heartbeat"}', '{"type":"heartbeat","type":"heartbeat"}',
                          '{"type":"message","type":"heartbeat","id":32}']):
    add(f"heartbeat-variant-{i}", text=text)

# Ids that cannot be read: no reply.
for i, rid_text in enumerate(["null", "true", "false", "1.5", "1e3", "-0.0", "[1]", '{"a":1}',
                              json.dumps("x" * 101), "18446744073709551616",
                              "-9223372036854775809", "123456789012345678901234567890",
                              '"\\ud800"', '"id-\\udfff"', "1E400"]):
    add(f"unreadable-id-{i:02d}", text='{"type":"message","id":' + rid_text + ',"payload":' + VALID_TEXT + "}")
add("unreadable-id-big-int-lenient",
    text='{"type":"message","id":123456789012345678901234567890,"payload":' + with_field("stake", "NaN") + "}")
add("unreadable-id-surrogate-lenient",
    text='{"type":"message","id":"\\ud800","payload":' + with_field("stake", "NaN") + "}")
add("no-id-at-all", text='{"type":"message","payload":' + VALID_TEXT + "}")
add("no-id-no-type", text='{"payload":' + VALID_TEXT + "}")

# --- B. a readable id: exactly one reply ---------------------------------------------------

for i, kind in enumerate(['"unknown"', '""', "1", "null", '"Message"', '"error"', '"reply"',
                          '["message"]', '{"t":1}', '"message\\u0000"']):
    rid = new_id()
    add(f"unknown-type-{i}", text='{"type":' + kind + ',"id":' + str(rid) + "}", id=rid,
        reply="error", why="type")
rid = new_id()
add("type-missing", text='{"id":' + str(rid) + ',"payload":' + VALID_TEXT + "}", id=rid,
    reply="error", why="unknown message type")

for i, raw in enumerate(["null", "[]", '"oops"', "1", "true", "[" + VALID_TEXT + "]"]):
    rid = new_id()
    add(f"payload-not-object-{i}", text=request_text(rid, raw), id=rid, reply="error", why="payload")
rid = new_id()
add("payload-missing", text='{"type":"message","id":' + str(rid) + "}", id=rid, reply="error",
    why="missing field 'payload'")

STAKES = [("missing", None, "missing field 'stake'"), ("null", "null", "missing field 'stake'"),
          ("string", '"12"', "stake must be a number"), ("empty-string", '""', "stake must be a number"),
          ("bool", "true", "stake must be a number"), ("list", "[12]", "stake must be a number"),
          ("object", '{"v":12}', "stake must be a number"), ("negative", "-1", "negative"),
          ("tiny-negative", "-0.00001", "negative"), ("too-big", "1e13", "exceed"),
          ("huge", "1e999", "exceed"), ("huge-negative", "-1e999", "negative"),
          ("nan", "NaN", "finite"), ("infinity", "Infinity", "finite"),
          ("minus-infinity", "-Infinity", "finite"), ("big-int", "1" + "0" * 30, "exceed"),
          ("exponent-overflow", "1e999999999", "exceed")]
for name, raw, why in STAKES:
    rid = new_id()
    body = VALID_TEXT.replace('"stake":253.67,', "") if raw is None else with_field("stake", raw)
    add(f"stake-{name}", text=request_text(rid, body), id=rid, reply="error", why=why)

CURRENCIES = [("missing", None, "missing field 'currency'"), ("null", "null", "missing field"),
              ("empty", '""', "invalid currency"), ("number", "978", "currency must be a string"),
              ("two-letters", '"US"', "invalid currency"), ("four-letters", '"USDD"', "invalid currency"),
              ("dollar-sign", '"U$D"', "invalid currency"), ("path", '"../"', "invalid currency"),
              ("space", '"US D"', "invalid currency"), ("fullwidth", '"\uff35\uff33\uff24"', "invalid currency"),
              ("query", '"USD?access_key=x"', "invalid currency"), ("percent", '"%55SD"', "invalid currency"),
              ("nul", '"USD\\u0000"', "invalid currency"), ("rtl-override", '"\\u202eDSU"', "invalid currency"),
              ("emoji", '"\ud83d\udcb5\ud83d\udcb5\ud83d\udcb5"', "invalid currency"),
              ("newline", '"USD\\n"', "invalid currency"), ("slash", '"U/D"', "invalid currency"),
              ("url", '"http://x"', "invalid currency"), ("list", '["USD"]', "currency must be a string"),
              ("long", json.dumps("U" * 1000), "invalid currency"),
              ("not-ecb", '"ZWL"', "unsupported currency 'ZWL'"),
              ("unknown-code", '"XXX"', "unsupported currency"), ("crypto", '"BTC"', "unsupported currency"),
              ("sharp-s", '"u\u00df"', "unsupported currency"),
              ("lone-surrogate-lenient", '"\\ud800SD"', "")]
for name, raw, why in CURRENCIES:
    rid = new_id()
    if raw is None:
        body = VALID_TEXT.replace('"currency":"USD",', "")
    elif name == "lone-surrogate-lenient":  # NaN elsewhere sends it down the lenient path
        body = with_field("currency", raw).replace('"odds":2.2', '"odds":NaN')
    else:
        body = with_field("currency", raw)
    add(f"currency-{name}", text=request_text(rid, body), id=rid, reply="error", why=why)

DATES = [("missing", None, "missing field 'date'"), ("null", "null", "missing field"),
         ("number", "20210518", "date must be a string"), ("empty", '""', "invalid date"),
         ("word", '"yesterday"', "invalid date"), ("month-13", '"2021-13-45"', "invalid date"),
         ("feb-30", '"2021-02-30"', "invalid date"), ("hour-25", '"2021-05-18T25:00:00Z"', "invalid date"),
         ("before-ecb", '"1998-12-31T10:00:00Z"', "before 1999-01-04"),
         ("year-1", '"0001-01-01"', "before 1999-01-04"), ("year-9999", '"9999-12-31"', "future"),
         ("year-2100", '"2100-01-01T00:00:00Z"', "future"), ("trailing-space", '"2021-05-18 "', "invalid date"),
         ("leading-space", '" 2021-05-18"', "invalid date"),
         ("path", '"2021-05-18/../../etc/passwd"', "invalid date"),
         ("query", '"2021-05-18?access_key=x"', "invalid date"),
         ("bad-offset", '"2021-05-18T21:32:42.324+99:00"', "invalid date"),
         ("too-long", json.dumps("2021-05-18T21:32:42.324000000000000000000000Z"), "invalid date"),
         ("fullwidth-digits", '"\uff12\uff10\uff12\uff11-05-18"', "invalid date"),
         ("nul", '"2021-05-18\\u0000"', "invalid date"), ("list", '["2021-05-18"]', "date must be a string"),
         ("object", '{"y":2021}', "date must be a string"), ("huge", json.dumps("9" * 1000), "invalid date"),
         ("sql", "\"2021-05-18'; DROP TABLE rates;--\"", "invalid date")]
for name, raw, why in DATES:
    rid = new_id()
    body = (VALID_TEXT.replace(',"date":"2021-05-18T21:32:42.324Z"', "") if raw is None
            else with_field("date", raw))
    add(f"date-{name}", text=request_text(rid, body), id=rid, reply="error", why=why)

# Strange but servable: answered with a conversion.
for name, body in [
        ("currency-lower-case", with_field("currency", '"usd"')),
        ("date-iso-week", with_field("date", '"2021-W20-2"')),
        ("date-basic-format", with_field("date", '"20210518"')),
        ("date-offset", with_field("date", '"2021-05-18T23:30:00+02:00"')),
        ("stake-zero", with_field("stake", "0")),
        ("stake-integer", with_field("stake", "253")),
        ("stake-exponent", with_field("stake", "2.5367e2")),
        ("stake-underflow", with_field("stake", "1e-400")),
        ("stake-max", with_field("stake", "1e12")),
        ("extra-fields", VALID_TEXT[:-1] + ',"x":[1,{"y":null}],"\\u202e":"\\u0000","emoji":"\ud83d\ude42"}'),
        ("extra-nested-200", VALID_TEXT[:-1] + ',"x":' + "[" * 200 + "]" * 200 + "}"),
        ("extra-big-int", VALID_TEXT[:-1] + ',"x":123456789012345678901234567890}'),
        ("many-keys", VALID_TEXT[:-1] + "," + ",".join(f'"k{i}":{i}' for i in range(500)) + "}"),
        ("duplicate-stake-key", VALID_TEXT[:-1] + ',"stake":10}'),
        ("market-id-string", with_field("marketId", '"123456"')),
        ("odds-missing", VALID_TEXT.replace('"odds":2.2,', "")),
        ("eur-stake", with_field("currency", '"EUR"'))]:
    rid = new_id()
    add(f"servable-{name}", text=request_text(rid, body), id=rid, reply="message")

for name, rid in [("zero", 0), ("negative", -1), ("int64-max", 2 ** 63 - 1), ("int64-min", -2 ** 63),
                  ("uint64-max", 2 ** 64 - 1), ("empty-string", ""), ("string-100", "i" * 100),
                  ("emoji", "\U0001f642"), ("quote", 'a"b\\c'), ("nul", "\x00"),
                  ("json-in-string", '{"id":1}')]:
    add(f"servable-id-{name}", text=request_text(rid, VALID_TEXT), id=rid, reply="message")
rid = new_id()
add("duplicate-id-key-last-wins", text='{"type":"message","id":1,"id":' + str(rid) + ',"payload":'
    + VALID_TEXT + "}", id=rid, reply="message")

# Payloads the parser accepts but orjson cannot write back: an error reply, not a crash.
for name, body in [
        ("extra-nested-300", VALID_TEXT[:-1] + ',"x":' + "[" * 300 + "]" * 300 + "}"),
        ("extra-nested-1000", VALID_TEXT[:-1] + ',"x":' + '{"a":' * 1000 + "1" + "}" * 1000 + "}"),
        ("nan-nested-in-extra", VALID_TEXT[:-1] + ',"x":[NaN]}'),
        ("infinity-deep-in-extra", VALID_TEXT[:-1] + ',"x":{"y":{"z":-Infinity}}}'),
        ("lone-surrogate-in-extra", VALID_TEXT[:-1] + ',"x":"\\ud800"}'),
        ("lone-surrogate-key", VALID_TEXT[:-1] + ',"\\udc00":1}'),
        ("big-int-with-nan-nested", VALID_TEXT[:-1] + ',"x":[123456789012345678901234567890,NaN]}')]:
    rid = new_id()
    add(f"unechoable-{name}", text=request_text(rid, body), id=rid, reply="error", why="echoed")
rid = new_id()
add("non-finite-odds", text=request_text(rid, with_field("odds", "NaN")), id=rid, reply="error",
    why="odds must be a finite number")

# --- C. big frames (over the wire they must not exhaust memory or stall heartbeats) ---------

MIB = 1 << 20
add("oversize-text-1MiB-plus-1", build=["", "x", MIB + 1, ""])
add("oversize-text-2MiB-request", build=[request_text(26, VALID_TEXT)[:-1] + ',"pad":"', "p", 2 * MIB, '"}'])
add("oversize-binary-2MiB", kind="binary", build=["", "\u0000", 2 * MIB, ""])
add("nested-arrays-1MiB", build=["", "[", MIB - 16, ""])
add("nested-objects-1MiB", build=["", '{"a":', (MIB - 16) // 5, ""])
add("nested-in-payload-1MiB", build=['{"type":"message","id":27,"payload":{"x":', "[", MIB - 64, ""])
add("number-of-a-million-digits", build=["", "7", MIB - 16, ""])
add("stake-of-a-million-digits", build=['{"type":"message","id":28,"payload":{"stake":', "9", MIB - 128,
                                        ',"currency":"USD","date":"2021-05-18"}}'])
add("array-of-many-objects-1MiB", build=["[", "{},", (MIB - 16) // 3, "{}]"])
add("string-of-escapes-1MiB", build=['"', "\\u0041", (MIB - 16) // 6, '"'])
rid = new_id()
add("request-with-900KiB-extra", build=['{"type":"message","id":' + str(rid) + ',"payload":'
                                        + VALID_TEXT[:-1] + ',"pad":"', "z", 900 * 1024, '"}}'],
    id=rid, reply="message")
rid = new_id()
add("request-with-a-deep-900KiB-extra", build=['{"type":"message","id":' + str(rid) + ',"payload":'
                                               + VALID_TEXT[:-1] + ',"pad":' + "[" * 1000, "[0,0],",
                                               150_000, "[0]" + "]" * 1000 + "}}"],
    id=rid, reply="error", why="echoed")
rid = new_id()
add("request-with-100KB-string-extra", build=['{"type":"message","id":' + str(rid) + ',"payload":'
                                              + VALID_TEXT[:-1] + ',"x":"', "y", 100_000, '"}}'],
    id=rid, reply="message")
rid = new_id()
add("request-with-100k-element-extra", build=['{"type":"message","id":' + str(rid) + ',"payload":'
                                              + VALID_TEXT[:-1] + ',"pad":[', "1.5,", 100_000, "0]}}"],
    id=rid, reply="message")

# --- D. binary frames -------------------------------------------------------------------

rid = new_id()
add("binary-request-with-id", kind="binary", data=request_text(rid, VALID_TEXT).encode(), id=rid,
    reply="error", why="binary frames are not supported")
add("binary-garbage", kind="binary", data=bytes(range(256)))
add("binary-empty", kind="binary", data=b"")
add("binary-heartbeat", kind="binary", data=b'{"type":"heartbeat"}')
add("binary-no-id", kind="binary", data=b'{"type":"message","payload":{}}')

# --- E. hand-made frames on the wire ------------------------------------------------------

def wire(name, frames, id=None, reply=None, why=None, repeat=1):
    add(name, kind="wire", frames=frames, id=id, reply=reply, why=why)
    if repeat != 1:
        entries[-1]["repeat"] = repeat


for rid_name, split in [("fragmented-3", 3), ("fragmented-10", 10)]:
    rid = new_id()
    data = request_text(rid, VALID_TEXT).encode()
    step = -(-len(data) // split)
    parts = [data[i:i + step] for i in range(0, len(data), step)]
    frames = [ws_frame(0x1 if i == 0 else 0x0, part, fin=(i == len(parts) - 1))
              for i, part in enumerate(parts)]
    wire(rid_name, frames, id=rid, reply="message")
rid = new_id()
data = request_text(rid, VALID_TEXT).encode()
wire("fragmented-with-ping-inside", [ws_frame(0x1, data[:20], fin=False), ws_frame(0x9, b"ping!"),
                                      ws_frame(0x0, data[20:], fin=True)], id=rid, reply="message")
rid = new_id()
wire("masked-server-frame", [ws_frame(0x1, request_text(rid, VALID_TEXT).encode(), mask=b"\x12\x34\x56\x78")],
     id=rid, reply="message")
rid = new_id()
wire("rsv-bits-set", [ws_frame(0x1, request_text(rid, VALID_TEXT).encode(), rsv=0b111)], id=rid,
     reply="message")
rid = new_id()
wire("non-minimal-64-bit-length", [ws_frame(0x1, request_text(rid, VALID_TEXT).encode(), length_form=64)],
     id=rid, reply="message")
rid = new_id()
wire("non-minimal-16-bit-length", [ws_frame(0x1, request_text(rid, VALID_TEXT).encode(), length_form=16)],
     id=rid, reply="message")
first, second = new_id(), new_id()
wire("new-message-inside-a-fragmented-one",
     [ws_frame(0x1, request_text(first, VALID_TEXT).encode()[:30], fin=False),
      ws_frame(0x1, request_text(second, VALID_TEXT).encode())], id=second, reply="message")
wire("continuation-without-start", [ws_frame(0x0, request_text(29, VALID_TEXT).encode())])
wire("continuation-fin-without-start", [ws_frame(0x0, b"xyz", fin=True)])
for opcode in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF):
    wire(f"reserved-opcode-{opcode:x}", [ws_frame(opcode, request_text(30, VALID_TEXT).encode()[:100])])
wire("ping-125-bytes", [ws_frame(0x9, b"p" * 125)])
wire("ping-empty", [ws_frame(0x9, b"")])
wire("pong-unsolicited", [ws_frame(0xA, b"pong")])
wire("ping-126-bytes-illegal", [ws_frame(0x9, b"p" * 126)])
wire("ping-64KiB-illegal", [ws_frame(0x9, build=["", "p", 65536, ""])])
wire("empty-text-frame", [ws_frame(0x1, b"")])
wire("fragmented-oversize-3x400KiB", [ws_frame(0x1, fin=False, build=["", "[", 400 * 1024, ""]),
                                      ws_frame(0x0, fin=False, build=["", "[", 400 * 1024, ""]),
                                      ws_frame(0x0, fin=True, build=["", "]", 400 * 1024, ""])])
wire("fragmented-empty-parts", [ws_frame(0x1, b"", fin=False), ws_frame(0x0, b"", fin=False),
                                ws_frame(0x0, b"", fin=True)])
wire("many-tiny-frames", [ws_frame(0x1, b"{}")], repeat=2000)
wire("many-pings", [ws_frame(0x9, b"x")], repeat=500)


def main():
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), "names must be unique"
    ids = [json.dumps(e["id"]) for e in entries if e["id"] is not None]
    assert len(ids) == len(set(ids)), "ids must be unique"
    with OUT.open("w", encoding="utf-8") as out:
        for entry in entries:
            out.write(json.dumps(entry, ensure_ascii=True) + "\n")
    print(f"{len(entries)} entries ({sum(e['id'] is not None for e in entries)} with an id) -> {OUT}")


if __name__ == "__main__":
    main()
