"""Frame codec micro-benchmark: the codec before the ws package (commit c2caf8e) vs now.

Usage: python tools/bench_frames.py [--before-commit=REV] [--parser-before=REV] [--rounds=N]

Times, in µs per frame (best of N rounds):
  - parsing one 256 KiB batch of ~250-byte unmasked text frames (one recv's worth, as the
    client reads a busy upstream), with the old ``Connection._parse`` and the new
    ``ws.Parser("client").feed``;
  - building 1,000 masked text replies in one bytes object, old ``Connection.send``'s join
    vs ``ws.build_text_frames``;
  - the UTF-8 check the new parser adds (ASCII fast path, and the C decoder on non-ASCII).
The old codec is read from git (``git show REV:exrate_green/connection.py``) into a
temporary module, so this runs from a source checkout.

``--parser-before=REV`` also times ``ws.Parser`` as it was at REV against this checkout's,
alternating in the same run (the same two batches), to show what a change to the parser
costs or saves per frame.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from exrate_green import ws

REQUEST = (b'{"type":"message","id":%d,"payload":{"marketId":123456,"selectionId":987654,'
           b'"odds":2.2,"stake":253.67,"currency":"USD","date":"2021-05-18T21:32:42.324Z"}}')
REPLY = (b'{"type":"message","id":%d,"payload":{"marketId":123456,"selectionId":987654,'
         b'"odds":2.2,"stake":207.52054,"currency":"EUR","date":"2021-05-18T21:32:42.412Z"}}')
BATCH_BYTES = 256 * 1024
MESSAGE_BYTES = 250  # requests and replies are padded (JSON whitespace) to a typical size


def padded(template):
    """``template`` with trailing JSON whitespace up to ``MESSAGE_BYTES`` once formatted."""
    return template + b" " * (MESSAGE_BYTES - len(template % 1_000_000))


def load_old_connection(rev):
    return load_from_git(rev, "exrate_green/connection.py", "old_connection",
                         b"from .errors import", b"from exrate_green.errors import")


def load_old_parser(rev):
    return load_from_git(rev, "exrate_green/ws/parser.py", "old_parser",
                         b"from .frames import", b"from exrate_green.ws.frames import")


def load_from_git(rev, path, name, relative, absolute):
    """The module at ``path`` as of ``rev``, its one relative import made absolute (it is
    loaded apart from its package)."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"],
                            check=True, capture_output=True, cwd=os.path.dirname(__file__)).stdout
    source = source.replace(relative, absolute)
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def server_batch(padding=b""):
    """Whole frames of ~250-byte requests filling 256 KiB, as an upstream sends them."""
    frames, size, n = [], 0, 0
    while True:
        message = padded(REQUEST) % (1_000_000 + n) + padding
        data = ws.build_frame(ws.OP_TEXT, message, mask=False)
        if size + len(data) > BATCH_BYTES:
            return b"".join(frames), n
        frames.append(data)
        size, n = size + len(data), n + 1


def best_us(before, after, rounds, per):
    """Best time of ``rounds`` calls of each, in µs per item (``per`` items a call); the
    two alternate, so a busy machine slows both alike."""
    times = {before: [], after: []}
    for _ in range(rounds):
        for fn in (before, after):
            started = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - started)
    return min(times[before]) / per * 1e6, min(times[after]) / per * 1e6


def bench_parse(old, batch, n, rounds):
    def before():
        conn = old.Connection(None)
        conn._inbox += batch
        assert len(conn._parse()) == n

    def after():
        assert len(ws.Parser("client").feed(batch)) == n

    return best_us(before, after, rounds, n)


def bench_parser_change(old_parser, batch, n, rounds):
    def before():
        assert len(old_parser.Parser("client").feed(batch)) == n

    def after():
        assert len(ws.Parser("client").feed(batch)) == n

    return best_us(before, after, rounds, n)


def bench_build(old, rounds, count=1000):
    replies = [padded(REPLY) % (1_000_000 + i) for i in range(count)]

    def before():  # the old Connection.send, minus the sendall
        masks = os.urandom(4 * len(replies))
        b"".join([old._frame(old.OP_TEXT, m, masks[4 * i:4 * i + 4])
                  for i, m in enumerate(replies)])

    def after():
        ws.build_text_frames(replies, mask=True)

    return best_us(before, after, rounds, count)


def bench_utf8(rounds):
    ascii_payload = padded(REQUEST) % 1_000_000
    other = ascii_payload.replace(b"USD", "€".encode())
    number = 100_000
    isascii = min(timeit.repeat(ascii_payload.isascii, number=number, repeat=rounds)) / number
    decode = min(timeit.repeat(other.decode, number=number, repeat=rounds)) / number
    return isascii * 1e6, decode * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-commit", default="c2caf8e")
    parser.add_argument("--parser-before", metavar="REV",
                        help="also time ws.Parser as of REV against this checkout's")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    old = load_old_connection(args.before_commit)
    batch, n = server_batch()
    print(f"python {sys.version.split()[0]}, old codec from {args.before_commit}, "
          f"best of {args.rounds} rounds")
    started = time.perf_counter()
    parse_old, parse_new = bench_parse(old, batch, n, args.rounds)
    print(f"parse 256 KiB batch ({n} text frames of {MESSAGE_BYTES} B): "
          f"before {parse_old:.3f} µs/frame, after {parse_new:.3f} µs/frame "
          f"({parse_new / parse_old:.2f}x)")
    wide, wide_n = server_batch("é".encode())
    parse_old, parse_new = bench_parse(old, wide, wide_n, args.rounds)
    print(f"parse the same with one non-ASCII character per message (C UTF-8 decoder): "
          f"before {parse_old:.3f} µs/frame, after {parse_new:.3f} µs/frame "
          f"({parse_new / parse_old:.2f}x)")
    if args.parser_before:
        report_parser_change(args.parser_before, batch, n, wide, wide_n, args.rounds)
    build_old, build_new = bench_build(old, args.rounds)
    print(f"build 1,000 masked replies ({MESSAGE_BYTES} B) in one bytes object: "
          f"before {build_old:.3f} µs/frame, after {build_new:.3f} µs/frame "
          f"({build_new / build_old:.2f}x)")
    isascii_us, decode_us = bench_utf8(args.rounds)
    print(f"UTF-8 check per ~250 B message: bytes.isascii {isascii_us:.3f} µs (ASCII, the "
          f"usual case), bytes.decode {decode_us:.3f} µs (non-ASCII)")
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0


def report_parser_change(rev, batch, n, wide, wide_n, rounds):
    old_parser = load_old_parser(rev)
    for name, data, count in (("ASCII", batch, n), ("non-ASCII", wide, wide_n)):
        before, after = bench_parser_change(old_parser, data, count, rounds)
        print(f"ws.Parser at {rev} vs this checkout, {name} batch: before {before:.3f} "
              f"µs/frame, after {after:.3f} µs/frame ({after / before:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
