"""Judging what a client sends: every frame is a heartbeat, a valid reply, or a problem.

``Judge`` keeps the score (replies, ok, error replies, invalid, duplicates, redelivered,
latencies, the first ``MAX_PROBLEMS`` problems in words, the last ``keep_replies``
parsed replies for ``wait_for_reply``); problems are recorded, never raised.

A reply to an automatic request (a ``Template``) is validated in a few C-level steps
(``fast_ok``); the detailed checks (``check_message``, ``check_error``) run only when
those fail, to say what is wrong. The rules (docs/design.md 1): the reply keeps the request's
id and every payload field but ``stake``, ``currency`` and ``date``; the currency is
EUR; the stake is a finite JSON number with at most 5 decimals (a EUR stake unchanged);
the date is the reply time as ``YYYY-MM-DDTHH:MM:SS.mmmZ``; an error reply's message is
``"Unable to convert stake. Error: <reason>"``.
"""

import collections
import datetime
import logging
import math
import re
import time
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from .ledger import Ledger
from .samples import Reservoir
from .traffic import KEPT_AS_IS, Template

log = logging.getLogger("exrate_green.simulator")

__all__ = ["ERROR_PREFIX", "Judge", "check_error", "check_message", "describe"]

ERROR_PREFIX = "Unable to convert stake. Error: "
MAX_PROBLEMS = 20
MAX_ERROR_REASONS = 20
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_STAKE_TEXT_RE = re.compile(rb'"stake"\s*:\s*(-?[0-9][0-9.eE+-]*)')

#: what a frame turned out to be (``Judge.on_text``)
HEARTBEAT_FRAME, OTHER_FRAME = "heartbeat", "other"


def describe(data: Any, n: int = 120) -> str:
    """The start of a frame or value, as text for a problem line."""
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else str(data)
    return text if len(text) <= n else text[:n] + "..."


