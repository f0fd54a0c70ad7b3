"""Log lines a drain can parse and nobody can forge: escaping, the JSON format, the
summary line, and the warning that repeats."""

import io
import json
import logging

import pytest

from exrate_green.config import Settings
from exrate_green.logs import (
    JsonLines,
    JsonLogFormatter,
    Summary,
    TextFormatter,
    escape_for_log,
    format_summary,
)
from exrate_green.ratelimit import RateLimitedLog

HOSTILE = ["line\nbreak", "carriage\rreturn", "sep\u2028arator", "para\u2029graph",
           "next\u0085line", "csi\u009b31m", "esc\x1b[2J", "nul\x00", "bidi\u202eevil"]


def record(message, *args, exc_info=None, **extra):
    made = logging.LogRecord("exrate_green.test", logging.INFO, __file__, 1, message, args,
                             exc_info)
    made.__dict__.update(extra)
    return made


@pytest.mark.parametrize("text", HOSTILE)
def test_escape_for_log_leaves_no_character_that_could_end_or_fake_a_line(text):
    escaped = escape_for_log(text)
    assert escaped.isprintable()
    assert len(escaped.splitlines()) == 1
    assert escaped.startswith(text[:3])


def test_escape_for_log_keeps_ordinary_text_and_printable_unicode_as_they_are():
    for text in ('{"id":1,"payload":{"currency":"EUR"}}', "Zürich 5 € ☃", ""):
        assert escape_for_log(text) is text


def test_a_text_line_carrying_a_forged_event_stays_one_line():
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    line = formatter.format(record("send %s", '{"x":"a\u2028CRITICAL exrate_green: forged"}'))
    assert len(line.splitlines()) == 1 and "\\u2028CRITICAL" in line


def test_a_traceback_in_text_mode_has_every_continuation_line_indented():
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("bad\nINFO exrate_green: forged")
    except ValueError as e:
        line = formatter.format(record("failed", exc_info=(ValueError, e, e.__traceback__)))
    first, *rest = line.splitlines()
    assert first == "INFO exrate_green.test: failed"
    assert rest and all(each.startswith("    ") for each in rest)


def test_a_json_line_has_the_fields_a_drain_needs_and_the_event_extras_as_keys():
    formatter = JsonLogFormatter()
    line = formatter.format(record("fetched %d tables", 3, provider="ecb", tables=3))
    event = json.loads(line)
    assert list(event)[:4] == ["timestamp", "level", "logger", "message"]
    assert event["timestamp"].endswith("Z") and event["level"] == "INFO"
    assert event["logger"] == "exrate_green.test" and event["message"] == "fetched 3 tables"
    assert event["provider"] == "ecb" and event["tables"] == 3


def test_a_json_line_holds_the_traceback_in_one_field_and_escapes_every_hostile_text():
    formatter = JsonLogFormatter()
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        line = formatter.format(record("recv %s", " ".join(HOSTILE),
                                       exc_info=(RuntimeError, e, e.__traceback__)))
    assert len(line.splitlines()) == 1 and line.isascii()
    event = json.loads(line)
    assert event["message"] == "recv " + " ".join(HOSTILE)  # nothing lost, only encoded
    assert "Traceback" in event["exception"] and "RuntimeError: boom" in event["exception"]


def test_secrets_are_masked_in_every_json_field_and_in_nested_values():
    formatter = JsonLogFormatter(secrets=["s3cr3t-access-key"])
    line = formatter.format(record("GET /live?access_key=s3cr3t-access-key",
                                   request={"url": "https://x/?k=s3cr3t-access-key"}))
    assert "s3cr3t" not in line and json.loads(line)["message"].endswith("access_key=***")


def test_json_lines_turns_stray_writes_into_one_event_each_and_passes_json_through():
    raw = io.StringIO()
    stream = JsonLines(raw)
    stream.write("Traceback (most recent call last):\n  File x\nValueError: v\n")
    stream.write('{"already": "json"}\n')
    stream.write("partial ")
    stream.write("line\n")
    lines = raw.getvalue().splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 3
    assert events[0]["logger"] == "stderr" and "ValueError: v" in events[0]["message"]
    assert events[1] == {"already": "json"} and events[2]["message"] == "partial line"


def test_setup_logging_in_json_mode_writes_one_object_per_event():
    from exrate_green.logs import setup_logging

    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(Settings(log_format="json", log_level="INFO"), out, stray=False)
        logging.getLogger("exrate_green.x").warning("hello %s", "world", extra={"n": 1})
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    (event,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert event["message"] == "hello world" and event["level"] == "WARNING" and event["n"] == 1


def test_the_summary_counts_each_interval_and_samples_levels():
    summary = Summary()
    first = summary.line({"requests": 10, "errors.no_rate": 0}, {"in_flight": 2, "p99_ms": None})
    second = summary.line({"requests": 25, "errors.no_rate": 1}, {"in_flight": 0, "p99_ms": 4.5})
    assert first == ("count#exrate.requests=10 count#exrate.errors.no_rate=0 "
                     "sample#exrate.in_flight=2")
    assert second == ("count#exrate.requests=15 count#exrate.errors.no_rate=1 "
                      "sample#exrate.in_flight=0 sample#exrate.p99_ms=4.50")
    assert summary.fields == {"count.requests": 15, "count.errors.no_rate": 1,
                              "sample.in_flight": 0, "sample.p99_ms": 4.5}


def test_format_summary_writes_l2met_words_a_drain_reads_without_custom_code():
    line = format_summary({"replies": 3}, {"p50_ms": 1.234, "kept": 0})
    words = dict(word.split("=", 1) for word in line.split())
    assert words == {"count#exrate.replies": "3", "sample#exrate.p50_ms": "1.23",
                     "sample#exrate.kept": "0"}


def test_a_repeating_warning_is_logged_once_a_minute_with_its_count(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("exrate_green.test"), 60, what="bad requests",
                             clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for second in range(200):  # 200 in 100 s
            now[0] = second / 2
            limited.hit("too many headers")
    assert limited.total == 200 and limited.reports == 2
    assert [r.getMessage() for r in caplog.records] == [
        "bad requests (1 since the last report, 1 in all): too many headers",
        "bad requests (120 since the last report, 121 in all): too many headers"]
    assert all(r.exc_info is None for r in caplog.records)