class Judge:
    """Validates replies against the ``Ledger`` and keeps the score; see the module doc."""

    def __init__(self, ledger: Ledger, *, keep_replies: int = 10_000,
                 reply_date_tolerance_s: float | None = 300.0, latency_samples: int = 10_000):
        self.ledger = ledger
        self.keep_replies = keep_replies
        self.reply_date_tolerance_s = reply_date_tolerance_s
        self.latencies_ms = Reservoir(latency_samples)
        self.replies_by_id: collections.OrderedDict = collections.OrderedDict()
        self.problems: list[str] = []
        self.error_reasons: dict[str, int] = {}
        self.replies = self.ok = self.error_replies = self.invalid = 0
        self.duplicates = self.redelivered = 0
        self._good_date: tuple[str | None, float] = (None, 0.0)  # last valid date, its epoch

    # -- frames
    def problem(self, text: str) -> None:
        """Count an invalid frame; keep its description while there are few."""
        self.invalid += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        log.debug("upstream: invalid: %s", text)

    def on_binary(self, data: bytes) -> None:
        self.problem(f"binary frame of {len(data)} bytes")

    def on_text(self, conn_number: int, data: bytes, t: float, wall: float) -> str:
        """Judge one text frame that arrived at ``t`` (monotonic) / ``wall`` (epoch s)
        on connection ``conn_number``; -> HEARTBEAT_FRAME or OTHER_FRAME."""
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.problem(f"not JSON: {describe(data)!r}")
            return OTHER_FRAME
        kind = msg.get("type") if type(msg) is dict else None
        if kind == "message" or kind == "error":
            self._on_reply(conn_number, msg, data, t, wall)
        elif kind == "heartbeat":
            return HEARTBEAT_FRAME
        else:
            self.problem(f"unknown frame: {describe(data)!r}")
        return OTHER_FRAME

    def _keep_reply(self, rid: Any, msg: dict) -> None:
        try:
            if rid in self.replies_by_id:
                return
        except TypeError:   # unhashable id
            return
        self.replies_by_id[rid] = msg
        if len(self.replies_by_id) > self.keep_replies:
            self.replies_by_id.popitem(last=False)

    def _find_request(self, rid: Any, msg: dict, data: bytes) -> tuple | None:
        """The ledger entry the reply answers, or None after recording why it answers none."""
        ledger = self.ledger
        found = ledger.take(rid) if type(rid) is int or type(rid) is str else None
        if found is not None:
            return found
        state = ledger.state(rid) if not isinstance(rid, bool) else Ledger.NONE
        if state == Ledger.PENDING:   # a pending id of another type (a float...)
            found = ledger.answer(rid)
            if found is not None:
                return found
            state = Ledger.NONE
        if state == Ledger.NONE:
            self._keep_reply(rid, msg)
            self.problem(f"reply to unknown id {describe(orjson.dumps(rid), 40)}: "
                         f"{describe(data)!r}")
        elif state == Ledger.ANSWERED:
            self.duplicates += 1
            self.problem(f"duplicate reply to id {rid}: {describe(data)!r}")
        else:
            self.problem(f"reply to id {rid}, a request too old to remember (answered or "
                         f"given up on long ago): {describe(data)!r}")
        return None

    def _on_reply(self, conn_number: int, msg: dict, data: bytes, t: float, wall: float) -> None:
        rid = msg.get("id")
        found = self._find_request(rid, msg, data)
        if found is None:
            return
        expected, t_sent, sent_on = found
        self.replies += 1
        self.latencies_ms.add((t - t_sent) * 1000.0)
        if sent_on != conn_number:
            self.redelivered += 1
        self._keep_reply(rid, msg)
        if msg["type"] == "message":
            if type(expected) is Template:
                if self.fast_ok(msg, expected, data, wall):
                    self.ok += 1
                    return
                expected = expected.payload
            problems = check_message(msg, expected, data, self.reply_date_tolerance_s)
        else:
            problems = check_error(msg)
        if problems:
            self.problem(f"reply to id {rid}: {'; '.join(problems)}: {describe(data)!r}")
        elif msg["type"] == "message":
            self.ok += 1
        else:
            self._count_error(msg["message"][len(ERROR_PREFIX):])

    def _count_error(self, reason: str) -> None:
        self.error_replies += 1
        reasons = self.error_reasons
        if reason in reasons or len(reasons) < MAX_ERROR_REASONS:
            reasons[reason] = reasons.get(reason, 0) + 1

    def fast_ok(self, msg: dict, template: Template, data: bytes, wall: float) -> bool:
        """True when a success reply is certainly valid: the checks of ``check_message``
        in few steps. False means "look closer" (``check_message`` says what is wrong)."""
        payload = msg.get("payload")
        if type(payload) is not dict or payload.get("currency") != "EUR":
            return False
        stake = payload.get("stake")
        if type(stake) is not float and type(stake) is not int:
            return False
        rest = {k: v for k, v in payload.items() if k not in KEPT_AS_IS}
        if orjson.dumps(rest, option=orjson.OPT_SORT_KEYS) != template.rest:
            return False
        texts = _STAKE_TEXT_RE.findall(data)
        if not texts:
            return False
        for text in texts:
            head, dot, tail = text.partition(b".")
            if len(tail) > 5 or not head.lstrip(b"-").isdigit() or (dot and not tail.isdigit()):
                return False   # more than 5 decimals, an exponent: the slow path decides
        if template.eur_stake is not None and float(texts[-1]) != template.eur_stake:
            return False
        date = payload.get("date")
        good, epoch = self._good_date
        if date != good:
            parsed = reply_date_epoch(date)
            if parsed is None:
                return False
            epoch = parsed
            self._good_date = (date, epoch)
        tolerance = self.reply_date_tolerance_s
        return tolerance is None or abs(wall - epoch) <= tolerance


# --------------------------------------------------------------------------- the rules

def check_error(msg: dict) -> list[str]:
    """What is wrong with an error reply (empty: nothing)."""
    message = msg.get("message")
    if not isinstance(message, str) or not message.startswith(ERROR_PREFIX):
        return [f"error message must start with {ERROR_PREFIX!r}"]
    if not message[len(ERROR_PREFIX):].strip():
        return ["error message has no reason"]
    return []


def check_message(msg: dict, original: Any, data: bytes,
                  date_tolerance_s: float | None) -> list[str]:
    """What is wrong with a success reply to a request whose payload was ``original``."""
    payload = msg.get("payload")
    if not isinstance(payload, dict):
        return ["payload is not an object"]
    problems = []
    if isinstance(original, dict):
        for key, value in original.items():
            if key in KEPT_AS_IS:
                continue
            if key not in payload:
                problems.append(f"field {key!r} missing")
            elif not _same(payload[key], value):
                problems.append(f"field {key!r} changed: {payload[key]!r} != {value!r}")
        extra = [k for k in payload if k not in original and k not in KEPT_AS_IS]
        if extra:
            problems.append(f"unexpected fields {extra}")
    if payload.get("currency") != "EUR":
        problems.append(f"currency {payload.get('currency')!r} is not 'EUR'")
    problems += _check_stake(payload, original, data)
    problems += _check_date(payload.get("date"), date_tolerance_s)
    return problems


def _check_stake(payload: dict, original: Any, data: bytes) -> list[str]:
    stake = payload.get("stake")
    if isinstance(stake, bool) or not isinstance(stake, (int, float)):
        return [f"stake {stake!r} is not a JSON number"]
    if not math.isfinite(stake):
        return [f"stake {stake!r} is not finite"]
    texts = _STAKE_TEXT_RE.findall(data)
    if not texts:
        return ["stake text not found in the frame"]
    problems = []
    for text in texts:
        places = _decimal_places(text)
        if places is None:
            problems.append(f"stake text {text.decode()!r} is not a number")
        elif places > 5:
            problems.append(f"stake {text.decode()} has more than 5 decimals")
    if (not problems and isinstance(original, dict) and original.get("currency") == "EUR"
            and isinstance(original.get("stake"), (int, float))
            and not isinstance(original.get("stake"), bool)):
        want = Decimal(repr(original["stake"])).quantize(Decimal("0.00001"))
        if Decimal(texts[-1].decode()) != want:
            problems.append(f"EUR stake changed: {texts[-1].decode()} != {want.normalize()}")
    return problems


def _check_date(date: Any, tolerance_s: float | None) -> list[str]:
    if not isinstance(date, str) or not _DATE_RE.fullmatch(date):
        return [f"date {date!r} is not YYYY-MM-DDTHH:MM:SS.mmmZ"]
    epoch = reply_date_epoch(date)
    if epoch is None:
        return [f"date {date!r} is not a real time"]
    if tolerance_s is not None:
        skew = abs(time.time() - epoch)
        if skew > tolerance_s:
            return [f"date {date} is not the reply time (off by {skew:.0f} s)"]
    return []


def _same(a: Any, b: Any) -> bool:
    """JSON equality that also tells 2 from 2.0 and 1 from true."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def reply_date_epoch(date: Any) -> float | None:
    """Epoch seconds of a ``YYYY-MM-DDTHH:MM:SS.mmmZ`` text; None if it is not one."""
    if type(date) is not str or not _DATE_RE.fullmatch(date):
        return None
    try:
        moment = datetime.datetime.fromisoformat(date[:-1])
    except ValueError:
        return None
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def _decimal_places(text: bytes) -> int | None:
    """Digits after the point of a JSON number's text (exponent counted); None if not one."""
    if b"e" not in text and b"E" not in text:
        _, dot, tail = text.partition(b".")
        return len(tail) if tail.isdigit() or not dot else None
    try:
        exponent = Decimal(text.decode()).as_tuple().exponent
    except InvalidOperation:
        return None
    return max(0, -exponent) if isinstance(exponent, int) else None
